"""End-to-end: the paper's evaluation suite, `igrpo eval --suite paper`, on tiny fixture sets.

The six benchmarks are written in the formats they were published in, converted with the data
preparation the users run (`prepare_dataset`, as `igrpo data prepare`), and evaluated single-shot
by two tiny models side by side through a real generation backend (the in-framework Megatron
one: the cheapest on CPU), with small sample counts given on the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, max_demo_warm_start

DEMO_CONF = REPO / "conf" / "demo.yaml"
PAPER_COLUMNS = ["AIME25", "AIME24", "MATH500", "AMC", "GSM8K", "Minerva", "Average"]


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


# The demo's shipped warm start answers "max(a,b)=" right about two times in three, so the table
# holds real, non-zero Pass@1 values; the random tiny model scores (almost) nothing beside it.
WARM_START = max_demo_warm_start()
PAIRS = [
    (38, 45),
    (71, 12),
    (50, 59),
    (23, 88),
    (64, 46),
    (17, 93),
    (80, 28),
    (35, 53),
    (92, 29),
    (44, 47),
    (66, 61),
    (19, 91),
]


def _max_rows(start: int) -> list[tuple[str, int]]:
    return [(f"max({a},{b})=", max(a, b)) for a, b in PAIRS[start : start + 2]]


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory) -> Path:
    """Two problems per benchmark, published layouts and field names, prepared into one folder."""
    from nemo_igrpo.data.prepare import prepare_dataset

    src = tmp_path_factory.mktemp("published")
    out = tmp_path_factory.mktemp("benchmarks")
    url = "https://artofproblemsolving.com/wiki/index.php/{}_Problems/Problem_{}"
    sources = {
        # opencompass/AIME2025: question / answer (strings), one JSONL per exam
        "aime25": _jsonl(
            src / "AIME2025" / "aime2025-I.jsonl", [{"question": q, "answer": str(a)} for q, a in _max_rows(0)]
        ),
        # Maxwell-Jia/AIME_2024: ID / Problem / Solution / Answer (an integer), Parquet
        "aime24": _parquet(
            src / "aime24.parquet",
            [
                {"ID": f"2024-I-{i}", "Problem": q, "Solution": "-", "Answer": a}
                for i, (q, a) in enumerate(_max_rows(2))
            ],
        ),
        # HuggingFaceH4/MATH-500: problem / solution / answer / subject / level / unique_id
        "math500": _jsonl(
            src / "math500" / "test.jsonl",
            [
                {
                    "problem": q,
                    "solution": f"$\\boxed{{{a}}}$",
                    "answer": str(a),
                    "subject": "Algebra",
                    "level": 1,
                    "unique_id": f"test/algebra/{i}.json",
                }
                for i, (q, a) in enumerate(_max_rows(4))
            ],
        ),
        # AI-MO/aimo-validation-amc: float answers, years in the url, a hub Parquet snapshot
        "amc23": _parquet(
            src / "amc" / "data" / "train-00000-of-00001.parquet",
            [
                {"id": i, "problem": q, "answer": float(a), "url": url.format("2023_AMC_12A", i)}
                for i, (q, a) in enumerate(_max_rows(6))
            ],
        ),
        # openai/gsm8k: question / answer ending "#### N"
        "gsm8k": _jsonl(
            src / "gsm8k" / "test.jsonl",
            [{"question": q, "answer": f"The larger one.\n#### {a}"} for q, a in _max_rows(8)],
        ),
        # math-ai/minervamath: question / answer
        "minerva_math": _jsonl(src / "minerva.jsonl", [{"question": q, "answer": str(a)} for q, a in _max_rows(10)]),
    }
    for name, path in sources.items():
        assert prepare_dataset(name, path, out).rows == 2
    return out


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}


def _eval_cmd(model: Path, bench_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "nemo_igrpo",
        "eval",
        str(DEMO_CONF),
        f"policy.model.hf_path={model}",
        f"data.train_path={bench_dir / 'gsm8k.jsonl'}",
        "data.eval_path=null",
        "generation.backend=megatron",
        "generation.max_new_tokens=24",
        "reward.num_workers=0",
        "--suite",
        "paper",
        "--data-dir",
        str(bench_dir),
        *extra,
    ]


def test_paper_suite_side_by_side(tiny_llama_dir, bench_dir, tmp_path):
    out = tmp_path / "suite.json"
    cmd = _eval_cmd(
        WARM_START,
        bench_dir,
        "--checkpoint",
        str(WARM_START),
        "--checkpoint",
        str(tiny_llama_dir),
        "--labels",
        "warm",
        "random",
        "--samples",
        "aime24=3",
        "--samples",
        "2",
        "--output",
        str(out),
    )
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    # The printed table: the protocol line, the paper's column order, both rows and their difference.
    lines = proc.stdout.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("suite paper:"))
    protocol, head, row_a, row_b, diff = lines[top : top + 5]
    assert "T=0.6" in protocol and "top-p=0.95" in protocol and "NOT the suite's protocol" in protocol
    assert "aime24: 3 samples instead of 64" in protocol and "math500: 2 samples instead of 8" in protocol
    assert head.split() == ["model"] + PAPER_COLUMNS
    assert row_a.split()[0] == "warm" and row_b.split()[0] == "random" and diff.split()[:3] == ["random", "-", "warm"]
    assert len(row_a.split()) == 8 and len(diff.split()) == 10

    report = json.loads(out.read_text())
    assert (
        report["suite"] == "paper" and report["settings"]["temperature"] == 0.6 and report["settings"]["top_p"] == 0.95
    )
    assert [b["name"] for b in report["benchmarks"]] == [
        "aime25",
        "aime24",
        "math500",
        "amc23",
        "gsm8k",
        "minerva_math",
    ]
    assert [r["label"] for r in report["rows"]] == ["warm", "random"]
    for row in report["rows"]:
        res = row["results"]
        assert {name: r["num_samples"] for name, r in res.items()} == {
            "aime25": 2,
            "aime24": 3,
            "math500": 2,
            "amc23": 2,
            "gsm8k": 2,
            "minerva_math": 2,
        }
        assert all(r["num_problems"] == 2 and 0.0 <= r["accuracy"] <= 1.0 for r in res.values())
        assert row["average"] == pytest.approx(sum(r["accuracy"] for r in res.values()) / 6)
    a, b = (row["results"] for row in report["rows"])
    assert report["difference"]["gsm8k"] == pytest.approx(b["gsm8k"]["accuracy"] - a["gsm8k"]["accuracy"])
    assert report["difference"]["average"] == pytest.approx(report["rows"][1]["average"] - report["rows"][0]["average"])
    # Real scores: the warm start solves some problems, the random model fewer; the table's text
    # shows the same numbers as the report (2 decimals, in %).
    warm, rand = report["rows"]
    assert warm["average"] > 0.2 and warm["average"] > rand["average"], (warm["average"], rand["average"])
    assert row_a.split()[-1] == f"{100 * warm['average']:.2f}"
    assert diff.split()[-1] == f"{100 * report['difference']['average']:+.2f}"
    md = out.with_suffix(".md").read_text()
    assert "| model | AIME25 | AIME24 | MATH500 | AMC | GSM8K | Minerva | Average |" in md


def test_missing_benchmark_file_fails_before_loading_a_model(tiny_llama_dir, bench_dir, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "gsm8k.jsonl").write_text((bench_dir / "gsm8k.jsonl").read_text())
    proc = subprocess.run(
        _eval_cmd(tiny_llama_dir, partial), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("igrpo eval: error: suite 'paper': benchmark file(s) missing: ")
    assert f"{partial / 'aime25.jsonl'} (igrpo data prepare aime25 SRC {partial})" in line
    assert "gsm8k.jsonl" not in line.split("missing:")[1]
