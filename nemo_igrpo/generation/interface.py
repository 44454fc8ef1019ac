"""The one interface every generation backend implements.

The rollout code talks only to `GenerationBackend`; it never knows whether tokens come from an
in-process vLLM engine, a `vllm serve` / `trtllm-serve` process over HTTP, or Megatron itself.
Requests carry token ids (never re-tokenised text) and always ask for the log-probabilities of
the sampled tokens, which the trainer uses as the "old" policy log-probs and to measure the
train/inference mismatch after each weight sync.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    n: int = 1  # samples per prompt
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    seed: Optional[int] = None  # per-request base seed; sample i of a prompt uses seed + i


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]  # the sampled completion, stop token included when one was produced
    text: str
    logprobs: list[float]  # log-prob of each sampled token under the generator's weights
    finish_reason: str  # "stop" | "length"

    def __post_init__(self) -> None:
        if len(self.logprobs) != len(self.token_ids):
            raise ValueError(f"{len(self.logprobs)} log-probs for {len(self.token_ids)} tokens")


class GenerationBackend(ABC):
    """Generate completions for token-id prompts; accept new weights after each optimizer step."""

    @abstractmethod
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[GenerationResult]]:
        """Return, for each prompt, `params.n` results (in a deterministic order)."""

    @abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights, given as full (unsharded) tensors with Hugging Face names."""

    def sleep(self) -> bool:
        """Release generator memory while the trainer updates (where supported). Returns True
        when the weights were dropped with it: the trainer then sends weights (update_weights)
        even after a skipped update, before wake_up(). The trainer's order every step:
        generate -> sleep() -> [update] -> update_weights() -> wake_up() -> generate."""
        return False

    def wake_up(self) -> None:
        """Take back everything sleep() released (KV cache last, after the weights)."""
        return None

    def close(self) -> None:
        return None
