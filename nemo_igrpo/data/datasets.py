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
    index: int  # position among the loaded problems (0-based): sampler order and tie-break seeds
    prompt: str
    answer: Any
    extra: Optional[dict] = None
    # Where the problem came from, for messages about it: the file, and the JSONL line (1-based,
    # as editors count) or the table row (0-based, as pandas / datasets index it).
    source: Optional[str] = None
    row: Optional[int] = None
    row_label: str = "line"

    @property
    def location(self) -> str:
        """'train.jsonl: line 12' when known, else 'problem 11' (the loaded position)."""
        if self.source is not None and self.row is not None:
            return f"{self.source}: {self.row_label} {self.row}"
        return f"problem {self.index}"


def _rows_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    # Bytes in, decoded line by line: a bad byte is then reported with its line, and lines
    # before it are not re-read. The locale's encoding is never used (UTF-8 is what JSON is).
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                # utf-8-sig on the first line: a byte-order mark written by some Windows editors.
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                column = raw[: e.start].decode("utf-8", errors="replace")
                raise DataError(
                    f"{path}: line {line_no}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at character {len(column) + 1}); "
                    "JSONL files must be UTF-8: re-encode the file (e.g. iconv -f latin1 -t utf-8)"
                ) from None
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
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - a folder that is not a saved dataset, a corrupt arrow file
            raise DataError(f"{path}: cannot load as a saved Hugging Face dataset ({type(e).__name__}: {e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(
                    f"{path}: split '{split}' not found (available: {', '.join(ds.keys())}); set data.split"
                )
            ds = ds[split]
        rows = ds.to_list()
    else:
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - ArrowInvalid on a truncated or non-Parquet file
            raise DataError(f"{path}: cannot read as Parquet ({type(e).__name__}: {e})") from None
    for i, row in enumerate(rows):
        yield i, row


def _prompt_text(value: Any, where: str, key: str) -> str:
    """The problem text. Only a string (or a plain number) is a prompt: str() of a dict or list
    (e.g. a chat message list) would silently train on its Python repr."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    hint = ""
    if isinstance(value, (list, tuple)):
        hint = " (a chat message list is not supported: put the problem text in a string field)"
    raise DataError(f"{where}: field '{key}' (data.prompt_key) is a {type(value).__name__}, expected a string{hint}")


def load_problems(
    path: str | Path, prompt_key: str, answer_key: str, split: str = "train", limit: Optional[int] = None
) -> list[Problem]:
    """Load and validate every row; the row label in errors is the JSONL line or table row."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset not found: {path}")
    if path.suffix == ".jsonl" or path.suffix == ".json":
        rows, label = _rows_jsonl(path), "line"
    elif path.suffix == ".parquet" or path.is_dir():
        rows, label = _rows_table(path, split), "row"
    else:
        raise DataError(
            f"{path}: unsupported dataset format (use .jsonl, .parquet or a saved Hugging Face dataset folder)"
        )
    problems: list[Problem] = []
    source = str(path)  # one string shared by every row (a million rows, one copy)
    for n, row in rows:
        for key, what in ((prompt_key, "data.prompt_key"), (answer_key, "data.answer_key")):
            if key not in row:
                raise DataError(
                    f"{path}: {label} {n}: missing field '{key}' ({what}); fields present: {', '.join(sorted(row))}"
                )
            if row[key] is None or (isinstance(row[key], str) and not row[key].strip()):
                raise DataError(f"{path}: {label} {n}: field '{key}' ({what}) is empty")
        prompt = _prompt_text(row[prompt_key], f"{path}: {label} {n}", prompt_key)
        extra = {k: v for k, v in row.items() if k not in (prompt_key, answer_key)}
        problems.append(
            Problem(
                index=len(problems),
                prompt=prompt,
                answer=row[answer_key],
                extra=extra or None,
                source=source,
                row=n,
                row_label=label,
            )
        )
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
