"""Example policy loss and loss aggregation (see docs/algorithm.md, "Extending").

A policy loss turns one micro-batch's token log-probs into per-token losses; the trainer then
applies truncated importance sampling (if on), the aggregation, the KL term and the metrics.
An aggregation returns this micro-batch's *share* of the step's loss: summed over all
micro-batches and data-parallel ranks it must give the loss of the whole step, which is why it
divides by the step-wide counts in `norm` and never by counts of its own micro-batch.
"""

from __future__ import annotations

import torch

from nemo_igrpo.algorithms.config import AlgorithmConfig
from nemo_igrpo.algorithms.kl import LOG_RATIO_CLAMP
from nemo_igrpo.batch import LossInputs, LossNormalizer
from nemo_igrpo.algorithms.losses import PolicyLossOutput, segment_lengths, segment_sum


def unclipped_pg(inputs: LossInputs, cfg: AlgorithmConfig) -> PolicyLossOutput:
    """Importance-weighted policy gradient without clipping: L_t = -A rho_t.

    With one update per rollout batch rho_t = 1 in value, so this is plain REINFORCE with the
    group baseline; it only differs from `clipped` once the policy moves between mini-batches.
    """
    log_ratio = (inputs.logprobs - inputs.old_logprobs.to(inputs.logprobs.dtype)).clamp(
        -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP
    )
    ratio = torch.exp(log_ratio)
    loss = -inputs.advantages.to(ratio.dtype) * ratio
    never = torch.zeros_like(ratio, dtype=torch.bool)  # nothing is clipped: the metrics read 0
    return PolicyLossOutput(
        per_token_loss=loss, ratio=ratio.detach(), clipped_low=never, clipped_high=never, dual_clipped=never
    )


def seq_mean_token_sqrt(
    per_token: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int, norm: LossNormalizer
) -> torch.Tensor:
    """(1/S) sum_i sum_t L_it / sqrt(|o_i|): between token-sum (long answers dominate) and
    token-mean (every answer weighs the same). Sequences are never split across micro-batches,
    so each |o_i| is complete here; S is the whole step's sequence count."""
    lengths = segment_lengths(seq_ids, num_seqs, per_token.dtype).clamp(min=1.0)
    return (segment_sum(per_token, seq_ids, num_seqs) / lengths.sqrt()).sum() / norm.num_seqs
