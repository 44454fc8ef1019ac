"""The one interface every generation backend implements.

The rollout code talks only to `GenerationBackend`; it never knows whether tokens come from an
in-process vLLM engine, a `vllm serve` / `trtllm-serve` process over HTTP, or Megatron itself.
Requests carry token ids (never re-tokenised text) and always ask for the log-probabilities of
the sampled tokens, which the trainer uses as the "old" policy log-probs and to measure the
train/inference mismatch after each weight sync.

Two ways to ask for samples:
- `generate(prompts, params)`: one batch, one barrier; every backend implements it.
- `open_stream()`: a `GenerationStream` that takes requests one prompt at a time while others
  are still running and hands each back as soon as it finishes, so a caller can submit work
  that depends on a finished request (iGRPO's refinements of a prompt whose drafts are done)
  into the same running engine. The base class builds a stream from `generate()` with barrier
  semantics (`BarrierStream`: everything submitted since the last wait is one batch), so a
  backend that only implements `generate()` works unchanged; backends that can overlap (vLLM's
  add_request/step loop, an HTTP server with concurrent requests) override `open_stream()`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Optional

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

    @property
    def supports_streaming(self) -> bool:
        """True when `open_stream()` really overlaps requests (the backend overrides it); the
        default stream has barrier semantics, so a rollout gains nothing from pipelining."""
        return type(self).open_stream is not GenerationBackend.open_stream

    def open_stream(self) -> "GenerationStream":
        """A stream of per-prompt requests (see `GenerationStream`). Default: `BarrierStream`,
        i.e. `generate()` over everything submitted since the previous `wait()`."""
        return BarrierStream(self)

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


# --- streams ---------------------------------------------------------------------------------


class GenerationStream(ABC):
    """Requests in flight on one backend, submitted one prompt at a time, collected as they end.

        with backend.open_stream() as stream:
            stream.submit(key, prompt_ids, params)        # returns at once
            for key, results in stream.wait():             # >= 1 finished request (or [] on timeout)
                ...                                        # may submit more requests here

    A request is one prompt with `params.n` samples; its results are exactly what
    `generate([prompt], params)[0]` returns (same order, same seeds: sample i uses
    params.seed + i), so a deterministic backend gives the same samples whether the requests
    went through a stream or through generate() batches. Keys are the caller's handles
    (hashable, unique among the requests in flight). Not thread-safe: one caller drives it.

    `overlaps` is False for a stream that only generates inside `wait()` and only what was
    submitted before it (barrier semantics): a caller that wants the barrier rollout's batches
    should then submit everything it can before calling `wait()`.
    """

    overlaps: bool = True

    @abstractmethod
    def submit(self, key: Hashable, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue one prompt; validation errors are raised here, not in wait()."""

    @abstractmethod
    def wait(self, timeout: Optional[float] = None) -> list[tuple[Hashable, list[GenerationResult]]]:
        """Block until at least one request has finished and return every finished one not
        returned before (in no particular order). With `timeout` (seconds) it may return []
        once that much time has passed; `timeout=0` polls. Returns [] when nothing is pending."""

    @property
    @abstractmethod
    def num_pending(self) -> int:
        """Requests submitted and not yet returned by wait()."""

    def close(self) -> None:
        """Drop (abort, where the backend can) every request not yet returned."""
        return None

    def __enter__(self) -> "GenerationStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BarrierStream(GenerationStream):
    """The default stream, built from `generate()`: `wait()` runs everything submitted since the
    previous `wait()` as `generate()` batches, one per distinct SamplingParams in order of first
    submission, and returns all of it. Nothing overlaps, which is what backends without a
    request queue (Megatron's in-framework sampler, a data-parallel wrapper whose ranks must
    make the same collective calls) need."""

    overlaps = False

    def __init__(self, backend: GenerationBackend):
        self.backend = backend
        self._queued: list[tuple[Hashable, list[int], SamplingParams]] = []
        self._keys: set = set()

    def submit(self, key: Hashable, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if key in self._keys:
            raise ValueError(f"stream request key {key!r} is already in flight")
        self._keys.add(key)
        self._queued.append((key, list(prompt_token_ids), params))

    def wait(self, timeout: Optional[float] = None) -> list[tuple[Hashable, list[GenerationResult]]]:
        queued, self._queued = self._queued, []
        # Group by equal params (a dataclass with lists: compared, not hashed), keeping the order
        # of first submission so the batches match what a two-barrier caller would send.
        batches: list[tuple[SamplingParams, list[tuple[Hashable, list[int]]]]] = []
        for key, prompt, params in queued:
            for batch_params, members in batches:
                if batch_params == params:
                    members.append((key, prompt))
                    break
            else:
                batches.append((params, [(key, prompt)]))
        done: list[tuple[Hashable, list[GenerationResult]]] = []
        try:
            for params, members in batches:
                outputs = self.backend.generate([prompt for _, prompt in members], params)
                if len(outputs) != len(members):
                    raise RuntimeError(f"generate() returned {len(outputs)} result lists for {len(members)} prompts")
                done.extend((key, list(results)) for (key, _), results in zip(members, outputs))
        finally:
            for key, _, _ in queued:
                self._keys.discard(key)
        return done

    @property
    def num_pending(self) -> int:
        return len(self._queued)

    def close(self) -> None:
        self._queued = []
        self._keys = set()
