"""Split a step's variable-length samples over data-parallel ranks and into packed micro-batches.

Why packing (not padding or length buckets): RL samples vary a lot in length (a short correct
answer next to a max-length rambling one). Packing concatenates whole sequences into one row of
at most `max_tokens` tokens, so every forward token is a real token, and megatron's THD format
(`PackedSeqParams` with cu_seqlens) keeps the sequences apart: RoPE restarts per sequence and
the attention (TE's fused kernel, or our SDPA module per segment) never crosses a boundary.
Bucketing by length would still pad inside each bucket and needs many buckets to get close.

Both steps are deterministic functions of the (identical) sample list every rank receives, so all
ranks agree on the split without communicating, and TP/PP peers see identical micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


def shard_over_dp(lengths: Sequence[int], dp_size: int) -> list[list[int]]:
    """Sample indices for each DP rank, balancing token counts (longest first onto the
    currently lightest rank). Each rank's list is in increasing index order."""
    loads = [0] * dp_size
    shards: list[list[int]] = [[] for _ in range(dp_size)]
    for idx in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        rank = min(range(dp_size), key=lambda r: (loads[r], r))
        shards[rank].append(idx)
        loads[rank] += lengths[idx]
    return [sorted(s) for s in shards]


def pack_first_fit(indices: Sequence[int], lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group `indices` into bins of at most `max_tokens` tokens (first-fit decreasing). A sample
    longer than `max_tokens` gets a bin of its own: it is never truncated."""
    if max_tokens < 1:
        raise ValueError(f"policy.max_tokens_per_microbatch must be >= 1, got {max_tokens}")
    bins: list[list[int]] = []
    room: list[int] = []
    for idx in sorted(indices, key=lambda i: (-lengths[i], i)):
        n = lengths[idx]
        for b in range(len(bins)):
            if room[b] >= n:
                bins[b].append(idx)
                room[b] -= n
                break
        else:
            bins.append([idx])
            room.append(max_tokens - n)
    return bins


@dataclass
class PackPlan:
    """Where each sample sits in a packed row."""

    sample_indices: list[int]  # global indices of the samples in this micro-batch, in row order
    starts: list[int]  # row offset of each sample
    cu_seqlens: list[int]  # [0, len0, len0+len1, ...]: megatron's THD boundaries
    total_tokens: int


def plan_pack(indices: Sequence[int], lengths: Sequence[int]) -> PackPlan:
    starts, cu = [], [0]
    for idx in indices:
        starts.append(cu[-1])
        cu.append(cu[-1] + lengths[idx])
    return PackPlan(sample_indices=list(indices), starts=starts, cu_seqlens=cu, total_tokens=cu[-1])
