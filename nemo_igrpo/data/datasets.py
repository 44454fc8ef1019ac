"""Problem/answer datasets: JSONL, Parquet, or a Hugging Face dataset saved to a local folder.

Every row is checked when the file is loaded, so a missing or empty field is reported with the
file and the row number before any model is built, rather than as a KeyError mid-run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from nemo_igrpo.utils.errors import DataError


@dataclass(frozen=True)
class Problem:
    index: int  # row number in the source (0-based), kept for error messages and resume
    prompt: str
    answer: Any
    extra: Optional[dict] = None


def _rows_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {line_no}: expected a JSON object, got {type(row).__name__}")
            yield line_no, row


def _rows_table(path: Path, split: str) -> Iterator[tuple[int, dict]]:
    if path.is_dir():
        try:
            import datasets
        except ImportError:
            raise DataError(f"{path}: reading a Hugging Face dataset folder needs the 'datasets' package") from None
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: split '{split}' not found (available: {', '.join(ds.keys())}); set data.split")
            ds = ds[split]
        rows = ds.to_list()
    else:
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    for i, row in enumerate(rows):
        yield i, row


def load_problems(path: str | Path, prompt_key: str, answer_key: str, split: str = "train",
                  limit: Optional[int] = None) -> list[Problem]:
    """Load and validate every row; the row label in errors is the JSONL line or table row."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset not found: {path}")
    if path.suffix == ".jsonl" or path.suffix == ".json":
        rows, label = _rows_jsonl(path), "line"
    elif path.suffix == ".parquet" or path.is_dir():
        rows, label = _rows_table(path, split), "row"
    else:
        raise DataError(f"{path}: unsupported dataset format (use .jsonl, .parquet or a saved Hugging Face dataset folder)")
    problems: list[Problem] = []
    for n, row in rows:
        for key, what in ((prompt_key, "data.prompt_key"), (answer_key, "data.answer_key")):
            if key not in row:
                raise DataError(f"{path}: {label} {n}: missing field '{key}' ({what}); fields present: {', '.join(sorted(row))}")
            if row[key] is None or (isinstance(row[key], str) and not row[key].strip()):
                raise DataError(f"{path}: {label} {n}: field '{key}' ({what}) is empty")
        extra = {k: v for k, v in row.items() if k not in (prompt_key, answer_key)}
        problems.append(Problem(index=len(problems), prompt=str(row[prompt_key]), answer=row[answer_key], extra=extra or None))
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise DataError(f"{path}: no rows")
    return problems


class PromptSampler:
    """Yields batches of problems in a seeded order, epoch after epoch.

    Its whole state is (epoch, position), so a resumed run sees exactly the batches the
    uninterrupted run would have seen.
    """

    def __init__(self, problems: list[Problem], batch_size: int, seed: int, shuffle: bool = True):
        if batch_size > len(problems):
            raise DataError(f"data.prompts_per_step={batch_size} is larger than the dataset ({len(problems)} rows)")
        self.problems = problems
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.problems))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.problems))

    def next_batch(self, size: Optional[int] = None) -> list[Problem]:
        size = size or self.batch_size
        batch: list[Problem] = []
        while len(batch) < size:
            order = self._order(self.epoch)
            take = order[self.position : self.position + size - len(batch)]
            batch.extend(self.problems[i] for i in take)
            self.position += len(take)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
