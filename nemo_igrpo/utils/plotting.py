"""`igrpo plot`: reward, accuracy and entropy per step as PNG, several runs overlaid."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from nemo_igrpo.utils.errors import UserError
from nemo_igrpo.utils.metrics_log import read_metrics

PANELS = [
    ("reward", ["reward/refine_mean", "reward/draft_mean"], "reward (mean)"),
    ("accuracy", ["eval/accuracy"], "held-out accuracy (single-shot)"),
    ("entropy", ["entropy"], "policy entropy (nats/token)"),
]


def plot_runs(run_dirs: Sequence[str], out_dir: Optional[str] = None, labels: Optional[Sequence[str]] = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters and CI
    import matplotlib.pyplot as plt

    if labels and len(labels) != len(run_dirs):
        raise UserError(f"--labels: got {len(labels)} labels for {len(run_dirs)} runs")
    runs = [(labels[i] if labels else Path(d).name, read_metrics(d)) for i, d in enumerate(run_dirs)]
    out = Path(out_dir) if out_dir else Path(run_dirs[0]) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, keys, title in PANELS:
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = 0
        for label, records in runs:
            for key in keys:
                pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
                if not pts:
                    continue
                xs, ys = zip(*pts)
                suffix = f" {key.split('/')[-1]}" if len(keys) > 1 else ""
                ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, label=f"{label}{suffix}")
                drawn += 1
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if not written:
        raise UserError(f"no plottable metrics in {', '.join(map(str, run_dirs))}")
    return written
