"""RewardManager with real worker processes: weighted sums, isolation of bad samples, timeouts."""

from __future__ import annotations

import logging
import math
import os
import sys
import time

import numpy as np
import pytest

from nemo_igrpo.rewards.base import RewardSample
from nemo_igrpo.rewards.config import RewardConfig, RewardTermConfig
from nemo_igrpo.rewards.manager import RewardConfigError, RewardManager, check_reward_config
from nemo_igrpo.rewards.registry import register_reward

TIMEOUT_S = 3.0


# User reward functions, reached by the workers through their import path (this module's name,
# whatever pytest imported it as). Their behaviour is chosen by a marker in the response.
def misbehaving_reward(prompt, response, reference, bonus=1.0):
    if "RAISE" in response:
        raise RuntimeError("user reward failed on purpose")
    if "HANG" in response:
        time.sleep(3600)
    if "NAN" in response:
        return math.nan
    if "INF" in response:
        return math.inf
    if "BIG" in response:
        return 5.0
    if "TEXT" in response:
        return "1.0"
    if "EXIT" in response:
        os._exit(3)  # the worker process dies
    if "QUIT" in response:
        sys.exit(0)  # a reward that "gives up" the way a script would
    return bonus


def worker_pid(prompt, response, reference):
    return float(os.getpid() % 1000) / 1000


USER_TERM = f"{__name__}:misbehaving_reward"


def make_config(**overrides) -> RewardConfig:
    cfg = RewardConfig(
        # math-verify's own bounds (1 s) below the manager's, as with the defaults (2 s vs 10 s)
        terms=[
            RewardTermConfig("math_accuracy", 1.0, kwargs={"parse_timeout_s": 1, "verify_timeout_s": 1}),
            RewardTermConfig("format", 1.0),
            RewardTermConfig(USER_TERM, 0.5, kwargs={"bonus": 1.0}),
        ],
        num_workers=2,
        timeout_s=TIMEOUT_S,
        fallback_score=0.0,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def manager():
    with RewardManager(make_config()) as m:
        yield m


def sample(answer: str, reference=12, extra: str = "") -> RewardSample:
    return RewardSample("What is 5 + 7?", f"<think>5 + 7{extra}</think><answer>{answer}</answer>", reference)


def test_weighted_sum_and_correctness(manager):
    samples = [sample("12"), sample("13"), RewardSample("q", "12", 12), sample("\\frac{1}{2}", "0.5")]
    out = manager.score(samples)
    np.testing.assert_array_equal(out.per_term["math_accuracy"], [1, 0, 0, 1])
    np.testing.assert_array_equal(out.per_term["format"], [1, 1, 0, 1])
    np.testing.assert_array_equal(out.per_term[USER_TERM], [1, 1, 1, 1])
    np.testing.assert_allclose(out.scores, [2.5, 1.5, 0.5, 2.5])
    np.testing.assert_array_equal(out.correct, [True, False, False, True])
    assert out.metrics["reward/errors"] == 0 and out.metrics["reward/timeouts"] == 0
    assert out.metrics["reward/correct_frac"] == 0.5
    assert out.metrics["reward/mean"] == pytest.approx(1.75)


def test_bad_samples_get_the_fallback_and_are_counted(manager, caplog):
    markers = ["", "RAISE", "NAN", "INF", "BIG", "TEXT", "EXIT", "HANG", ""]
    samples = [sample("12", extra=f" {m}") for m in markers]
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="nemo_igrpo.rewards.manager"):
        out = manager.score(samples)
    elapsed = time.monotonic() - started
    user = out.per_term[USER_TERM]
    np.testing.assert_array_equal(user, [1, 0, 0, 0, 0, 0, 0, 0, 1])
    # the other terms of the same samples are unaffected
    np.testing.assert_array_equal(out.per_term["math_accuracy"], [1] * 9)
    np.testing.assert_array_equal(out.per_term["format"], [1] * 9)
    np.testing.assert_allclose(out.scores, [2.5] + [2.0] * 7 + [2.5])
    m = out.metrics
    assert m["reward/errors"] == 3  # raise, non-number, dead worker
    assert m["reward/nonfinite"] == 2
    assert m["reward/out_of_range"] == 1
    assert m["reward/timeouts"] == 1
    # per term: every kind of failure of the user term, none of the others
    assert m[f"reward/{USER_TERM}/errors"] == 7 and m["reward/math_accuracy/errors"] == 0
    # one hang costs one timeout, not one per queued sample
    assert elapsed < TIMEOUT_S + 6
    errors = [r.getMessage() for r in caplog.records if "error on sample" in r.getMessage()]
    assert len(errors) == 1 and "sample 1" in errors[0] and "user reward failed on purpose" in errors[0]
    assert "Response starts: '<think>5 + 7 RAISE" in errors[0]
    assert any("timeout on sample 7" in r.getMessage() for r in caplog.records)
    # the pool recovered: the next batch is scored normally
    out = manager.score([sample("12")])
    assert out.scores.tolist() == [2.5] and out.metrics["reward/errors"] == 0


def test_pathological_math_answers_finish_within_the_timeout(manager):
    responses = [
        "\\boxed{9^{9^{9^9}}}",
        "<answer>9^{9^{9^9}}</answer>",
        "<answer>" + "+".join(["x"] * 5000) + "</answer>",
        "\\boxed{" + "(" * 400 + "1" + ")" * 400 + "}",
        "\\boxed{" * 3000 + "1",
        "<answer>" + "\\frac{1}{" * 200 + "2" + "}" * 200 + "</answer>",
    ]
    started = time.monotonic()
    out = manager.score([RewardSample("q", r, 12) for r in responses])
    assert out.metrics["reward/timeouts"] == 0  # math-verify's own bounds, not the kill, ended them
    assert time.monotonic() - started < 2 * TIMEOUT_S
    np.testing.assert_array_equal(out.per_term["math_accuracy"], [0] * len(responses))


def test_many_integer_samples_are_fast(manager):
    samples = [sample(str(i % 50), reference=i % 50 if i % 3 else 99) for i in range(1000)]
    started = time.monotonic()
    out = manager.score(samples)
    elapsed = time.monotonic() - started
    expected = np.array([0.0 if i % 3 == 0 else 1.0 for i in range(1000)])
    np.testing.assert_array_equal(out.per_term["math_accuracy"], expected)
    assert elapsed < 10, f"1000 samples x 3 terms took {elapsed:.1f}s"


def test_score_async_and_empty_batch(manager):
    future = manager.score_async([sample("12"), sample("11")])
    assert future.result(timeout=30).per_term["math_accuracy"].tolist() == [1.0, 0.0]
    empty = manager.score([])
    assert empty.scores.shape == (0,) and empty.correct.shape == (0,)


def test_spawn_start_method_and_inline_mode():
    cfg = make_config(
        num_workers=1,
        start_method="spawn",
        terms=[RewardTermConfig("math_accuracy", 2.0), RewardTermConfig(f"{__name__}:worker_pid", 1.0)],
    )
    with RewardManager(cfg) as m:
        out = m.score([sample("12"), sample("7")])
    assert out.per_term["math_accuracy"].tolist() == [1.0, 0.0]
    assert out.per_term[f"{__name__}:worker_pid"][0] != (os.getpid() % 1000) / 1000  # ran elsewhere
    cfg.num_workers = 0
    with RewardManager(cfg) as m:
        out = m.score([sample("12"), sample("12", extra=" RAISE")])
    assert out.per_term[f"{__name__}:worker_pid"][0] == (os.getpid() % 1000) / 1000  # ran here
    np.testing.assert_allclose(out.scores[0], 2.0 + (os.getpid() % 1000) / 1000)


register_reward("test_manager_lambda")(lambda prompt, response, reference: 1.0)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"terms": [RewardTermConfig("nope")]}, r"reward.terms\[0\].name: reward term 'nope' is not registered"),
        (
            {"terms": [RewardTermConfig("math_accuracy"), RewardTermConfig("no_pkg.mod:f")]},
            r"reward.terms\[1\].name: .*cannot import module 'no_pkg.mod'",
        ),
        ({"terms": [RewardTermConfig("math_accuracy"), RewardTermConfig("math_accuracy")]}, "appears twice"),
        ({"terms": [RewardTermConfig("format")]}, "reward.correctness_term: 'math_accuracy' is not one of"),
        ({"terms": [RewardTermConfig("math_accuracy"), RewardTermConfig("test_manager_lambda")]}, "picklable"),
        ({"terms": [RewardTermConfig("math_accuracy", float("nan"))]}, r"weight: must be a finite"),
        ({"start_method": "fork"}, "'fork' is unsafe"),
        (
            {"terms": [RewardTermConfig("math_accuracy", kwargs={"boxxed": "first"})]},
            r"reward.terms\[0\].kwargs: math_accuracy does not accept \['boxxed'\]",
        ),
        (
            {"terms": [RewardTermConfig("math_accuracy"), RewardTermConfig("judge", kwargs={"urll": "x"})]},
            r"reward.terms\[1\].kwargs: .*\['urll'\] are not JudgeConfig fields",
        ),
        ({"terms": []}, "at least one"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(RewardConfigError, match=message):
        RewardManager(make_config(**overrides))


# --- a reward that exits, a term that always fails ---------------------------------------------------


def test_system_exit_is_one_sample_error_inline_and_in_workers(manager):
    # Inline (num_workers=0) a SystemExit used to propagate and end the trainer with exit code 0.
    cfg = make_config(num_workers=0)
    with RewardManager(cfg) as inline:
        out = inline.score([sample("12", extra=" QUIT"), sample("12")])
    assert out.per_term[USER_TERM].tolist() == [0.0, 1.0]
    assert out.metrics["reward/errors"] == 1 and out.metrics[f"reward/{USER_TERM}/errors"] == 1
    out = manager.score([sample("12", extra=" QUIT"), sample("12")])  # the worker pool: same outcome
    assert out.per_term[USER_TERM].tolist() == [0.0, 1.0] and out.metrics["reward/errors"] == 1


def broken_reward(prompt, response, reference):
    if "FINE" in response:
        return 1.0
    raise KeyError("tests")  # e.g. a code reward given a dataset without test cases


BROKEN_TERM = f"{__name__}:broken_reward"


def test_a_term_failing_on_every_sample_is_counted_then_stops_the_run(caplog):
    from nemo_igrpo.utils.errors import RewardTermFailing, TrainingAborted, user_error_types

    cfg = make_config(
        num_workers=0,
        max_failing_steps=3,
        terms=[RewardTermConfig("math_accuracy"), RewardTermConfig(BROKEN_TERM, 1.0)],
    )
    with RewardManager(cfg) as m, caplog.at_level(logging.WARNING, logger="nemo_igrpo.rewards.manager"):
        # Step 1: drafts and refinements (two calls), every sample fails.
        m.score([sample("12"), sample("11")])
        m.score([sample("12")])
        metrics = m.end_step()
        assert metrics[f"reward/{BROKEN_TERM}/errors"] == 3 and metrics[f"reward/{BROKEN_TERM}/failing_steps"] == 1
        assert metrics["reward/math_accuracy/errors"] == 0 and metrics["reward/math_accuracy/failing_steps"] == 0
        assert (
            "failed on all 3 samples of this step (1 step(s) in a row; the run stops at reward.max_failing_steps=3)"
            in caplog.text
            and "KeyError: 'tests'" in caplog.text
        )
        # Step 2: one sample scored, so the term works sometimes: the streak restarts.
        m.score([sample("12", extra=" FINE"), sample("12")])
        metrics = m.end_step()
        assert metrics[f"reward/{BROKEN_TERM}/errors"] == 1 and metrics[f"reward/{BROKEN_TERM}/failing_steps"] == 0
        # A step that scored nothing neither breaks nor extends the streak.
        for _ in range(2):
            m.score([sample("12")])
            m.end_step()
        assert m.end_step()[f"reward/{BROKEN_TERM}/failing_steps"] == 2
        m.score([sample("12")])
        with pytest.raises(RewardTermFailing) as e:
            m.end_step()
    msg = str(e.value)
    assert msg.startswith(
        f"reward term '{BROKEN_TERM}' failed on every sample for 3 consecutive steps "
        "(reward.max_failing_steps=3); last error: error on sample 0: KeyError: 'tests'"
    )
    assert e.value.term == BROKEN_TERM and e.value.steps == 3
    # The CLI prints it as one line with exit code 2, like the other deliberate stops.
    assert isinstance(e.value, TrainingAborted) and isinstance(e.value, user_error_types())


def test_max_failing_steps_zero_only_counts():
    cfg = make_config(
        num_workers=0,
        max_failing_steps=0,
        terms=[RewardTermConfig("math_accuracy"), RewardTermConfig(BROKEN_TERM, 1.0)],
    )
    with RewardManager(cfg) as m:
        for _ in range(12):
            m.score([sample("12")])
            metrics = m.end_step()
    assert metrics[f"reward/{BROKEN_TERM}/failing_steps"] == 12 and metrics[f"reward/{BROKEN_TERM}/errors"] == 1


def test_config_is_checked_without_starting_workers():
    # What config validation runs at load time: the same messages, no process started.
    import multiprocessing

    before = len(multiprocessing.active_children())
    with pytest.raises(RewardConfigError, match=r"reward.terms\[0\].name: reward term 'nope' is not registered"):
        check_reward_config(make_config(terms=[RewardTermConfig("nope")]))
    with pytest.raises(RewardConfigError, match="reward.max_failing_steps: must be >= 0"):
        check_reward_config(make_config(max_failing_steps=-1))
    check_reward_config(make_config())
    assert len(multiprocessing.active_children()) == before
