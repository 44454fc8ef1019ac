"""Best-draft selection: argmax, the tie rule (seeded random among maxima, or first), the
all-zero policy (append or skip), and that a draft's reward only matters through the choice."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from nemo_igrpo.algorithms.selection import select_best_draft, selection_rng


def test_unique_maximum_is_chosen_under_both_tie_rules():
    for rule in ("random", "first"):
        sel = select_best_draft([0.0, 2.0, 1.0, 0.5], rule, "append", selection_rng(0, 0, 0, 0))
        assert (sel.index, sel.best_index, sel.best_reward, sel.num_maxima, sel.all_zero) == (1, 1, 2.0, 1, False)


def test_first_tie_rule_takes_lowest_index():
    sel = select_best_draft([1.0, 2.0, 0.0, 2.0, 2.0], "first", "append")
    assert sel.index == 1 and sel.num_maxima == 3


def test_random_tie_rule_is_seeded_uniform_and_only_picks_maxima():
    rewards = [1.0, 2.0, 0.0, 2.0, 2.0]
    picks = Counter(
        select_best_draft(rewards, "random", "append", selection_rng(seed=7, step=3, round_index=0, position=p)).index
        for p in range(3000)
    )
    assert set(picks) == {1, 3, 4}
    for count in picks.values():  # 1000 expected each; 5 sigma is about +-130
        assert 850 < count < 1150
    # Same (seed, step, round, position) -> same pick; the generator depends on nothing else.
    a = [select_best_draft(rewards, "random", "append", selection_rng(7, 3, 0, p)).index for p in range(50)]
    b = [select_best_draft(rewards, "random", "append", selection_rng(7, 3, 0, p)).index for p in range(50)]
    c = [select_best_draft(rewards, "random", "append", selection_rng(8, 3, 0, p)).index for p in range(50)]
    assert a == b and a != c


def test_all_zero_policy():
    rng = selection_rng(0, 0, 0, 0)
    appended = select_best_draft([0.0, 0.0, 0.0], "first", "append", rng)
    assert appended.all_zero and appended.index == 0 and not appended.skipped
    skipped = select_best_draft([0.0, 0.0, 0.0], "first", "skip", rng)
    assert skipped.all_zero and skipped.skipped and skipped.index is None and skipped.best_index == 0
    negative = select_best_draft([-1.0, -0.5], "first", "skip", rng)  # overlong-style negatives count too
    assert negative.skipped and negative.best_index == 1
    # A well-formatted wrong draft (format reward 1, accuracy 0) is not "all-zero".
    assert not select_best_draft([1.0, 0.0], "first", "skip", rng).skipped


def test_changing_a_non_maximal_reward_does_not_change_the_choice():
    gen = np.random.default_rng(0)
    for trial in range(200):
        rewards = gen.integers(0, 3, size=4).astype(float)
        rule = "random" if trial % 2 else "first"
        base = select_best_draft(rewards, rule, "append", selection_rng(1, trial, 0, 0))
        # Lower any draft that is not the chosen one: the choice (and the tie draw) is unchanged
        # as long as the set of maxima is unchanged.
        for j in range(4):
            if rewards[j] < rewards.max():
                changed = rewards.copy()
                changed[j] = rewards.max() - 0.5
                again = select_best_draft(changed, rule, "append", selection_rng(1, trial, 0, 0))
                assert again.index == base.index
        # Raising one draft above all others makes it the choice.
        j = int(gen.integers(0, 4))
        raised = rewards.copy()
        raised[j] = rewards.max() + 1
        assert select_best_draft(raised, rule, "append", selection_rng(1, trial, 0, 0)).index == j


def test_bad_input():
    with pytest.raises(ValueError, match="algorithm.tie_break"):
        select_best_draft([1.0], "last", "append")
    with pytest.raises(ValueError, match="algorithm.all_zero_drafts"):
        select_best_draft([1.0], "first", "drop")
    with pytest.raises(ValueError, match="non-empty"):
        select_best_draft([], "first", "append")
    with pytest.raises(ValueError, match="NaN"):
        select_best_draft([1.0, float("nan")], "first", "append")
    with pytest.raises(ValueError, match="seeded generator"):
        select_best_draft([1.0, 1.0], "random", "append", None)
