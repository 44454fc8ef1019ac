"""Where a run's numbers go: metrics.jsonl (the record), TensorBoard, optional W&B, and one
readable console line per step. Only global rank 0 writes.

metrics.jsonl is append-only, one JSON object per line with a `step` key. On resume the
lines of steps after the checkpoint are dropped first, so a killed-and-resumed run's file
reads exactly like an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

from nemo_igrpo.config.schema import LoggingConfig


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them visible instead of failing
    return value


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records of steps > last_step (written after the checkpoint we resume from)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write
        if rec.get("step", 0) <= last_step:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    os.replace(tmp, path)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics.jsonl (is {run_dir} a run directory?)")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{n}: not valid JSON") from None
    return out


class MetricsLogger:
    def __init__(
        self, run_dir: Path, cfg: LoggingConfig, run_name: str, enabled: bool, config_dict: Optional[dict] = None
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise RuntimeError(
                    "logging.wandb=true needs the wandb package: pip install 'nemo-igrpo[wandb]'"
                ) from None
            self._wandb = wandb.init(
                project=cfg.wandb_project,
                entity=cfg.wandb_entity,
                name=run_name,
                dir=str(run_dir),
                config=config_dict,
                resume="allow",
            )

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
            f.flush()
        step = int(record["step"])
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def log_samples(self, step: int, records: list[dict]) -> None:
        """A step's sample records (utils/samples.py) as TensorBoard text and a W&B table, when
        those are on; samples.jsonl itself is written by SampleLog."""
        if not self.enabled or not records:
            return
        from nemo_igrpo.utils import samples

        if self._tb is not None:
            self._tb.add_text("samples", samples.format_markdown(step, records), step)
            self._tb.flush()
        if self._wandb is not None:
            # Untested here (wandb is not installed in this environment); kept to the one call.
            import wandb

            columns, rows = samples.wandb_rows(records)
            self._wandb.log({"samples": wandb.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def step_summary(rec: dict, max_steps: int) -> str:
    """The one console line per step."""

    def g(key, fmt="{:.3f}"):
        v = rec.get(key)
        return fmt.format(v) if isinstance(v, (int, float)) else "-"

    parts = [
        f"step {rec['step']}/{max_steps}",
        f"draft {g('reward/draft_mean')}",
        f"refine {g('reward/refine_mean')}",
        f"loss {g('loss', '{:+.4f}')}",
        f"entropy {g('entropy')}",
        f"lr {g('lr', '{:.2e}')}",
        f"{g('timing/step_s', '{:.1f}')} s",
    ]
    if "eval/accuracy" in rec:
        parts.append(f"eval acc {rec['eval/accuracy']:.3f}")
    return " | ".join(parts)
