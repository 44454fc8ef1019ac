"""The data types that cross between the algorithm and the policy, in one small module that
imports neither (so `policy` and `algorithms` never import each other for them).

- `SequenceSample` / `TrainSample`: what the trainer hands the Megatron actor: variable-length
  sequences, never padded by the caller (the actor packs them into padding-free micro-batches).
- `LossInputs` / `LossNormalizer`: the contract between the actor (which runs forward passes)
  and the policy losses. The actor calls a loss once per micro-batch with the response tokens
  of that micro-batch flattened into 1-D tensors (only tokens whose loss mask is 1 are
  present, so no mask is needed), plus a `LossNormalizer` holding counts over the *whole*
  optimizer step: all micro-batches and all data-parallel ranks. A loss returns this
  micro-batch's share of the global loss, so summing over micro-batches and ranks gives exactly
  the loss of the full batch, however it was split (NeMo-RL normalises the same way; without
  it gradient accumulation silently changes the loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class SequenceSample:
    token_ids: list[int]  # prompt (with the draft, for a refinement) followed by the response
    response_start: int  # index of the first response token; only response tokens are scored

    @property
    def response_length(self) -> int:
        return len(self.token_ids) - self.response_start


@dataclass
class TrainSample(SequenceSample):
    advantage: float = 0.0
    # [response_length], the ratio's denominator. None: the current policy's (detached), i.e.
    # exactly on-policy, taken from the update's own forward pass.
    old_logprobs: Optional[torch.Tensor] = None
    # [response_length], the generator's log-probs of the same tokens. When given, train_step
    # reports `logprob_mismatch` = mean exp|logp_train - logp_gen| over them (1.0 = agreement).
    generation_logprobs: Optional[torch.Tensor] = None
    ref_logprobs: Optional[torch.Tensor] = None  # [response_length], only when kl_beta > 0
    # Per-token loss weights over the response (1 = trained). None: all response tokens.
    loss_mask: Optional[torch.Tensor] = None


@dataclass
class LossInputs:
    logprobs: torch.Tensor  # [N] current policy log-probs of the trained tokens (requires grad)
    old_logprobs: torch.Tensor  # [N] old-policy log-probs (the trainer's, before this update)
    advantages: torch.Tensor  # [N] per-token advantage (the sequence's advantage, repeated)
    seq_ids: torch.Tensor  # [N] int64, 0..num_seqs-1: which sequence of this micro-batch
    num_seqs: int  # sequences in this micro-batch
    ref_logprobs: Optional[torch.Tensor] = None  # [N], when the KL term is on
    # [N], the generator's log-probs of the same tokens (NaN where a sample has none); used by
    # truncated importance sampling (algorithm.tis_cap).
    generation_logprobs: Optional[torch.Tensor] = None


@dataclass
class LossNormalizer:
    num_tokens: float  # trained tokens in the whole step (all micro-batches, all DP ranks)
    num_seqs: float  # sequences in the whole step
    max_response_length: int  # constant for seq-mean-token-sum-norm (Dr.GRPO)
