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


# --- padding to the multiple FP8 GEMMs and sequence parallelism need (GPU-path issue, item 4)

from nemo_igrpo.policy.packing import DUMMY_TOKENS, FP8_TOKEN_MULTIPLE, pack_multiple  # noqa: E402


@pytest.mark.parametrize(
    "fp8,tp,sp,cp,expected",
    [
        (None, 1, False, 1, 1),
        (None, 2, False, 1, 1),
        (None, 4, True, 1, 4),
        ("delayed", 1, False, 1, 16),
        ("tensorwise", 2, True, 1, 32),
        ("mxfp8", 1, False, 1, 32),
        ("blockwise", 1, False, 1, 128),
        ("blockwise", 2, True, 1, 256),
        ("tensorwise", 2, True, 2, 128),
        ("delayed", 4, True, 1, 64),
    ],
)
def test_pack_multiple_per_recipe(fp8, tp, sp, cp, expected):
    assert pack_multiple(fp8, tp, sp, cp) == expected


def test_pack_multiple_rejects_unknown_recipe():
    with pytest.raises(ValueError, match="policy.fp8"):
        pack_multiple("e5m2", 1, False)


@pytest.mark.parametrize("fp8", [None, *FP8_TOKEN_MULTIPLE])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_every_pack_meets_its_multiple(fp8, tp):
    rng = random.Random(hash((fp8, tp)) % 1000)
    multiple = pack_multiple(fp8, tp, sequence_parallel=tp > 1)
    lengths = [rng.randint(3, 300) for _ in range(41)]
    for bins in (pack_first_fit(range(41), lengths, 700), [[]]):  # real packs and the empty (dummy) pack
        for b in bins:
            plan = plan_pack(b, lengths, multiple)
            real = sum(lengths[i] for i in b)
            assert plan.total_tokens % multiple == 0 and plan.total_tokens == plan.cu_seqlens[-1]
            assert 0 <= plan.padding < multiple or (not b and plan.padding >= DUMMY_TOKENS)
            assert plan.total_tokens == real + plan.padding
            # The samples keep their places; padding is one trailing segment of its own.
            assert plan.cu_seqlens[: len(b) + 1] == plan_pack(b, lengths).cu_seqlens[: len(b) + 1]
            assert len(plan.cu_seqlens) == len(b) + 1 + (1 if plan.padding else 0)


def test_no_padding_without_a_multiple():
    plan = plan_pack([0, 1], [5, 6])
    assert plan.padding == 0 and plan.cu_seqlens == [0, 5, 11]
    assert plan_pack([], [5]).total_tokens == DUMMY_TOKENS
