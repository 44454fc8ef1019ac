"""`igrpo data prepare NAME SRC OUT`: the paper's datasets, in the formats they were published in,
turned into this project's JSONL (one problem per line: `problem`, `answer`, `id`, `source`, plus
a few metadata fields), with the reference answer extracted the way each benchmark defines it.

Nothing is downloaded: SRC is a file or folder the user already has, in any of these forms:
- a Hugging Face dataset saved with `save_to_disk` (a Dataset or a DatasetDict folder);
- a Hugging Face hub snapshot folder (`data/test-00000-of-00001.parquet`, `*.jsonl`, ...);
- one Parquet, JSONL or JSON file (a JSON array, or an object holding one under "data"/"rows").

Each benchmark's published field names differ (and mirrors rename them), so every format lists
the candidates it accepts, matched case-insensitively (AIME 2024 mirrors use `Problem`/`Answer`);
a row where none fits fails with the file, the row and the fields it has.

Answers:
- MATH (hendrycks) and Minerva-Math solutions: the content of the *last* `\\boxed{...}` (or
  `\\fbox{...}`), braces balanced, escaped braces `\\{` `\\}` kept as text - the MATH paper's own
  `last_boxed_only_string` rule;
- GSM8K: the text after `#### `, thousands separators removed ("1,234" -> "1234");
- AIME and AMC: the integer answer ("033" -> "33", 27.0 -> "27");
- MATH-500, AceReason-Math, Minerva (math-ai): the published `answer` field, a `\\boxed{}` or
  `$...$` wrapper around the whole answer removed.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from nemo_igrpo.utils.errors import DataError

# --- answer extraction -------------------------------------------------------------------------

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def _box_starts(text: str) -> list[int]:
    """Positions just after every `\\boxed` / `\\fbox` command (not `\\boxedfoo`)."""
    starts = []
    for cmd in _BOX_COMMANDS:
        for m in re.finditer(re.escape(cmd) + r"(?![A-Za-z])", text):
            starts.append(m.end())
    return sorted(starts)


def _braced(text: str, open_at: int) -> Optional[str]:
    """The content of the group opened by text[open_at] == '{', or None if it never closes.

    `\\{` and `\\}` are literal braces in LaTeX (set notation), not grouping, so a backslash
    skips the character after it."""
    depth, i = 0, open_at
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
        i += 1
    return None


def last_boxed(text: str) -> Optional[str]:
    """The content of the last complete `\\boxed{...}` / `\\fbox{...}` in `text`, or None.

    `\\boxed 5` (an argument without braces, a few MATH solutions) gives "5". An unclosed last
    box is skipped in favour of the previous complete one."""
    for start in reversed(_box_starts(text)):
        i = start
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            content = _braced(text, i)
            if content is not None:
                return content.strip()
            continue
        m = re.match(r"[^\s$]+", text[i:])  # \boxed 5$ : the single token after the command
        if start < i and m:
            return m.group(0).rstrip(".").strip()
    return None


def strip_answer_wrapper(answer: str) -> str:
    """Remove a `$...$`, `\\(...\\)` or `\\boxed{...}` wrapper around the whole answer."""
    s = answer.strip()
    for _ in range(3):  # "$\boxed{5}$" needs two passes
        before = s
        if len(s) >= 2 and s.startswith("$") and s.endswith("$"):
            s = s.strip("$").strip()
        elif s.startswith("\\(") and s.endswith("\\)"):
            s = s[2:-2].strip()
        for cmd in _BOX_COMMANDS:
            if s.startswith(cmd + "{") and _braced(s, len(cmd)) == s[len(cmd) + 1 : -1]:
                s = s[len(cmd) + 1 : -1].strip()
        if s == before:
            break
    return s


_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def gsm8k_answer(text: str) -> Optional[str]:
    """GSM8K's final answer: what follows the last '####', thousands separators removed."""
    if "####" not in text:
        return None
    final = text.rsplit("####", 1)[1].strip()
    return _THOUSANDS.sub("", final).strip() or None


def _number_text(value: Any) -> Optional[str]:
    """An integer-valued number as plain digits (27.0 -> "27", "033" -> "33"), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if math.isfinite(value) and value.is_integer() else repr(value)
    if isinstance(value, str):
        s = _THOUSANDS.sub("", strip_answer_wrapper(value))
        if re.fullmatch(r"[-+]?\d+(\.0*)?", s):
            return str(int(float(s))) if "." in s else str(int(s))
    return None


def _answer_plain(value: Any) -> Optional[str]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _number_text(value)
    if not isinstance(value, str):
        return None
    if "####" in value:
        # A GSM8K-style worked solution is not a final answer: the file is most likely another
        # dataset than the NAME given, which should fail rather than store the whole text.
        return None
    return strip_answer_wrapper(value) or None


def _answer_number(value: Any) -> Optional[str]:
    # AIME / AMC answers are numbers; a textual one (a mirror's "\frac{1}{2}") is kept as text.
    return _number_text(value) or _answer_plain(value)


def _answer_boxed(value: Any) -> Optional[str]:
    return last_boxed(value) if isinstance(value, str) else None


def _answer_gsm8k(value: Any) -> Optional[str]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _number_text(value)  # a mirror that already kept only the number
    if not isinstance(value, str):
        return None
    found = gsm8k_answer(value)
    if found is None and re.fullmatch(r"\s*[-+]?[\d,]*\.?\d+\s*", value):
        found = _THOUSANDS.sub("", value.strip())
    return found


# name -> (function, what it expects, for messages)
_EXTRACTORS: dict[str, tuple[Callable[[Any], Optional[str]], str]] = {
    "plain": (_answer_plain, "a final answer (no '####' solution)"),
    "number": (_answer_number, "a number"),
    "boxed": (_answer_boxed, "a solution with \\boxed{...}"),
    "gsm8k": (_answer_gsm8k, "an answer ending '#### <number>'"),
}


# --- the formats -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetFormat:
    name: str  # the NAME of `igrpo data prepare NAME` and the suite's file stem
    title: str  # as the paper's table names it
    published_as: str  # where users usually get it, for `igrpo data list`
    prompt_fields: tuple[str, ...]
    # (field, extractor) in order of preference; the first field present in the row decides
    # (a present field whose value does not yield an answer is an error, not a fallback, unless
    # a later candidate is also present).
    answer_fields: tuple[tuple[str, str], ...]
    split_preference: tuple[str, ...] = ("test", "validation", "train")
    # Competition year: rows whose year is known (a `year` field, or a 20xx in their url / id)
    # and differs are left out; mirrors bundle several years (AI-MO's AIME set holds 2022-2024).
    year: Optional[int] = None
    metadata_fields: tuple[str, ...] = ("level", "type", "subject", "year")
    aliases: tuple[str, ...] = ()


FORMATS: dict[str, DatasetFormat] = {}


def _add(fmt: DatasetFormat) -> None:
    FORMATS[fmt.name] = fmt


_add(
    DatasetFormat(
        "math",
        "MATH",
        "hendrycks MATH (EleutherAI/hendrycks_math, lighteval): problem, solution with \\boxed{}, level, type",
        prompt_fields=("problem", "question"),
        answer_fields=(("solution", "boxed"), ("answer", "plain")),
        split_preference=("train", "test"),
        aliases=("hendrycks_math", "competition_math"),
    )
)
_add(
    DatasetFormat(
        "acereason_math",
        "AceReason-Math",
        "nvidia/AceReason-Math: problem, answer",
        prompt_fields=("problem", "question"),
        answer_fields=(("answer", "plain"), ("solution", "boxed")),
        split_preference=("train",),
        aliases=("acereason", "acereason-math"),
    )
)
_add(
    DatasetFormat(
        "math500",
        "MATH500",
        "HuggingFaceH4/MATH-500: problem, solution, answer, subject, level, unique_id",
        prompt_fields=("problem",),
        answer_fields=(("answer", "plain"), ("solution", "boxed")),
        aliases=("math-500", "math_500"),
    )
)
_add(
    DatasetFormat(
        "aime24",
        "AIME24",
        "AI-MO/aimo-validation-aime, Maxwell-Jia/AIME_2024, HuggingFaceH4/aime_2024: problem/Problem, answer/Answer",
        prompt_fields=("problem", "question"),
        answer_fields=(("answer", "number"),),
        year=2024,
        aliases=("aime2024", "aime_2024"),
    )
)
_add(
    DatasetFormat(
        "aime25",
        "AIME25",
        "yentinglin/aime_2025, opencompass/AIME2025, math-ai/aime25: problem or question, answer",
        prompt_fields=("problem", "question"),
        answer_fields=(("answer", "number"),),
        year=2025,
        aliases=("aime2025", "aime_2025"),
    )
)
_add(
    DatasetFormat(
        "amc23",
        "AMC",
        "AI-MO/aimo-validation-amc, math-ai/amc23: problem or question, answer (e.g. 27.0), url",
        prompt_fields=("problem", "question"),
        answer_fields=(("answer", "number"),),
        year=2023,
        aliases=("amc", "amc2023", "amc_2023"),
    )
)
_add(
    DatasetFormat(
        "gsm8k",
        "GSM8K",
        "openai/gsm8k (main): question, answer ending '#### 42'",
        prompt_fields=("question", "problem"),
        answer_fields=(("answer", "gsm8k"),),
    )
)
_add(
    DatasetFormat(
        "minerva_math",
        "Minerva",
        "math-ai/minervamath: question, answer (or problem, solution with \\boxed{})",
        prompt_fields=("question", "problem"),
        answer_fields=(("answer", "plain"), ("solution", "boxed")),
        aliases=("minerva", "minervamath", "minerva-math"),
    )
)

_ID_FIELDS = ("unique_id", "id", "idx", "problem_id", "index")


def find_format(name: str) -> DatasetFormat:
    key = name.strip().lower().replace(" ", "_")
    for fmt in FORMATS.values():
        if key == fmt.name or key in fmt.aliases or key.replace("-", "_") == fmt.name:
            return fmt
    raise DataError(f"unknown dataset {name!r}; known: {', '.join(FORMATS)} (igrpo data list describes them)")


# --- reading the published files ----------------------------------------------------------------


@dataclass
class _Rows:
    """One readable source: rows with the file they came from and how to name a row."""

    path: Path
    label: str  # "line" (JSONL, 1-based) or "row" (tables and JSON arrays, 0-based)
    rows: Iterator[tuple[int, dict]]


def _json_file(path: Path) -> _Rows:
    from nemo_igrpo.data.datasets import _rows_jsonl

    text_start = path.read_bytes()[:4096].lstrip(b"\xef\xbb\xbf").lstrip()
    if path.suffix == ".json" and text_start[:1] in (b"[", b"{"):
        # A JSON document (array, or an object wrapping one) - unless it is JSONL named .json,
        # which then fails to parse as one document and is read line by line below.
        try:
            doc = json.loads(path.read_text(encoding="utf-8-sig"))
        except (ValueError, UnicodeDecodeError):
            doc = None
        if isinstance(doc, dict):
            for key in ("data", "rows", "examples", "test", "train"):
                if isinstance(doc.get(key), list):
                    doc = doc[key]
                    break
        if isinstance(doc, list):
            for i, row in enumerate(doc):
                if not isinstance(row, dict):
                    raise DataError(f"{path}: row {i}: expected a JSON object, got {type(row).__name__}")
            return _Rows(path, "row", iter(enumerate(doc)))
        if isinstance(doc, dict):
            return _Rows(path, "row", iter([(0, doc)]))
    return _Rows(path, "line", _rows_jsonl(path))


def _parquet_file(path: Path) -> _Rows:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - ArrowInvalid on a truncated or non-Parquet file
        raise DataError(f"{path}: cannot read as Parquet ({type(e).__name__}: {e})") from None
    return _Rows(path, "row", iter(enumerate(rows)))


def _choose_split(available: Sequence[str], split: Optional[str], fmt: DatasetFormat, where: Path) -> str:
    if split is not None:
        if split not in available:
            raise DataError(f"{where}: split '{split}' not found (available: {', '.join(available)})")
        return split
    if len(available) == 1:
        return available[0]
    for s in fmt.split_preference:
        if s in available:
            return s
    raise DataError(
        f"{where}: several splits ({', '.join(available)}) and none of {list(fmt.split_preference)}; pass --split"
    )


def _saved_dataset(path: Path, split: Optional[str], fmt: DatasetFormat) -> _Rows:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a saved Hugging Face dataset needs the 'datasets' package") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - not a saved dataset, or a corrupt arrow file
        raise DataError(f"{path}: cannot load as a saved Hugging Face dataset ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        chosen = _choose_split(list(ds.keys()), split, fmt, path)
        ds = ds[chosen]
        path = path / chosen
    return _Rows(path, "row", iter(enumerate(ds.to_list())))


_DATA_SUFFIXES = (".parquet", ".jsonl", ".json")


def _folder_files(path: Path, split: Optional[str], fmt: DatasetFormat) -> list[Path]:
    """Data files of a hub snapshot folder, restricted to one split when the names say which."""
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix in _DATA_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise DataError(f"{path}: no saved Hugging Face dataset and no .parquet/.jsonl/.json files in this folder")

    def split_of(p: Path) -> Optional[str]:
        # hub layout: data/test-00000-of-00001.parquet, test.jsonl, or a split folder test/...
        for part in reversed(p.relative_to(path).parts):
            m = re.match(r"(train|test|validation|valid|dev|eval)(?=[-_.]|$)", part.lower())
            if m:
                return m.group(1)
        return None

    splits = sorted({s for s in map(split_of, files) if s is not None})
    if not splits:
        return files  # e.g. opencompass' AIME2025-I.jsonl + AIME2025-II.jsonl: one set
    chosen = _choose_split(splits, split, fmt, path)
    return [p for p in files if split_of(p) == chosen]


def read_sources(src: str | os.PathLike, fmt: DatasetFormat, split: Optional[str] = None) -> list[_Rows]:
    path = Path(src)
    if not path.exists():
        raise DataError(f"{path}: not found (igrpo data prepare reads files you already have; it downloads nothing)")
    if path.is_dir():
        if any((path / marker).exists() for marker in ("dataset_dict.json", "dataset_info.json", "state.json")):
            return [_saved_dataset(path, split, fmt)]
        files = _folder_files(path, split, fmt)
    else:
        files = [path]
    out = []
    for f in files:
        if f.suffix == ".parquet":
            out.append(_parquet_file(f))
        elif f.suffix in (".jsonl", ".json"):
            out.append(_json_file(f))
        else:
            raise DataError(
                f"{f}: unsupported format (use a saved Hugging Face dataset folder, .parquet, .jsonl or .json)"
            )
    return out


# --- preparing ---------------------------------------------------------------------------------


def _field(row: dict, name: str) -> Optional[str]:
    """The row's key matching `name` case-insensitively (`Problem` for `problem`)."""
    if name in row:
        return name
    lower = name.lower()
    for key in row:
        if isinstance(key, str) and key.lower() == lower:
            return key
    return None


def _row_year(row: dict) -> Optional[int]:
    key = _field(row, "year")
    if key is not None:
        try:
            return int(row[key])
        except (TypeError, ValueError):
            pass
    for name in ("url", "id", "unique_id", "source", "problem_id"):
        key = _field(row, name)
        if key is not None and isinstance(row[key], str):
            m = re.search(r"(?<!\d)(20\d\d)(?!\d)", row[key])
            if m:
                return int(m.group(1))
    return None


@dataclass
class PrepareResult:
    name: str
    output: Path
    rows: int
    other_years: int = 0  # rows left out because they belong to another competition year
    skipped: list[str] = field(default_factory=list)  # "file: row N: why", with skip_bad_rows

    def summary(self) -> str:
        parts = [f"{self.name}: wrote {self.rows} problems to {self.output}"]
        if self.other_years:
            parts.append(f"left out {self.other_years} rows of other years")
        if self.skipped:
            parts.append(f"skipped {len(self.skipped)} unusable rows (first: {self.skipped[0]})")
        return "; ".join(parts)


def _convert_row(row: dict, fmt: DatasetFormat, where: str, prompt_key: str, answer_key: str, fallback_id: str) -> dict:
    fields_found = ", ".join(map(str, row)) or "none"
    prompt_field = next((k for k in map(lambda f: _field(row, f), fmt.prompt_fields) if k is not None), None)
    if prompt_field is None:
        raise DataError(
            f"{where}: no problem field for {fmt.name} (looked for {' / '.join(fmt.prompt_fields)}, "
            f"any case); fields found: {fields_found}"
        )
    prompt = row[prompt_field]
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(
            f"{where}: field '{prompt_field}' is {'empty' if isinstance(prompt, str) else type(prompt).__name__}, "
            "expected the problem text"
        )
    present = [(k, kind) for k, kind in ((_field(row, f), kind) for f, kind in fmt.answer_fields) if k is not None]
    if not present:
        wanted = " / ".join(f"{f} ({_EXTRACTORS[kind][1]})" for f, kind in fmt.answer_fields)
        raise DataError(f"{where}: no answer field for {fmt.name} (looked for {wanted}); fields found: {fields_found}")
    answer = None
    for key, kind in present:
        if row[key] is not None:
            answer = _EXTRACTORS[kind][0](row[key])
        if answer:
            break
    if not answer:
        tried = "; ".join(f"'{k}' is not {_EXTRACTORS[kind][1]} ({str(row[k])[-80:]!r})" for k, kind in present)
        raise DataError(f"{where}: no answer could be extracted: {tried}")
    out = {prompt_key: prompt.strip(), answer_key: answer}
    id_key = next((k for k in map(lambda f: _field(row, f), _ID_FIELDS) if k is not None), None)
    out["id"] = str(row[id_key]) if id_key is not None and row[id_key] not in (None, "") else fallback_id
    out["source"] = fmt.name
    for meta in fmt.metadata_fields:
        key = _field(row, meta)
        if (
            key is not None
            and meta not in out
            and isinstance(row[key], (str, int, float))
            and not isinstance(row[key], bool)
        ):
            out[meta] = row[key]
    return out


def prepare_dataset(
    name: str,
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    split: Optional[str] = None,
    limit: Optional[int] = None,
    prompt_key: str = "problem",
    answer_key: str = "answer",
    all_years: bool = False,
    skip_bad_rows: bool = False,
) -> PrepareResult:
    """Convert dataset `name` read from `src` into the project's JSONL at `out`.

    `out` is a .jsonl file, or a folder that gets `<name>.jsonl` (the layout the evaluation
    suite reads). `prompt_key` / `answer_key`: the keys written (data.prompt_key /
    data.answer_key). skip_bad_rows: leave out rows without a usable problem or answer (listed in
    the result) instead of failing on the first one."""
    fmt = find_format(name)
    if prompt_key == answer_key or "id" in (prompt_key, answer_key) or "source" in (prompt_key, answer_key):
        raise DataError(
            f"--prompt-key {prompt_key!r} / --answer-key {answer_key!r}: must differ from each other and from 'id', 'source'"
        )
    out_path = Path(out)
    if out_path.suffix != ".jsonl":
        out_path = out_path / f"{fmt.name}.jsonl"
    records: list[dict] = []
    other_years = 0
    skipped: list[str] = []
    for source in read_sources(src, fmt, split):
        for n, row in source.rows:
            where = f"{source.path}: {source.label} {n}"
            if fmt.year is not None and not all_years:
                year = _row_year(row)
                if year is not None and year != fmt.year:
                    other_years += 1
                    continue
            try:
                records.append(_convert_row(row, fmt, where, prompt_key, answer_key, f"{fmt.name}-{len(records)}"))
            except DataError as e:
                if not skip_bad_rows:
                    raise
                skipped.append(str(e))
            if limit is not None and len(records) >= limit:
                break
        if limit is not None and len(records) >= limit:
            break
    if not records:
        why = f" ({other_years} rows are of other years than {fmt.year}; --all-years keeps them)" if other_years else ""
        raise DataError(f"{src}: no {fmt.name} problems found{why}")
    seen: dict[str, int] = {}
    for r in records:  # ids must be unique: reports and comparisons key on them
        count = seen.get(r["id"], 0)
        seen[r["id"]] = count + 1
        if count:
            r["id"] = f"{r['id']}#{count}"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, out_path)  # never a half-written benchmark file next to good ones
    return PrepareResult(fmt.name, out_path, len(records), other_years, skipped)


def describe_formats() -> str:
    lines = []
    for fmt in FORMATS.values():
        year = f", year {fmt.year} only" if fmt.year else ""
        lines.append(f"{fmt.name:15s} {fmt.title} - {fmt.published_as}{year}")
    return "\n".join(lines)


def run_data_cli(args) -> int:
    if args.data_command == "list":
        print(describe_formats())
        return 0
    result = prepare_dataset(
        args.name,
        args.source,
        args.output,
        split=args.split,
        limit=args.limit,
        prompt_key=args.prompt_key,
        answer_key=args.answer_key,
        all_years=args.all_years,
        skip_bad_rows=args.skip_bad_rows,
    )
    print(result.summary())
    return 0
