"""What the trainer hands the Megatron actor: variable-length sequences, never padded by the
caller. The actor packs them into padding-free micro-batches itself."""

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
