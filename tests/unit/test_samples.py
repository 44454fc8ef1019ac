"""samples.jsonl (utils/samples.py): writing the rollout's records with a size bound, dropping
steps after a resume point, reading them back, `igrpo samples`, and TensorBoard text."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from nemo_igrpo.utils.samples import SampleLog, _clean, format_record, read_samples, select


def _record(step: int, index: int = 7, text_len: int = 20) -> dict:
    # The shape RolloutBatch.records has (algorithms/rollout.py, IGRPORollout._record).
    return {
        "step": step,
        "problem_index": index,
        "problem": "max(38,45)=",
        "answer": "45",
        "drafts": [
            {"text": "<answer>38</answer>", "reward": np.float64(0.0), "correct": np.bool_(False)},
            {"text": "<answer>45</answer>" + "x" * text_len, "reward": 1.0, "correct": True},
        ],
        "chosen_draft": 1,
        "rounds": [
            {
                "conditioned": True,
                "draft_truncated": False,
                "refinements": [
                    {"text": "<answer>45</answer>\nsecond line", "reward": 1.0, "advantage": 0.7071},
                    {"text": "<answer>4</answer>", "reward": 0.0, "advantage": float("nan")},
                ],
            }
        ],
    }


def test_write_read_and_select(tmp_path):
    log = SampleLog(tmp_path, max_mb=1)
    for step in (1, 2, 3):
        assert log.write([_record(step, 1), _record(step, 2)])
    recs = read_samples(tmp_path)
    assert len(recs) == 6
    assert recs[0]["drafts"][0]["correct"] is False  # numpy scalars stored as JSON values
    assert recs[0]["rounds"][0]["refinements"][1]["advantage"] == "nan"  # JSON has no NaN
    assert [r["step"] for r in select(recs)] == [3, 3]  # default: the latest step
    assert [r["problem_index"] for r in select(recs, step=2, limit=1)] == [1]
    from nemo_igrpo.utils.errors import UserError

    with pytest.raises(UserError, match=r"steps 1-3"):
        select(recs, step=9)


def test_size_bound_stops_writing_with_one_warning(tmp_path, caplog):
    one = len(json.dumps(_clean(_record(1, text_len=2000)))) + 1
    log = SampleLog(tmp_path, max_mb=2.5 * one / 2**20)
    with caplog.at_level(logging.WARNING, logger="nemo_igrpo.utils.samples"):
        results = [log.write([_record(s, text_len=2000)]) for s in range(1, 6)]
    assert results == [True, True, False, False, False]
    assert (tmp_path / "samples.jsonl").stat().st_size <= 2.5 * one
    assert sum("samples_max_mb" in r.getMessage() for r in caplog.records) == 1


def test_resume_drops_later_steps_and_zero_disables(tmp_path):
    log = SampleLog(tmp_path, max_mb=1)
    for step in (1, 2, 3):
        log.write([_record(step)])
    log.truncate(2)
    assert [r["step"] for r in read_samples(tmp_path)] == [1, 2]
    off = SampleLog(tmp_path / "off", max_mb=1, enabled=False)
    assert not off.write([_record(1)]) and not (tmp_path / "off" / "samples.jsonl").exists()


def test_format_record_shows_every_part():
    text = format_record(_clean(_record(4)))
    lines = text.splitlines()
    assert "step 4  problem 7  reference answer: 45" in text
    assert "    max(38,45)=" in lines  # the prompt, indented
    assert any(l.startswith("  draft 1  reward 1.000  correct  <- chosen") for l in lines)
    assert any(l.startswith("  draft 0  reward 0.000  wrong") for l in lines)
    assert "chosen draft: 1" in lines
    assert "refinements, round 1 (2, conditioned on the chosen draft):" in lines
    assert "  refinement 0  reward 1.000  advantage +0.707" in lines
    assert "      second line" in lines  # the model's newlines are kept, indented


def test_samples_cli(tmp_path, capsys):
    from nemo_igrpo.cli import main

    log = SampleLog(tmp_path, max_mb=1)
    log.write([_record(1, 11), _record(1, 12)])
    log.write([_record(2, 21), _record(2, 22)])
    assert main(["samples", str(tmp_path), "--step", "1", "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "problem 11" in out and "problem 12" not in out and "problem 21" not in out
    assert main(["samples", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "problem 21" in out and "problem 22" in out
    assert main(["samples", str(tmp_path / "nope")]) == 2
    assert "no samples file" in capsys.readouterr().err


def test_tensorboard_text(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nemo_igrpo.config.schema import LoggingConfig
    from nemo_igrpo.utils.metrics_log import MetricsLogger

    logger = MetricsLogger(tmp_path, LoggingConfig(tensorboard=True), "t", enabled=True)
    logger.log_samples(3, [_record(3)])
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    assert "samples/text_summary" in tags, tags
    event = acc.Tensors("samples/text_summary")[0]
    assert event.step == 3
    assert b"reference answer: 45" in event.tensor_proto.string_val[0]
