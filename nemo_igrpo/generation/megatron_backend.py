"""In-framework generation: megatron-core's inference engine on the Megatron policy itself.

The generation path for machines without vLLM, and the reference backend for CPU debugging. It
samples from `actor.model_chunks` directly, so it never needs a weight sync (update_weights() is
a no-op and does not iterate the export, which therefore costs nothing when the trainer passes
it anyway).

How: megatron-core 0.19's `StaticInferenceEngine` (legacy static batching) drives
`TextGenerationController.generate_all_output_tokens_static_batch` over a `GPTInferenceWrapper`
with a `StaticInferenceContext` KV cache. Every sample of every prompt of a call is one row of
one static batch (or of several, `max_batch_size` rows each): the engine prefills up to the
shortest prompt, then steps one position at a time; a row still inside its prompt is fed its own
prompt token, a row past it the token sampled for it. TP and PP come with the engine: logits are
gathered over the TP ranks and broadcast from the last pipeline stage, so every rank of the
model-parallel group holds the same logits at every step and samples the same tokens.

Why the static engine and not the dynamic one: on this CPU path the dynamic engine needs
flash-attn (paged attention), a Triton KV-append kernel and pinned memory replaced inside
megatron-core, and measured slower (/work/shared/reference/generation-scale.md); the static one
needs only two CPU stand-ins (cpu_compat.enable_inference_engine).

The controller is subclassed at exactly two hooks, to keep this project's semantics:
- `sample_from_logits`: vLLM's semantics. Temperature 0 is greedy; otherwise softmax(logits / T)
  with top-p truncation, drawn with one torch.Generator per sample on the model's device,
  seeded `seed + i` for sample i of a prompt (megatron's sampler has one generator for the whole
  batch, which would make a sample depend on its batch mates). A generator is drawn from only at
  the steps where its row is generating, so a sample is the same whatever else is in the batch.
  Log-probs follow `generation.logprobs_mode`: "raw_logprobs" is the log-softmax of the raw
  logits (what the trainer recomputes), "processed_logprobs" the distribution sampled from.
- `update_generation_status`: several stop tokens (EOS from the tokenizer and the checkpoint's
  generation_config, plus the request's) and stop strings, where megatron knows one id; the
  stop token is part of the completion. Finish reasons: "stop", else "length".

Greedy requests with n > 1 generate one row per prompt and repeat it (the samples are
identical by definition). A prompt that does not fit the model's positions with its
max_new_tokens is refused with the prompt's index.

Contract with TP or PP > 1: every rank of the actor's model-parallel group calls generate() at
the same time with the same arguments (the forward passes are collective); every one of them
gets the full results. Unseeded requests draw their seeds from the backend's stream, which is
then broadcast from the group's first rank so that all ranks sample alike.

Process state: generation runs in eval mode under torch.inference_mode; afterwards the model's
train/eval mode, megatron's process-wide `InferenceMode` flag (the engine sets it), sequence
parallelism (switched off for the engine, which does not support it outside MoE layers) and
torch's global RNG (the legacy engine reseeds it at every call) are as they were, and no
inference-mode tensor stays in a module cache (the rotary embeddings' lru_cache).
"""

from __future__ import annotations

import logging
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from nemo_igrpo.generation.common import check_generation_config, check_request
from nemo_igrpo.generation.config import GenerationConfig
from nemo_igrpo.utils import collectives
from nemo_igrpo.generation.interface import GenerationBackend, GenerationResult, SamplingParams

logger = logging.getLogger(__name__)


def _eos_token_ids(actor) -> set[int]:
    ids: set[int] = set()
    if getattr(actor.tokenizer, "eos_token_id", None) is not None:
        ids.add(int(actor.tokenizer.eos_token_id))
    try:
        from transformers import GenerationConfig as HFGenerationConfig

        gen_eos = HFGenerationConfig.from_pretrained(actor.hf_path).eos_token_id
    except (OSError, ValueError):
        gen_eos = None
    if gen_eos is not None:
        ids.update(int(t) for t in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    return ids


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf the logits outside the smallest set whose probability reaches top_p (the
    most likely token always stays)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(dim=-1)
    drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # mass before this token already enough
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sampling_generator(seed: int, device: torch.device) -> torch.Generator:
    """A seeded generator on `device`: torch.multinomial draws with a generator of the
    probabilities' own device only (a CPU generator with CUDA probabilities raises), so the
    generator lives where the model's logits are."""
    return torch.Generator(device=device).manual_seed(seed)


@dataclass
class _Row:
    """One sample being generated: one row of the engine's batch."""

    prompt: list[int]
    generator: Optional[torch.Generator]  # None when greedy
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: Optional[str] = None


@dataclass
class _Request:
    """What the sampling hooks need to know about the call (the same for all rows)."""

    temperature: float
    top_p: float
    max_new_tokens: int
    stop_ids: set[int]
    stop_strings: list[str]
    logprobs_mode: str
    tokenizer: object


def _make_controller_class():
    """The TextGenerationController subclass (built lazily: megatron-core is imported only when
    the backend is used)."""
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    class SeededSamplingController(TextGenerationController):
        """megatron-core's static-batch generation loop with this project's sampling, log-prob
        and stop semantics (see the module docstring); rows are looked up by request id."""

        def __init__(self, wrapped_model, tokenizer, request: _Request, rows: dict[int, _Row]):
            super().__init__(wrapped_model, tokenizer)
            self._request = request
            self._rows = rows
            self._batch: list[_Row] = []

        def generate_all_output_tokens_static_batch(self, active_requests, active_streams=None):
            # The engine hands over one static batch at a time; its row order is the order of
            # `active_requests`, which the hooks below index by.
            self._batch = [self._rows[request_id] for request_id in active_requests]
            return super().generate_all_output_tokens_static_batch(active_requests, active_streams)

        def sample_from_logits(
            self,
            last_token_logits,
            sampling_params=None,
            vocab_size=None,
            generation_started=None,
            top_n_logprobs_dict=None,
            logits=None,
            **kwargs,
        ):
            req = self._request
            logits = last_token_logits.float()
            started = generation_started.tolist()
            live = [i for i, row in enumerate(self._batch) if started[i] and row.finish is None]
            # Rows not generating (still in their prompt, or finished) get the argmax: the
            # engine ignores what is sampled for them, and no generator is consumed for them.
            chosen = logits.argmax(dim=-1)
            source = torch.log_softmax(logits, dim=-1)
            if req.temperature > 0 and live:
                processed = top_p_filter(logits / req.temperature, req.top_p)
                probs = processed.softmax(dim=-1)
                for i in live:
                    chosen[i] = torch.multinomial(probs[i], 1, generator=self._batch[i].generator)[0]
                if req.logprobs_mode != "raw_logprobs":
                    source = torch.log_softmax(processed, dim=-1)
            logprobs = source.gather(1, chosen[:, None])[:, 0].tolist()
            tokens = chosen.tolist()
            for i in live:
                row = self._batch[i]
                row.tokens.append(tokens[i])
                row.logprobs.append(logprobs[i])
                if tokens[i] in req.stop_ids:
                    row.finish = "stop"
                elif req.stop_strings and any(
                    s in req.tokenizer.decode(row.tokens, skip_special_tokens=True) for s in req.stop_strings
                ):
                    row.finish = "stop"
                elif len(row.tokens) >= req.max_new_tokens:
                    row.finish = "length"
            return chosen

        def update_generation_status(
            self,
            updated_prompts_tokens,
            generation_started,
            current_context_end_position,
            is_generation_done_tensor,
            generated_sequence_lengths,
            termination_id=None,
        ):
            # Done and lengths come from the rows (several stop ids, stop strings, the stop
            # token kept), not from megatron's single termination id.
            device = is_generation_done_tensor.device
            done = torch.tensor([row.finish is not None for row in self._batch], dtype=torch.bool, device=device)
            lengths = torch.tensor([len(row.tokens) for row in self._batch], dtype=torch.int32, device=device)
            return done, lengths

    return SeededSamplingController


def _drop_inference_tensors_from_caches(model) -> None:
    """Empty the functools caches of the model's modules (megatron's rotary embeddings cache
    their `forward(seq_len)` output). Entries made during generation are inference-mode
    tensors; a training step that hit one would fail in autograd ("Inference tensors cannot be
    saved for backward") wherever the tensor is saved for backward (TE's fused RoPE does)."""
    seen: set[type] = set()
    for module in model.modules():
        cached = getattr(type(module), "forward", None)
        if type(module) not in seen and hasattr(cached, "cache_clear"):
            cached.cache_clear()
        seen.add(type(module))


class _TokenizerAdapter:
    """What the controller's static path asks of a tokenizer: `eod`, the id it pads the token
    matrix with (never fed to the model: a row is fed its prompt, then its samples) and strips
    from the end of a text, and `detokenize` for the request's text (this backend decodes the
    completion itself)."""

    def __init__(self, tokenizer, pad_id: int):
        self._tokenizer = tokenizer
        self.eod = pad_id

    def detokenize(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


class MegatronGenerationBackend(GenerationBackend):
    def __init__(self, actor, cfg: GenerationConfig, seed: int = 0, max_batch_size: Optional[int] = None):
        """`max_batch_size`: rows (samples) per static batch; None puts all samples of a call in
        one batch. A cap bounds the KV cache (rows x (longest prompt + max_new_tokens)); the
        engine then runs the batches one after another. Results do not depend on it."""
        check_generation_config(cfg)
        if len(actor.model_chunks) != 1:
            # megatron's inference wrappers refuse an interleaved (virtual pipeline) model.
            raise ValueError(
                "generation.backend 'megatron': megatron-core's inference engine does not support virtual "
                f"pipeline stages (got {len(actor.model_chunks)} model chunks on this rank)"
            )
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size: must be >= 1 or None, got {max_batch_size}")
        self.actor = actor
        self.cfg = cfg
        self.model = actor.model_chunks[0]
        self.max_batch_size = max_batch_size
        self.eos_ids = _eos_token_ids(actor)
        self._rng = torch.Generator().manual_seed(seed)
        self.device = next(self.model.parameters()).device
        self._mp_group = self._model_parallel_group()
        from transformers import AutoConfig

        self.max_positions = getattr(AutoConfig.from_pretrained(actor.hf_path), "max_position_embeddings", None)
        self._controller_class = _make_controller_class()

    @staticmethod
    def _model_parallel_group():
        """The TP x PP group whose ranks generate together, or None when this rank is alone."""
        from megatron.core import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            return None
        group = parallel_state.get_model_parallel_group()
        return group if torch.distributed.get_world_size(group) > 1 else None

    # -- sampling state ----------------------------------------------------------------------

    def _generators(self, params: SamplingParams, n: int) -> list[torch.Generator]:
        if params.seed is not None:
            seeds = [params.seed + i for i in range(n)]
        else:  # no request seed: draw from the backend's own seeded stream (host side)
            seeds = torch.randint(0, 2**62, (n,), generator=self._rng)
            if self._mp_group is not None:
                # Every rank of the group must sample alike; the streams agree when the ranks
                # built the backend with the same seed, and this makes it so regardless.
                src = torch.distributed.get_process_group_ranks(self._mp_group)[0]
                collectives.broadcast(seeds, src=src, group=self._mp_group)
            seeds = seeds.tolist()
        return [sampling_generator(int(s), self.device) for s in seeds]

    # -- engine session ----------------------------------------------------------------------

    @contextmanager
    def _engine_session(self):
        """Run the engine and put back everything it changes in the process (module docstring)."""
        from megatron.core.inference.engines import static_engine
        from megatron.core.inference.utils import InferenceMode
        from megatron.core.transformer.utils import set_model_to_sequence_parallel
        from megatron.core.utils import unwrap_model

        from nemo_igrpo.policy import cpu_compat

        cpu_compat.enable_inference_engine()
        bare = unwrap_model(self.model)
        was_training = self.model.training
        was_inference = InferenceMode.is_active()
        sequence_parallel = bool(bare.config.sequence_parallel)
        rng_devices = [self.device] if self.device.type == "cuda" else []
        quiet_tqdm = static_engine.tqdm
        with ExitStack() as stack:
            stack.enter_context(cpu_compat.cuda_to_cpu())
            stack.enter_context(torch.random.fork_rng(devices=rng_devices))
            stack.enter_context(warnings.catch_warnings())
            # The legacy engine warns at every construction that it will be deprecated.
            warnings.filterwarnings("ignore", message=".*static engine will be deprecated.*")
            # run_engine() draws a tqdm bar per call on stderr: silence it for this call only.
            static_engine.tqdm = lambda *args, **kwargs: quiet_tqdm(*args, **{**kwargs, "disable": True})
            try:
                if sequence_parallel:
                    set_model_to_sequence_parallel(bare, False)
                yield
            finally:
                static_engine.tqdm = quiet_tqdm
                _drop_inference_tensors_from_caches(bare)
                if sequence_parallel:
                    set_model_to_sequence_parallel(bare, True)
                if not was_inference:
                    InferenceMode.unset_active()
                self.model.train(was_training)

    def _run_engine(self, rows: list[_Row], request: _Request) -> None:
        from megatron.core.inference.contexts import StaticInferenceContext
        from megatron.core.inference.engines import StaticInferenceEngine
        from megatron.core.inference.inference_request import InferenceRequest
        from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
        from megatron.core.inference.sampling_params import SamplingParams as MegatronSamplingParams

        batch_size = min(len(rows), self.max_batch_size or len(rows))
        max_sequence_length = max(len(row.prompt) for row in rows) + request.max_new_tokens
        context = StaticInferenceContext(batch_size, max_sequence_length)
        pad_id = min(self.eos_ids) if self.eos_ids else 0
        controller = self._controller_class(
            GPTInferenceWrapper(self.model, context),
            _TokenizerAdapter(self.actor.tokenizer, pad_id),
            request,
            dict(enumerate(rows)),
        )
        engine = StaticInferenceEngine(controller, max_batch_size=batch_size, legacy=True)
        # Temperature / top-p / log-probs are applied by the controller's hooks; these are the
        # fields the engine's own loop reads (length, no prompt log-probs, no extra outputs).
        engine_params = MegatronSamplingParams(num_tokens_to_generate=request.max_new_tokens, return_log_probs=False)
        done = engine.generate(
            inference_requests=[
                InferenceRequest(request_id=i, prompt="", sampling_params=engine_params, prompt_tokens=list(row.prompt))
                for i, row in enumerate(rows)
            ]
        )
        for finished, row in zip(done, rows):
            # The engine fed back exactly what the hooks sampled (a cheap guard on the hooks).
            if finished.generated_tokens.tolist() != row.tokens:
                raise RuntimeError(
                    f"megatron engine: request {finished.request_id} returned {finished.generated_tokens.tolist()}, "
                    f"sampled {row.tokens}"
                )

    # -- the interface -----------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[GenerationResult]]:
        check_request(prompts, params)
        if self.max_positions is not None:
            for index, prompt in enumerate(prompts):
                if len(prompt) + params.max_new_tokens > self.max_positions:
                    raise ValueError(
                        f"prompt {index}: {len(prompt)} prompt + {params.max_new_tokens} new tokens exceed the "
                        f"model's {self.max_positions} positions"
                    )
        greedy = params.temperature == 0
        per_prompt = 1 if greedy else params.n  # greedy samples are one sample repeated
        rows = [
            _Row(prompt=list(prompt), generator=generator)
            for prompt in prompts
            for generator in ([None] if greedy else self._generators(params, per_prompt))
        ]
        request = _Request(
            temperature=params.temperature,
            top_p=params.top_p,
            max_new_tokens=params.max_new_tokens,
            stop_ids=self.eos_ids | set(params.stop_token_ids),
            stop_strings=list(params.stop_strings) + [s for s in self.cfg.stop_strings if s not in params.stop_strings],
            logprobs_mode=self.cfg.logprobs_mode,
            tokenizer=self.actor.tokenizer,
        )
        with self._engine_session():
            self._run_engine(rows, request)
        results = []
        for p in range(len(prompts)):
            mine = rows[p * per_prompt : (p + 1) * per_prompt]
            results.append([self._result(mine[0 if greedy else i]) for i in range(params.n)])
        return results

    def _result(self, row: _Row) -> GenerationResult:
        return GenerationResult(
            prompt_token_ids=list(row.prompt),
            token_ids=list(row.tokens),
            text=self.actor.tokenizer.decode(row.tokens, skip_special_tokens=True),
            logprobs=list(row.logprobs),
            finish_reason=row.finish or "length",
        )

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Nothing to do: this backend samples with the trainer's own parameters."""
        logger.debug("megatron generation backend: update_weights is a no-op (shared parameters)")
