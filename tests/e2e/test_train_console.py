"""End-to-end: what `igrpo train` and `igrpo eval` show on the terminal, as real processes with
vLLM (CPU build) colocated and the megatron-core actor, so the libraries' real noise is there.

One shared quiet training run serves several checks: the terminal holds only the project's
lines, logs/rank0.log holds vLLM's and megatron's, samples.jsonl and TensorBoard text hold what
the model wrote and `igrpo samples` prints it. `--verbose` is checked on `igrpo eval` (the same
session code, a cheaper process); a bad-data run still prints its one-line error.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO
from test_train_tiny import DEMO_CONF, _env, _overrides

# Everything the quiet terminal may show: the project's lines, the step summary, the progress bar.
_ALLOWED = [re.compile(p) for p in (r"^\[igrpo\] ", r"^step \d+/\d+ \| draft ", r"^train:")]


def _run(args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nemo_igrpo", *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _terminal_lines(proc: subprocess.CompletedProcess) -> list[str]:
    # The progress bar redraws with carriage returns: each redraw is a line of its own here.
    text = proc.stdout + "\n" + proc.stderr
    return [seg.strip() for seg in re.split(r"[\r\n]", text) if seg.strip()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from nemo_igrpo.demo.task import split_pairs, write_jsonl

    d = tmp_path_factory.mktemp("console_data")
    train, held_out = split_pairs(0, 8)
    write_jsonl(train[:64], d / "train.jsonl")
    write_jsonl(held_out, d / "eval.jsonl")
    return d


@pytest.fixture(scope="module")
def quiet_run(tiny_llama_dir, data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("console") / "run"
    ov = _overrides(
        tiny_llama_dir,
        data_dir,
        run_dir,
        "trainer.max_steps=1",
        "trainer.export_hf=false",
        "logging.samples_per_step=3",
    )
    proc = _run(["train", str(DEMO_CONF), *ov])
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return run_dir, proc


def test_quiet_terminal_shows_only_the_projects_lines(quiet_run):
    run_dir, proc = quiet_run
    lines = _terminal_lines(proc)
    stray = [l for l in lines if not any(p.match(l) for p in _ALLOWED)]
    assert not stray, "lines from other libraries on the terminal:\n" + "\n".join(stray[:30])
    out = proc.stdout
    assert f"run dir {run_dir}" in out and str(run_dir / "logs" / "rank0.log") in out
    assert "[igrpo] step 0 (before training): held-out accuracy" in out
    assert re.search(r"^step 1/1 \| draft .* \| eval acc \d\.\d{3}$", out, re.M), out
    assert "train:" in proc.stderr  # the progress bar


def test_log_holds_the_libraries_output(quiet_run):
    run_dir, _ = quiet_run
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "EngineCore" in log or "vllm" in log  # vLLM, including its engine core child process
    assert "megatron" in log
    assert "step 1/1 | draft" in log  # the project's lines too, so the log reads as the whole run


def test_samples_file_tensorboard_and_cli(quiet_run):
    run_dir, _ = quiet_run
    recs = [json.loads(l) for l in (run_dir / "samples.jsonl").read_text().splitlines() if l.strip()]
    assert len(recs) == 3 and {r["step"] for r in recs} == {1}
    for r in recs:
        assert len(r["drafts"]) == 2 and r["chosen_draft"] in (0, 1)
        refs = r["rounds"][0]["refinements"]
        assert len(refs) == 2 and all({"text", "reward", "advantage"} <= set(x) for x in refs)
    events = b"".join(p.read_bytes() for p in (run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert b"samples/text_summary" in events
    proc = _run(["samples", str(run_dir), "--step", "1", "--limit", "2"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("reference answer:") == 2
    assert "<- chosen" in proc.stdout and "advantage" in proc.stdout


def test_verbose_eval_shows_the_libraries(tiny_llama_dir, data_dir, tmp_path):
    proc = _run(
        [
            "eval",
            str(DEMO_CONF),
            f"policy.model.hf_path={tiny_llama_dir}",
            f"data.train_path={data_dir / 'train.jsonl'}",
            f"data.eval_path={data_dir / 'eval.jsonl'}",
            f"run.dir={tmp_path / 'run'}",
            "eval.num_samples=1",
            "generation.max_new_tokens=8",
            "--checkpoint",
            str(tiny_llama_dir),
            "--verbose",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    terminal = proc.stdout + proc.stderr
    assert "EngineCore" in terminal or "vllm" in terminal.lower()
    assert "pass@1 (avg)" in proc.stdout
    assert not (tmp_path / "run" / "logs").exists()


def test_bad_data_prints_its_one_line_error(tiny_llama_dir, data_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1=", "answer": "2"}\n{"problem": "2+2="}\n')
    proc = _run(
        ["train", str(DEMO_CONF), *_overrides(tiny_llama_dir, data_dir, tmp_path / "run", f"data.train_path={bad}")],
        timeout=120,
    )
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("igrpo train: error: ") and "line 2" in err[0], proc.stderr
    assert "Traceback" in (tmp_path / "run" / "logs" / "rank0.log").read_text()
