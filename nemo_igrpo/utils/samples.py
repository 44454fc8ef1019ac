"""What the model wrote: a few prompts per step with their drafts, the chosen draft, the
refinements and every reward and advantage, in `<run.dir>/samples.jsonl`.

The records are the rollout's own (`RolloutBatch.records`, built in algorithms/rollout.py):
    {"step", "problem_index", "problem", "answer",
     "drafts": [{"text", "reward", "correct"}], "chosen_draft": index or None,
     "rounds": [{"conditioned", "draft_truncated",
                 "refinements": [{"text", "reward", "advantage"}]}]}
Texts there are already cut to a couple of thousand characters. The file is append-only, one
record per line; it stops growing at `logging.samples_max_mb` (one warning), and on resume the
records of steps after the checkpoint are dropped, as for metrics.jsonl.
`igrpo samples RUN_DIR [--step N] [--limit K]` prints them (`format_record`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from nemo_igrpo.utils.errors import UserError

logger = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"


def _clean(value: Any) -> Any:
    """JSON-safe copy: numpy scalars as Python ones, NaN/Inf as strings (JSON has none)."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()  # numpy / torch scalars (np.bool_ is not JSON serializable)
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class SampleLog:
    """Appends each step's records to samples.jsonl, up to max_mb in all."""

    def __init__(self, run_dir: str | Path, max_mb: float, enabled: bool = True):
        self.path = Path(run_dir) / SAMPLES_FILE
        self.max_bytes = int(float(max_mb) * 2**20)
        self.enabled = enabled and self.max_bytes > 0
        self._full_warned = False

    def truncate(self, last_step: int) -> None:
        """Drop records of steps after `last_step` (a resume, or 0 for a fresh run)."""
        if not self.enabled:
            return
        from nemo_igrpo.utils.metrics_log import truncate_metrics

        truncate_metrics(self.path, last_step)  # the same step-keyed JSONL rule

    def write(self, records: Sequence[dict]) -> bool:
        """Append records; False (and one warning for the run) once the size bound is reached."""
        if not self.enabled or not records:
            return False
        data = "".join(json.dumps(_clean(r), ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        size = self.path.stat().st_size if self.path.exists() else 0
        if size + len(data) > self.max_bytes:
            if not self._full_warned:
                # Keep the earliest steps rather than rotating: a bounded file that always
                # starts at step 1 still shows how the outputs changed over the run.
                logger.warning(
                    "%s reached logging.samples_max_mb=%g; no more samples are written this run",
                    self.path,
                    self.max_bytes / 2**20,
                )
                self._full_warned = True
            return False
        with open(self.path, "ab") as f:
            f.write(data)
        return True


def read_samples(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / SAMPLES_FILE
    if not path.is_file():
        raise UserError(
            f"{path}: no samples file (is {run_dir} a run directory of a run with logging.samples_per_step > 0?)"
        )
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write
    return out


def select(records: list[dict], step: Optional[int] = None, limit: Optional[int] = None) -> list[dict]:
    """The records of `step` (default: the latest step that has any), at most `limit` of them."""
    if not records:
        return []
    steps = sorted({int(r.get("step", 0)) for r in records})
    if step is None:
        step = steps[-1]
    chosen = [r for r in records if int(r.get("step", 0)) == step]
    if not chosen:
        raise UserError(f"no samples for step {step}; the file has steps {_ranges(steps)}")
    return chosen[:limit] if limit is not None and limit >= 0 else chosen


def _ranges(steps: list[int]) -> str:
    parts, start, prev = [], None, None
    for s in steps:
        if start is None:
            start = prev = s
        elif s == prev + 1:
            prev = s
        else:
            parts.append(f"{start}-{prev}" if prev != start else str(start))
            start = prev = s
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else str(start))
    return ", ".join(parts)


def _num(value: Any, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _block(text: str, indent: str) -> str:
    """A model output as written (newlines kept), indented under its heading."""
    lines = str(text).splitlines() or [""]
    return "\n".join(indent + line for line in lines)


def format_record(rec: dict) -> str:
    """One prompt of one step, readable in a terminal."""
    rule = "=" * 78
    out = [
        rule,
        f"step {rec.get('step')}  problem {rec.get('problem_index')}  reference answer: {rec.get('answer')}",
        rule,
        "prompt:",
        _block(rec.get("problem", ""), "    "),
    ]
    drafts = rec.get("drafts") or []
    chosen = rec.get("chosen_draft")
    if drafts:
        out.append("")
        out.append(f"drafts ({len(drafts)}):")
        for i, d in enumerate(drafts):
            mark = "  <- chosen" if i == chosen else ""
            ok = "correct" if d.get("correct") else "wrong"
            out.append(f"  draft {i}  reward {_num(d.get('reward'), '{:.3f}')}  {ok}{mark}")
            out.append(_block(d.get("text", ""), "      "))
        out.append(f"chosen draft: {chosen if chosen is not None else 'none (refinements from the plain prompt)'}")
    for k, rnd in enumerate(rec.get("rounds") or []):
        how = "conditioned on the chosen draft" if rnd.get("conditioned") else "from the plain prompt"
        if rnd.get("draft_truncated"):
            how += " (draft cut to fit the context)"
        refs = rnd.get("refinements") or []
        out.append("")
        out.append(f"refinements, round {k + 1} ({len(refs)}, {how}):")
        for i, r in enumerate(refs):
            out.append(
                f"  refinement {i}  reward {_num(r.get('reward'), '{:.3f}')}  "
                f"advantage {_num(r.get('advantage'), '{:+.3f}')}"
            )
            out.append(_block(r.get("text", ""), "      "))
    return "\n".join(out)


def format_markdown(step: int, records: Sequence[dict]) -> str:
    """TensorBoard's text plugin renders markdown: the terminal layout inside a code block keeps
    the columns and the model's own newlines."""
    body = "\n\n".join(format_record(r) for r in records)
    return f"step {step}\n\n```\n{body}\n```"


def wandb_rows(records: Sequence[dict]) -> tuple[list[str], list[list]]:
    """Columns and rows of the W&B table: one row per prompt, texts as the terminal shows them."""
    columns = ["step", "problem_index", "problem", "answer", "chosen_draft", "drafts", "refinements"]
    rows = []
    for r in records:
        drafts = "\n\n".join(
            f"[{i}] reward {_num(d.get('reward'), '{:.3f}')}: {d.get('text', '')}"
            for i, d in enumerate(r.get("drafts") or [])
        )
        refs = "\n\n".join(
            f"[round {k + 1}, {i}] reward {_num(x.get('reward'), '{:.3f}')} advantage "
            f"{_num(x.get('advantage'), '{:+.3f}')}: {x.get('text', '')}"
            for k, rnd in enumerate(r.get("rounds") or [])
            for i, x in enumerate(rnd.get("refinements") or [])
        )
        rows.append(
            [
                r.get("step"),
                r.get("problem_index"),
                r.get("problem"),
                r.get("answer"),
                r.get("chosen_draft"),
                drafts,
                refs,
            ]
        )
    return columns, rows


def run_samples_cli(args) -> int:
    records = select(read_samples(args.run_dir), step=args.step, limit=args.limit)
    if not records:
        print(f"{Path(args.run_dir) / SAMPLES_FILE}: empty (no step has finished yet)")
        return 0
    print("\n\n".join(format_record(r) for r in records))
    return 0
