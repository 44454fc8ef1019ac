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
    old_logprobs: Optional[torch.Tensor] = None  # [response_length], from the generator / old policy
    ref_logprobs: Optional[torch.Tensor] = None  # [response_length], only when kl_beta > 0
    # Per-token loss weights over the response (1 = trained). None: all response tokens.
    loss_mask: Optional[torch.Tensor] = None
