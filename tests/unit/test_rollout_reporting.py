"""What the rollout reports about bad input: a problem whose prompt can never fit (named by its file
and line, logged once, counted) and a reward term that fails on every sample (counted per step,
then the run stops). Reuses test_rollout's scripted backend: texts are known by hand."""

from __future__ import annotations

import json
import logging

import pytest

from nemo_igrpo.data.datasets import load_problems
from nemo_igrpo.rewards.config import RewardConfig, RewardTermConfig
from nemo_igrpo.rewards.manager import RewardManager
from nemo_igrpo.utils.errors import RewardTermFailing
from test_rollout import BASE_SCRIPT, P1, P2, make_rollout, tok  # noqa: F401 - tok is a fixture


@pytest.fixture
def rewards():
    with RewardManager(RewardConfig(num_workers=0)) as manager:
        yield manager


def test_a_problem_that_never_fits_is_named_by_file_and_line_and_counted(tok, rewards, tmp_path, caplog):
    data = tmp_path / "train.jsonl"
    rows = [
        {"problem": P1.prompt, "answer": "5"},
        {"problem": "Explain " + "very " * 200 + "carefully.", "answer": "1"},
        {"problem": P2.prompt, "answer": "9"},
    ]
    # A blank line first: the long problem is at position 1 but on line 3 of the file.
    data.write_text("\n" + "".join(json.dumps(r) + "\n" for r in rows))
    p1, long, p2 = load_problems(data, "problem", "answer")
    script = {k: v * 2 for k, v in BASE_SCRIPT.items()}  # two steps' worth of texts
    rollout, _ = make_rollout(tok, rewards, script)
    with caplog.at_level(logging.WARNING, logger="nemo_igrpo.algorithms.rollout"):
        first = rollout.run([p1, long, p2], step=1)
        second = rollout.run([long, p1, p2], step=2)
    assert f"{data}: line 3: prompt is longer than the prompt budget" in caplog.text
    assert "generation.max_prompt_tokens" in caplog.text and "problem 1:" not in caplog.text
    assert caplog.text.count("prompt is longer than the prompt budget") == 1  # once per problem, not per step
    assert first.metrics["samples/unfit"] == 1 and second.metrics["samples/unfit"] == 1
    assert second.metrics["samples/unfit_problems_total"] == 1
    assert len(second.samples) == 8  # the two problems that fit are trained on


def always_fails(prompt, response, reference):
    raise RuntimeError("grader service unreachable")


def test_a_reward_term_failing_everywhere_is_a_step_metric_and_stops_the_run(tok, tmp_path):
    term = f"{__name__}:always_fails"
    cfg = RewardConfig(
        num_workers=0,
        max_failing_steps=2,
        terms=[RewardTermConfig("math_accuracy"), RewardTermConfig("format"), RewardTermConfig(term)],
    )
    script = {k: v * 2 for k, v in BASE_SCRIPT.items()}
    with RewardManager(cfg) as manager:
        rollout, _ = make_rollout(tok, manager, script)
        batch = rollout.run([P1, P2], step=1)
        # Drafts (2 x 4) and refinements (2 x 4) of the step, all failed for that term only.
        assert batch.metrics[f"reward/{term}/errors"] == 16 and batch.metrics[f"reward/{term}/failing_steps"] == 1
        assert batch.metrics["reward/format/errors"] == 0
        with pytest.raises(
            RewardTermFailing,
            match=f"reward term '{term}' failed on every sample for 2 consecutive "
            "steps .*RuntimeError: grader service unreachable",
        ):
            rollout.run([P1, P2], step=2)
