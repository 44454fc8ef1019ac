"""The real `igrpo` command on bad input: exit code 2, one line naming the file / key / sample, no
traceback, and nothing built or written first. Runs `python -m nemo_igrpo` as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_igrpo import cli
from nemo_igrpo.utils.errors import DataError

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "conf" / "base.yaml"


def igrpo(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    run_env.pop("RANK", None)
    run_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "nemo_igrpo", *map(str, args)],
        cwd=REPO,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_line(proc: subprocess.CompletedProcess, command: str = "train") -> str:
    """The one error line; fails on a traceback, a second error line or another exit code."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"igrpo {command}: error")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def only_line(proc: subprocess.CompletedProcess, command: str = "train") -> str:
    """As error_line, for errors raised while loading the config: then stderr holds nothing else."""
    line = error_line(proc, command)
    assert proc.stderr.strip() == line, proc.stderr[-3000:]
    return line


def good_data(tmp_path: Path) -> Path:
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps({"problem": f"What is {i}+1?", "answer": str(i + 1)}) + "\n" for i in range(20)))
    return p


# --- config errors: before any model or engine ---------------------------------------------------------


def test_tensor_parallel_that_does_not_divide_the_heads(tmp_path):
    run_dir = tmp_path / "run"
    proc = igrpo(
        "train", BASE, f"data.train_path={good_data(tmp_path)}", f"run.dir={run_dir}", "policy.tensor_parallel_size=3"
    )
    line = only_line(proc)
    assert line.startswith(
        f"igrpo train: error: {BASE}: 'policy.tensor_parallel_size': 3 does not divide the model's "
        "4 attention heads (policy.model.tiny.num_attention_heads)"
    )
    assert not run_dir.exists()  # nothing written: config.yaml comes after the checks


def test_unknown_reward_term(tmp_path):
    run_dir = tmp_path / "run"
    proc = igrpo(
        "train",
        BASE,
        f"data.train_path={good_data(tmp_path)}",
        f"run.dir={run_dir}",
        "reward.terms=[{name: math_accuracy}, {name: formatt}]",
    )
    line = only_line(proc)
    assert (
        "'reward.terms[1].name': reward term 'formatt' is not registered" in line and "(did you mean 'format'?)" in line
    )
    assert not run_dir.exists()


def test_multi_line_yaml_error_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults: [base\ntrainer:\n  max_steps: 3\n")
    line = only_line(igrpo("eval", bad), "eval")
    assert f"{bad}: not valid YAML" in line


def test_model_folder_missing_for_train(tmp_path):
    proc = igrpo(
        "train",
        BASE,
        f"data.train_path={good_data(tmp_path)}",
        f"run.dir={tmp_path / 'run'}",
        f"policy.model.hf_path={tmp_path / 'no_model'}",
    )
    assert f"policy.model.hf_path: {tmp_path / 'no_model'} is not a directory" in only_line(proc)


# --- errors raised after the config loaded: data, then the model ---------------------------------------


def test_non_utf8_data_names_file_and_line(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes(b'{"problem": "ok", "answer": "1"}\n{"problem": "caf\xe9", "answer": "2"}\n')
    run_dir = tmp_path / "run"
    line = error_line(igrpo("train", BASE, f"data.train_path={data}", f"run.dir={run_dir}"))
    assert f"error: {data}: line 2: not valid UTF-8 (byte 0xe9" in line
    assert not (run_dir / "config.yaml").exists()  # failed before the actor was built


def test_structured_prompt_names_file_line_and_field(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"problem": [{"role": "user", "content": "hi"}], "answer": "1"}) + "\n")
    line = error_line(igrpo("train", BASE, f"data.train_path={data}", f"run.dir={tmp_path / 'run'}"))
    assert f"{data}: line 1: field 'problem' (data.prompt_key) is a list" in line


def test_unsupported_model_under_train(tmp_path):
    from nemo_igrpo.utils.tiny_model import make_char_tokenizer

    model = tmp_path / "gpt2"
    make_char_tokenizer(model)
    (model / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "num_attention_heads": 32, "num_key_value_heads": 8})
    )
    run_dir = tmp_path / "run"
    # A data file with a bad line too: the model is checked first, before data and megatron set-up.
    data = tmp_path / "bad.jsonl"
    data.write_text("not json\n")
    line = only_line(
        igrpo("train", BASE, f"data.train_path={data}", f"run.dir={run_dir}", f"policy.model.hf_path={model}")
    )
    assert line.startswith(
        f"igrpo train: error: {model / 'config.json'}: architecture GPT2LMHeadModel is not supported yet"
    ), line
    assert not run_dir.exists()


# --- torchrun: every rank exits 2, rank 0 alone prints -------------------------------------------------


def test_only_rank_zero_prints(tmp_path):
    args = ("train", BASE, f"data.train_path={good_data(tmp_path)}", "policy.tensor_parallel_size=3")
    other = igrpo(*args, env={"RANK": "1"})
    assert other.returncode == 2 and other.stderr.strip() == ""
    assert "policy.tensor_parallel_size" in only_line(igrpo(*args, env={"RANK": "0"}))


# --- in process: which exceptions become one line ------------------------------------------------------


def test_user_errors_become_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    def data_error(args):
        raise DataError("train.jsonl: line 4: something\nspanning lines")

    monkeypatch.setattr(cli, "_cmd_plot", data_error)
    assert cli.main(["plot", "runs/x"]) == 2
    assert capsys.readouterr().err == "igrpo plot: error: train.jsonl: line 4: something spanning lines\n"

    def bug(args):
        raise KeyError("a bug, not bad input")

    monkeypatch.setattr(cli, "_cmd_plot", bug)
    with pytest.raises(KeyError):
        cli.main(["plot", "runs/x"])


def test_unsupported_model_error_is_a_user_error_once_its_module_is_loaded():
    from nemo_igrpo.policy.model import UnsupportedModelError
    from nemo_igrpo.utils.errors import user_error_types

    assert issubclass(UnsupportedModelError, user_error_types())
