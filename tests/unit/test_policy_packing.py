"""DP sharding and padding-free packing of variable-length samples."""

from __future__ import annotations

import random

import pytest

from nemo_igrpo.policy.packing import pack_first_fit, plan_pack, shard_over_dp


def test_shards_cover_every_sample_once_and_balance_tokens():
    rng = random.Random(0)
    lengths = [rng.randint(5, 400) for _ in range(37)]
    shards = shard_over_dp(lengths, 4)
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(37))
    loads = [sum(lengths[i] for i in s) for s in shards]
    # Greedy longest-first: the spread is at most one (the longest) sample.
    assert max(loads) - min(loads) <= max(lengths)
    assert shards == shard_over_dp(lengths, 4), "must be deterministic (ranks agree without talking)"


def test_more_ranks_than_samples_leaves_empty_shards():
    shards = shard_over_dp([10, 20], 4)
    assert sorted(map(len, shards)) == [0, 0, 1, 1]


def test_first_fit_respects_budget_and_keeps_oversized_samples_whole():
    lengths = [50, 30, 30, 20, 90, 10, 200]
    bins = pack_first_fit(range(len(lengths)), lengths, max_tokens=100)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    for b in bins:
        total = sum(lengths[i] for i in b)
        assert total <= 100 or b == [6], f"bin {b} has {total} tokens"
    assert [6] in bins
    # The other 230 tokens fit in 3 bins of 100 (90+10, 50+30+20, 30): first-fit decreasing finds that.
    assert len(bins) == 4


def test_pack_plan_boundaries():
    plan = plan_pack([2, 0], [3, 4, 5])
    assert plan.sample_indices == [2, 0]
    assert plan.starts == [0, 5]
    assert plan.cu_seqlens == [0, 5, 8]
    assert plan.total_tokens == 8


def test_bad_budget_is_rejected():
    with pytest.raises(ValueError, match="max_tokens_per_microbatch"):
        pack_first_fit([0], [3], 0)
