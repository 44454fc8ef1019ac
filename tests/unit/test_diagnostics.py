"""The rollout's mechanism diagnostics (`diag/*` in the step metrics): zero-variance fractions of
both stages, the best draft against Proposition 3.1's 1 - (1 - p)^N, refinement accuracy split
by the appended draft's correctness, verbatim copies; and that the barrier and the pipelined
rollout log the same ones. The scripted backends and the script come from test_rollout.py, so
every number here is known by hand."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from nemo_igrpo.algorithms.rollout import IGRPORollout
from test_rollout import (
    BASE_SCRIPT,
    P1,
    P2,
    SIX,
    OverlappingBackend,
    ScriptedBackend,
    algo,
    gen_cfg,  # noqa: F401
    make_rollout,
    random_script,
    rewards,  # noqa: F401 - a pytest fixture
    tok,  # noqa: F401 - a pytest fixture
)

DRAFT_KEYS = [
    "diag/stage1_zero_variance_frac",
    "diag/best_draft_correct",
    "diag/best_draft_prop31",
    "diag/chosen_draft_correct_frac",
    "diag/refine_copy_frac",
]


def test_diagnostics_by_hand(tok, rewards):
    rollout, _ = make_rollout(tok, rewards, BASE_SCRIPT)
    m = rollout.run([P1, P2], step=0).metrics
    # P1 drafts 4 5 6 5 (rewards 1 2 1 2; correct F T F T), first maximum -> "5", correct.
    # P2 drafts nine 2 3 4 (rewards 0 1 1 1; none correct)  -> "2", wrong.
    assert m["diag/stage1_zero_variance_frac"] == 0.0
    assert m["diag/stage2_zero_variance_frac"] == 0.0  # refinement rewards 2 2 1 2 and 2 2 2 0
    assert m["diag/best_draft_correct"] == pytest.approx(0.5)
    # Prop. 3.1 per prompt from its own drafts: p = 1/2 -> 1 - 0.5^4; p = 0 -> 0.
    assert m["diag/best_draft_prop31"] == pytest.approx((1 - 0.5**4 + 0.0) / 2)
    assert m["diag/chosen_draft_correct_frac"] == pytest.approx(0.5)
    # P1's refinements 5 5 7 5 after a right draft; P2's 9 9 9 nine-unformatted after a wrong one.
    assert m["diag/refine_acc_draft_correct"] == pytest.approx(3 / 4)
    assert m["diag/refine_acc_draft_wrong"] == pytest.approx(3 / 4)
    # Three of P1's refinements are the draft's text exactly; none of P2's ("9" vs the draft "2").
    assert m["diag/refine_copy_frac"] == pytest.approx(3 / 8)
    assert m["diag/refine_copy_frac_draft_wrong"] == 0.0


def test_zero_variance_and_copies_of_a_wrong_draft(tok, rewards):
    script = {
        (P1.prompt, "plain"): ["4", "4", "4", "4"],  # unanimous wrong drafts: stage-1 zero variance
        (P1.prompt, "conditioned"): ["4", "4", "4", "4"],  # the refinements copy the wrong draft
        (P2.prompt, "plain"): ["9", "8", "8", "8"],  # p = 1/4 -> Prop. 3.1 predicts 1 - 0.75^4
        (P2.prompt, "conditioned"): ["9", "9", "9", "9"],  # copies of the right draft: zero variance
    }
    rollout, _ = make_rollout(tok, rewards, script)
    m = rollout.run([P1, P2], step=0).metrics
    assert m["diag/stage1_zero_variance_frac"] == pytest.approx(0.5)
    assert m["diag/stage2_zero_variance_frac"] == 1.0 == m["groups/zero_variance_frac"]
    assert m["diag/best_draft_correct"] == pytest.approx(0.5)
    assert m["diag/best_draft_prop31"] == pytest.approx((0.0 + 1 - 0.75**4) / 2)
    assert m["diag/refine_acc_draft_wrong"] == 0.0 and m["diag/refine_acc_draft_correct"] == 1.0
    assert m["diag/refine_copy_frac"] == 1.0 and m["diag/refine_copy_frac_draft_wrong"] == 1.0


def test_grpo_logs_only_what_applies(tok, rewards):
    script = {(P1.prompt, "plain"): ["5", "5", "5", "5"], (P2.prompt, "plain"): ["9", "1", "9", "9"]}
    rollout, _ = make_rollout(tok, rewards, script, cfg=algo(num_drafts=0))
    m = rollout.run([P1, P2], step=0).metrics
    assert m["diag/stage2_zero_variance_frac"] == pytest.approx(0.5)  # GRPO's own groups
    for key in DRAFT_KEYS + ["diag/refine_acc_draft_correct", "diag/refine_acc_draft_wrong"]:
        assert key not in m


def test_skipped_all_zero_draft_is_not_a_conditioned_group(tok, rewards):
    script = dict(BASE_SCRIPT)
    script[(P2.prompt, "plain")] = ["RAW:a", "RAW:b", "RAW:c", "RAW:d"]  # all zero: skipped
    script[(P2.prompt, "plain")] += ["9", "9", "9", "9"]  # its refinements from the bare prompt
    rollout, _ = make_rollout(tok, rewards, script, cfg=algo(all_zero_drafts="skip"))
    m = rollout.run([P1, P2], step=0).metrics
    assert m["diag/chosen_draft_correct_frac"] == 1.0  # only P1's group was conditioned
    assert "diag/refine_acc_draft_wrong" not in m
    assert m["diag/best_draft_prop31"] == pytest.approx((1 - 0.5**4) / 2)


@pytest.mark.parametrize(
    "cfg",
    [
        algo(),
        algo(num_drafts=0, num_refinements=4),
        algo(num_drafts=4, num_refinements=3, adaptive_draft_budget=True),
        algo(num_drafts=2, num_refinements=3, refinement_rounds=2),
    ],
)
def test_both_rollout_modes_log_the_same_diagnostics(tok, rewards, cfg):
    script = random_script(SIX, seed=5)
    inline = SimpleNamespace(score=rewards.score, end_step=rewards.end_step)
    out = {}
    for pipelined in (False, True):
        inner = ScriptedBackend(tok, {k: list(v) for k, v in script.items()})
        backend = OverlappingBackend(inner, 2) if pipelined else inner
        rollout = IGRPORollout(cfg, gen_cfg(max_new_tokens=40), backend, inline, tok, seed=11)
        assert rollout.pipelined is pipelined
        m = rollout.run(SIX, step=0).metrics
        out[pipelined] = {k: v for k, v in m.items() if k.startswith("diag/")}
    assert out[True] == out[False]
    assert "diag/stage2_zero_variance_frac" in out[True]
    assert all(k in out[True] for k in DRAFT_KEYS) == (cfg.num_drafts > 0)
