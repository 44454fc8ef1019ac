"""`igrpo data prepare`: each of the paper's datasets, written here in the format it was published
in (saved Hugging Face datasets, hub Parquet snapshots, JSONL / JSON with the publishers' field
names), turns into the project's JSONL with the answer the benchmark defines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_igrpo.data.datasets import load_problems
from nemo_igrpo.data.prepare import (
    FORMATS,
    find_format,
    gsm8k_answer,
    last_boxed,
    prepare_dataset,
    strip_answer_wrapper,
)
from nemo_igrpo.utils.errors import DataError

REPO = Path(__file__).resolve().parents[2]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _saved(path: Path, splits: dict[str, list[dict]]) -> Path:
    import datasets

    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(path))
    return path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- answer extraction --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so the answer is $\boxed{5}$.", "5"),
        (r"$\boxed{\frac{1}{2}}$", r"\frac{1}{2}"),
        (r"\boxed{\sqrt{\frac{a^{2}}{b}}}", r"\sqrt{\frac{a^{2}}{b}}"),
        (r"first \boxed{1}, finally \boxed{2}", "2"),  # the last box, as the MATH paper's rule
        (r"the set is \boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces are text, not grouping
        (r"\fbox{x+1}", "x+1"),
        (r"The answer is $\boxed 7$.", "7"),
        (r"\boxed{3} then an unclosed \boxed{4", "3"),
        (r"\boxedx{3}", None),
        ("no box here", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She pays 3 * 4 = <<3*4=12>>12 dollars.\n#### 12", "12"),
        ("... so 1,234,567 in all\n#### 1,234,567", "1234567"),
        ("#### -5", "-5"),
        ("no marker", None),
    ],
)
def test_gsm8k_answer(text, expected):
    assert gsm8k_answer(text) == expected


def test_strip_answer_wrapper():
    assert strip_answer_wrapper(r"$\boxed{\frac{3}{4}}$") == r"\frac{3}{4}"
    assert strip_answer_wrapper(r"\boxed{1}+\boxed{2}") == r"\boxed{1}+\boxed{2}"  # not one wrapper
    assert strip_answer_wrapper(r"\(x^2\)") == "x^2"


# --- each published format ----------------------------------------------------------------------


def test_math_saved_datasetdict_takes_train_and_last_box(tmp_path):
    solutions = [
        r"Since $x=2$, we get $\boxed{\frac{1}{2}}$.",
        r"We try \boxed{1} but then find \fbox{\{3, 4\}}.",
        r"Hence the answer is $\boxed 9$.",
    ]
    train = [
        {"problem": f"Problem {i}?", "solution": s, "level": "Level 3", "type": "Algebra"}
        for i, s in enumerate(solutions)
    ]
    src = _saved(tmp_path / "hendrycks_math", {"train": train, "test": train[:1]})
    res = prepare_dataset("math", src, tmp_path / "out")
    assert res.output == tmp_path / "out" / "math.jsonl" and res.rows == 3
    rows = _read(res.output)
    assert [r["answer"] for r in rows] == [r"\frac{1}{2}", r"\{3, 4\}", "9"]
    assert rows[0] == {
        "problem": "Problem 0?",
        "answer": r"\frac{1}{2}",
        "id": "math-0",
        "source": "math",
        "level": "Level 3",
        "type": "Algebra",
    }
    # and the output is what the trainer / evaluator load
    problems = load_problems(res.output, "problem", "answer")
    assert problems[1].answer == r"\{3, 4\}" and problems[1].extra["source"] == "math"


def test_math500_hub_snapshot_jsonl(tmp_path):
    rows = [
        {
            "problem": "Compute $1+1$.",
            "solution": r"It is $\boxed{2}$.",
            "answer": "2",
            "subject": "Prealgebra",
            "level": 1,
            "unique_id": "test/prealgebra/1.json",
        },
        {
            "problem": "Simplify.",
            "solution": r"$\boxed{\dfrac{\sqrt{3}}{2}}$",
            "answer": r"\dfrac{\sqrt{3}}{2}",
            "subject": "Geometry",
            "level": 4,
            "unique_id": "test/geometry/2.json",
        },
    ]
    _jsonl(tmp_path / "MATH-500" / "test.jsonl", rows)
    res = prepare_dataset("math500", tmp_path / "MATH-500", tmp_path / "bench")
    out = _read(res.output)
    assert [(r["id"], r["answer"], r["subject"], r["level"]) for r in out] == [
        ("test/prealgebra/1.json", "2", "Prealgebra", 1),
        ("test/geometry/2.json", r"\dfrac{\sqrt{3}}{2}", "Geometry", 4),
    ]


def test_gsm8k_saved_dataset_defaults_to_test_split(tmp_path):
    train = [{"question": "train q", "answer": "x\n#### 1"}]
    test = [
        {
            "question": "Janet sells 1,500 eggs at $2. How much?",
            "answer": "1,500 * 2 = <<1500*2=3000>>3,000\n#### 3,000",
        },
        {"question": "How many?", "answer": "#### 18"},
    ]
    src = _saved(tmp_path / "gsm8k", {"train": train, "test": test})
    res = prepare_dataset("gsm8k", src, tmp_path / "gsm8k.jsonl")
    assert [r["answer"] for r in _read(res.output)] == ["3000", "18"]
    res = prepare_dataset("gsm8k", src, tmp_path / "gsm8k_train.jsonl", split="train")
    assert [r["problem"] for r in _read(res.output)] == ["train q"]
    with pytest.raises(DataError, match="split 'dev' not found"):
        prepare_dataset("gsm8k", src, tmp_path / "x.jsonl", split="dev")


def test_aime24_capitalised_fields_parquet(tmp_path):
    # Maxwell-Jia/AIME_2024: ID, Problem, Solution, Answer (an integer)
    rows = [
        {"ID": "2024-I-1", "Problem": "Every morning Aya walks...", "Solution": "...", "Answer": 204},
        {"ID": "2024-II-4", "Problem": "Let x, y and z be...", "Solution": "...", "Answer": 33},
    ]
    src = _parquet(tmp_path / "aime_2024_problems.parquet", rows)
    out = _read(prepare_dataset("aime24", src, tmp_path / "b").output)
    assert out == [
        {"problem": "Every morning Aya walks...", "answer": "204", "id": "2024-I-1", "source": "aime24"},
        {"problem": "Let x, y and z be...", "answer": "33", "id": "2024-II-4", "source": "aime24"},
    ]


def test_aime24_from_multi_year_mirror_keeps_2024(tmp_path):
    # AI-MO/aimo-validation-aime holds AIME 2022-2024; the url says which year a row is.
    url = "https://artofproblemsolving.com/wiki/index.php/{}_AIME_I_Problems/Problem_{}"
    rows = [
        {"id": i, "problem": f"p{i}", "solution": "s", "answer": f"0{i}{i}", "url": url.format(year, i)}
        for i, year in enumerate([2022, 2023, 2024, 2024], start=1)
    ]
    _parquet(tmp_path / "aimo" / "data" / "train-00000-of-00001.parquet", rows)
    res = prepare_dataset("aime24", tmp_path / "aimo", tmp_path / "b")
    assert res.rows == 2 and res.other_years == 2 and "left out 2 rows of other years" in res.summary()
    assert [r["answer"] for r in _read(res.output)] == ["33", "44"]  # "033" -> "33"
    assert prepare_dataset("aime24", tmp_path / "aimo", tmp_path / "all.jsonl", all_years=True).rows == 4


def test_aime25_opencompass_two_jsonl_files(tmp_path):
    # opencompass/AIME2025: AIME2025-I.jsonl and AIME2025-II.jsonl, question / answer
    _jsonl(tmp_path / "AIME2025" / "aime2025-I.jsonl", [{"question": "Find the sum...", "answer": "70"}])
    _jsonl(tmp_path / "AIME2025" / "aime2025-II.jsonl", [{"question": "Six points...", "answer": "240"}])
    out = _read(prepare_dataset("aime25", tmp_path / "AIME2025", tmp_path / "b").output)
    assert [(r["problem"], r["answer"], r["id"]) for r in out] == [
        ("Find the sum...", "70", "aime25-0"),
        ("Six points...", "240", "aime25-1"),
    ]


def test_aime25_yentinglin_year_field(tmp_path):
    rows = [{"id": 0, "problem": "p", "solution": "s", "answer": "70", "url": "u", "year": 2025}]
    _parquet(tmp_path / "aime_2025" / "data" / "train-00000-of-00001.parquet", rows)
    assert _read(prepare_dataset("aime2025", tmp_path / "aime_2025", tmp_path / "b").output)[0]["answer"] == "70"


def test_amc23_float_answers(tmp_path):
    # AI-MO/aimo-validation-amc: answers are floats, 2022 and 2023 problems mixed
    rows = [
        {"id": 0, "problem": "amc 2023 a", "answer": 27.0, "url": "https://aops.com/2023_AMC_12A_Problems/Problem_1"},
        {"id": 1, "problem": "amc 2022", "answer": 3.0, "url": "https://aops.com/2022_AMC_12B_Problems/Problem_9"},
        {"id": 2, "problem": "amc 2023 b", "answer": 0.5, "url": "https://aops.com/2023_AMC_12B_Problems/Problem_3"},
    ]
    src = _parquet(tmp_path / "amc.parquet", rows)
    out = _read(prepare_dataset("amc23", src, tmp_path / "b").output)
    assert [(r["problem"], r["answer"]) for r in out] == [("amc 2023 a", "27"), ("amc 2023 b", "0.5")]


def test_acereason_parquet_and_minerva_json_array(tmp_path):
    src = _parquet(
        tmp_path / "ace" / "math.parquet",
        [{"problem": "Find n.", "answer": r"$\boxed{12}$"}, {"problem": "Find m.", "answer": r"\frac{7}{3}"}],
    )
    assert [r["answer"] for r in _read(prepare_dataset("acereason_math", src, tmp_path / "b").output)] == [
        "12",
        r"\frac{7}{3}",
    ]
    # math-ai/minervamath: question / answer; the original release: problem / solution with \boxed
    arr = tmp_path / "minerva.json"
    arr.write_text(
        json.dumps(
            [
                {"question": "Compute the flux.", "answer": "4.5e-3", "idx": 7},
                {"problem": "Estimate T.", "solution": r"So $T=\boxed{300}$ K."},
            ]
        )
    )
    out = _read(prepare_dataset("minerva", arr, tmp_path / "b").output)
    assert [(r["problem"], r["answer"], r["id"]) for r in out] == [
        ("Compute the flux.", "4.5e-3", "7"),
        ("Estimate T.", "300", "minerva_math-1"),
    ]


def test_custom_output_keys_match_data_config(tmp_path):
    src = _jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "#### 4"}])
    res = prepare_dataset("gsm8k", src, tmp_path / "o.jsonl", prompt_key="prompt", answer_key="target")
    assert _read(res.output) == [{"prompt": "q", "target": "4", "id": "gsm8k-0", "source": "gsm8k"}]
    assert load_problems(res.output, "prompt", "target")[0].answer == "4"


# --- errors --------------------------------------------------------------------------------------


def test_unfit_fields_name_file_row_and_fields(tmp_path):
    src = _jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "#### 1"}, {"text": "q2", "label": "2"}])
    with pytest.raises(DataError) as e:
        prepare_dataset("gsm8k", src, tmp_path / "o.jsonl")
    msg = str(e.value)
    assert str(src) in msg and "line 2" in msg and "fields found: text, label" in msg and "question" in msg
    assert not (tmp_path / "o.jsonl").exists()  # nothing half-written


def test_answer_that_cannot_be_extracted(tmp_path):
    src = _parquet(
        tmp_path / "m.parquet",
        [{"problem": "p", "solution": r"\boxed{1}"}, {"problem": "p2", "solution": "the answer is one"}],
    )
    with pytest.raises(
        DataError, match=r"m\.parquet: row 1: no answer could be extracted: 'solution' is not a solution with \\boxed"
    ):
        prepare_dataset("math", src, tmp_path / "o.jsonl")
    res = prepare_dataset("math", src, tmp_path / "o.jsonl", skip_bad_rows=True)
    assert res.rows == 1 and len(res.skipped) == 1 and "row 1" in res.skipped[0]


def test_unknown_name_and_missing_source(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'aime23'"):
        find_format("aime23")
    with pytest.raises(DataError, match="downloads nothing"):
        prepare_dataset("gsm8k", tmp_path / "absent", tmp_path / "o.jsonl")
    assert set(FORMATS) == {"math", "acereason_math", "math500", "aime24", "aime25", "amc23", "gsm8k", "minerva_math"}


def test_cli_prepare_and_error(tmp_path):
    src = _jsonl(tmp_path / "test.jsonl", [{"question": "q", "answer": "a\n#### 1,000"}])
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "nemo_igrpo", "data", "prepare", "gsm8k", str(src), str(tmp_path / "bench")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"gsm8k: wrote 1 problems to {tmp_path / 'bench' / 'gsm8k.jsonl'}" in proc.stdout
    assert _read(tmp_path / "bench" / "gsm8k.jsonl")[0]["answer"] == "1000"
    proc = subprocess.run(
        [sys.executable, "-m", "nemo_igrpo", "data", "prepare", "math", str(src), str(tmp_path / "o")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("igrpo data: error: ") and "line 1" in proc.stderr
