"""`igrpo plot`: reward, accuracy, entropy and the mechanism diagnostics per step as PNG,
several runs overlaid; `plot_comparison` (for `igrpo compare`): arms overlaid, mean over seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from nemo_igrpo.utils.errors import UserError
from nemo_igrpo.utils.metrics_log import read_metrics

PANELS = [
    ("reward", ["reward/refine_mean", "reward/draft_mean"], "reward (mean)"),
    ("accuracy", ["eval/accuracy"], "held-out accuracy (single-shot)"),
    ("entropy", ["entropy"], "policy entropy (nats/token)"),
    # Mechanism diagnostics (rollout.py, `_diagnostics`); a panel is skipped when no run has them.
    (
        "zero_variance",
        ["diag/stage2_zero_variance_frac", "diag/stage1_zero_variance_frac"],
        "groups with zero reward variance",
    ),
    ("best_draft", ["diag/best_draft_correct", "diag/best_draft_prop31"], "best draft correct vs Prop. 3.1 1-(1-p)^N"),
    (
        "refine_split",
        ["diag/refine_acc_draft_correct", "diag/refine_acc_draft_wrong"],
        "refinement accuracy by appended draft",
    ),
    (
        "refine_copy",
        ["diag/refine_copy_frac", "diag/refine_copy_frac_draft_wrong"],
        "refinements repeating the draft verbatim",
    ),
]

# `igrpo compare` overlays: one line per arm (mean over seeds), each seed as a thin line.
COMPARE_PANELS = [
    ("accuracy", "eval/accuracy", "held-out accuracy (single-shot)"),
    ("reward", "reward/refine_mean", "reward of the trained samples"),
    ("entropy", "entropy", "policy entropy (nats/token)"),
    ("zero_variance", "diag/stage2_zero_variance_frac", "trained groups with zero reward variance"),
    ("draft_zero_variance", "diag/stage1_zero_variance_frac", "draft groups with zero reward variance"),
    ("best_draft", "diag/best_draft_correct", "best draft correct"),
    ("best_draft_prop31", "diag/best_draft_prop31", "Prop. 3.1 prediction 1-(1-p)^N"),
    ("refine_acc_draft_correct", "diag/refine_acc_draft_correct", "refinement accuracy | draft correct"),
    ("refine_acc_draft_wrong", "diag/refine_acc_draft_wrong", "refinement accuracy | draft wrong"),
    ("refine_copy", "diag/refine_copy_frac", "refinements repeating the draft verbatim"),
]


def plot_runs(
    run_dirs: Sequence[str], out_dir: Optional[str] = None, labels: Optional[Sequence[str]] = None
) -> list[Path]:
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
        written.append(_save_figure(plt, fig, ax, title, out / f"{name}.png"))
    if not written:
        raise UserError(f"no plottable metrics in {', '.join(map(str, run_dirs))}")
    return written


def _series(records: list[dict], key: str) -> dict[int, float]:
    # Later lines of a step win (a resumed run rewrites its tail; eval lines share the step).
    out: dict[int, float] = {}
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and "step" in r:
            out[int(r["step"])] = float(v)
    return out


def plot_comparison(arms: dict[str, list[list[dict]]], out_dir: Path) -> list[Path]:
    """One PNG per COMPARE_PANELS entry: for each arm the per-step mean over its seeds (thick)
    and every seed (thin, same colour). `arms`: arm -> one metrics record list per seed.
    Panels no arm has data for are skipped (e.g. draft diagnostics of a GRPO-only comparison)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for name, key, title in COMPARE_PANELS:
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = 0
        for i, (arm, seeds) in enumerate(arms.items()):
            colour = colours[i % len(colours)]
            per_seed = [s for s in (_series(recs, key) for recs in seeds) if s]
            if not per_seed:
                continue
            for s in per_seed:
                xs = sorted(s)
                ax.plot(xs, [s[x] for x in xs], color=colour, alpha=0.25, linewidth=0.8)
            steps = sorted({x for s in per_seed for x in s})
            # Mean over the seeds that logged the step (all do for a finished comparison).
            means = [sum(s[x] for s in per_seed if x in s) / sum(1 for s in per_seed if x in s) for x in steps]
            ax.plot(
                steps,
                means,
                color=colour,
                linewidth=2,
                marker="o" if len(steps) < 20 else None,
                label=f"{arm} (mean of {len(per_seed)})",
            )
            drawn += 1
        if not drawn:
            plt.close(fig)
            continue
        written.append(_save_figure(plt, fig, ax, title, out_dir / f"{name}.png"))
    return written


def _save_figure(plt, fig, ax, title: str, path: Path) -> Path:
    """Label, lay out and write one per-step figure (both the run overlays and the comparison)."""
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
