"""Split a step's variable-length samples over data-parallel ranks and into packed micro-batches.

Why packing (not padding or length buckets): RL samples vary a lot in length (a short correct
answer next to a max-length rambling one). Packing concatenates whole sequences into one row of
at most `max_tokens` tokens, so every forward token is a real token, and megatron's THD format
(`PackedSeqParams` with cu_seqlens) keeps the sequences apart: RoPE restarts per sequence and
the attention (TE's fused kernel, or our SDPA module per segment) never crosses a boundary.
Bucketing by length would still pad inside each bucket and needs many buckets to get close.

Padding, only where a kernel needs it: TransformerEngine's FP8 GEMMs need the token count of
a GEMM divisible by 16 (delayed / tensorwise scaling), 32 (MXFP8) or 128 (blockwise), and
sequence parallelism splits the tokens of a micro-batch evenly over the TP ranks. So a pack is
rounded up to `pack_multiple(...)` tokens by one extra segment of padding at its end: its own
THD sequence (it attends to nothing real and nothing real attends to it), never scored, so it
changes no log-prob, loss, entropy or metric.

Both steps are deterministic functions of the (identical) sample list every rank receives, so all
ranks agree on the split without communicating, and TP/PP peers see identical micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


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


# Token-count multiple each FP8 recipe's GEMMs need (TransformerEngine 2.x; NeMo-RL pads to the
# same values): per-tensor scaling works on 16-row tiles, MXFP8 on 32-element blocks, blockwise
# on 128 x 128 tiles.
FP8_TOKEN_MULTIPLE = {"delayed": 16, "tensorwise": 16, "mxfp8": 32, "blockwise": 128}

# A micro-batch with no samples (a DP rank that got none) still runs a forward and backward pass
# so that it joins the step's collectives; this is its length before padding.
DUMMY_TOKENS = 2


def pack_multiple(fp8: Optional[str], tp: int, sequence_parallel: bool, cp: int = 1) -> int:
    """The number of tokens every packed micro-batch must be a multiple of.

    Sequence parallelism gives each TP rank 1/TP of the tokens, so each rank's share must meet
    the FP8 multiple on its own (x TP); context parallelism splits each sequence into 2 x CP
    chunks (x 2 CP). Without FP8, sequence parallelism alone needs a multiple of TP."""
    if fp8 is not None and fp8 not in FP8_TOKEN_MULTIPLE:
        raise ValueError(f"policy.fp8: {fp8!r} is not one of {', '.join(FP8_TOKEN_MULTIPLE)} (or null)")
    multiple = FP8_TOKEN_MULTIPLE[fp8] if fp8 is not None else 1
    if sequence_parallel or (fp8 is not None and tp > 1):
        multiple *= tp
    if cp > 1:
        multiple *= 2 * cp
    return multiple


@dataclass
class PackPlan:
    """Where each sample sits in a packed row."""

    sample_indices: list[int]  # global indices of the samples in this micro-batch, in row order
    starts: list[int]  # row offset of each sample
    cu_seqlens: list[int]  # [0, len0, len0+len1, ..., total]: megatron's THD boundaries (padding included)
    total_tokens: int  # real tokens + padding
    padding: int = 0  # tokens of the trailing padding segment (0: none)


def plan_pack(indices: Sequence[int], lengths: Sequence[int], multiple: int = 1) -> PackPlan:
    """Lay out `indices` one after another, then round the row up to `multiple` tokens with one
    padding segment. An empty pack becomes a padding-only row of DUMMY_TOKENS (rounded up)."""
    if multiple < 1:
        raise ValueError(f"pack multiple must be >= 1, got {multiple}")
    starts, cu = [], [0]
    for idx in indices:
        starts.append(cu[-1])
        cu.append(cu[-1] + lengths[idx])
    real = cu[-1]
    padding = (-real) % multiple if indices else -(-DUMMY_TOKENS // multiple) * multiple
    if padding:
        cu.append(real + padding)
    return PackPlan(
        sample_indices=list(indices), starts=starts, cu_seqlens=cu, total_tokens=real + padding, padding=padding
    )
