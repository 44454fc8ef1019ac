"""In-framework generation: KV-cached sampling on the Megatron policy itself.

The reference backend for CPU debugging and for environments without vLLM. It samples from
`actor.model_chunks` directly, so it never needs a weight sync (update_weights() is a no-op and
does not iterate the export, which therefore costs nothing when the trainer passes it anyway).

How: megatron-core's `StaticInferenceContext` holds the KV cache; each layer's attention
appends the new keys/values to it and attends over the cached prefix. One prompt at a time, its
`n` samples as one batch (they share the prompt length, so no padding): a prefill pass over the
prompt, then one forward per new token. Rows that have finished keep being fed (the batch is
static) but their outputs are ignored; the loop ends when every row has finished.

Sampling matches vLLM's semantics: temperature 0 is greedy; otherwise softmax(logits / T) with
top-p truncation, drawn with a torch.Generator seeded `seed + i` for sample i when the request
has a seed. Log-probs follow `generation.logprobs_mode`: "raw_logprobs" is the log-softmax of
the raw logits (what the trainer recomputes), "processed_logprobs" the distribution actually
sampled from. Finish reasons: "stop" on EOS, a stop token or a stop string; else "length".

Limits: tensor and pipeline parallel size 1 (one process holds the whole model); a clear error
otherwise. Generation runs on the rank that calls it (no collectives), in eval mode under
no_grad; the model's train/eval mode is restored afterwards.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterable, Optional

import torch

from nemo_igrpo.generation.common import check_generation_config, check_request
from nemo_igrpo.generation.config import GenerationConfig
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
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already enough
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sampling_generator(seed: int, device: torch.device) -> torch.Generator:
    """A seeded generator on `device`: torch.multinomial draws with a generator of the
    probabilities' own device only (a CPU generator with CUDA probabilities raises), so the
    generator lives where the model's logits are."""
    return torch.Generator(device=device).manual_seed(seed)


class MegatronGenerationBackend(GenerationBackend):
    def __init__(self, actor, cfg: GenerationConfig, seed: int = 0):
        check_generation_config(cfg)
        policy_cfg = actor.cfg
        if policy_cfg.tensor_parallel_size != 1 or policy_cfg.pipeline_parallel_size != 1:
            raise ValueError(
                "generation.backend 'megatron' supports policy.tensor_parallel_size=1 and "
                f"policy.pipeline_parallel_size=1 only (got {policy_cfg.tensor_parallel_size} and "
                f"{policy_cfg.pipeline_parallel_size}); use the vLLM backends for parallel models"
            )
        if len(actor.model_chunks) != 1:
            raise ValueError(f"generation.backend 'megatron': expected one model chunk, got {len(actor.model_chunks)}")
        self.actor = actor
        self.cfg = cfg
        self.model = actor.model_chunks[0]
        self.eos_ids = _eos_token_ids(actor)
        self._rng = torch.Generator().manual_seed(seed)
        self.device = next(self.model.parameters()).device
        from transformers import AutoConfig

        self.max_positions = getattr(AutoConfig.from_pretrained(actor.hf_path), "max_position_embeddings", None)

    # -- helpers ---------------------------------------------------------------------------

    @contextmanager
    def _inference_mode(self):
        from nemo_igrpo.policy import cpu_compat

        was_training = self.model.training
        self.model.eval()
        try:
            with cpu_compat.cuda_to_cpu(), torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, context) -> torch.Tensor:
        logits = self.model(tokens, positions, None, inference_context=context)
        return logits[:, -1, :].float()  # [batch, vocab]

    def _logprobs_and_next(self, logits: torch.Tensor, params: SamplingParams, generators) -> tuple[torch.Tensor, torch.Tensor]:
        raw = torch.log_softmax(logits, dim=-1)
        if params.temperature == 0:
            chosen = logits.argmax(dim=-1)
            return raw.gather(1, chosen[:, None])[:, 0], chosen
        processed_logits = top_p_filter(logits / params.temperature, params.top_p)
        probs = processed_logits.softmax(dim=-1)
        chosen = torch.stack(
            [torch.multinomial(probs[row], 1, generator=generators[row])[0] for row in range(probs.shape[0])]
        )
        source = raw if self.cfg.logprobs_mode == "raw_logprobs" else torch.log_softmax(processed_logits, dim=-1)
        return source.gather(1, chosen[:, None])[:, 0], chosen

    def _generators(self, params: SamplingParams, n: int) -> list[torch.Generator]:
        generators = []
        for i in range(n):
            if params.seed is not None:
                seed = params.seed + i
            else:  # no request seed: draw from the backend's own seeded stream (host side)
                seed = int(torch.randint(0, 2**62, (1,), generator=self._rng))
            generators.append(sampling_generator(seed, self.device))
        return generators

    # -- the interface ---------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[GenerationResult]]:
        check_request(prompts, params)
        with self._inference_mode():
            return [self._generate_one(i, list(p), params) for i, p in enumerate(prompts)]

    def _generate_one(self, index: int, prompt: list[int], params: SamplingParams) -> list[GenerationResult]:
        from megatron.core.inference.contexts import StaticInferenceContext

        n = params.n
        total = len(prompt) + params.max_new_tokens
        if self.max_positions is not None and total > self.max_positions:
            raise ValueError(
                f"prompt {index}: {len(prompt)} prompt + {params.max_new_tokens} new tokens exceed the model's "
                f"{self.max_positions} positions"
            )
        stop_ids = self.eos_ids | set(params.stop_token_ids)
        stop_strings = list(params.stop_strings) + [s for s in self.cfg.stop_strings if s not in params.stop_strings]
        generators = self._generators(params, n)
        context = StaticInferenceContext(n, total)
        tokens = torch.tensor([prompt] * n, device=self.device)
        positions = torch.arange(len(prompt), device=self.device)[None].expand(n, -1)
        logits = self._forward(tokens, positions, context)
        context.sequence_len_offset += len(prompt)

        out_tokens: list[list[int]] = [[] for _ in range(n)]
        out_logprobs: list[list[float]] = [[] for _ in range(n)]
        finish: list[Optional[str]] = [None] * n
        for step in range(params.max_new_tokens):
            logprobs, chosen = self._logprobs_and_next(logits, params, generators)
            for row in range(n):
                if finish[row] is not None:
                    continue
                token = int(chosen[row])
                out_tokens[row].append(token)
                out_logprobs[row].append(float(logprobs[row]))
                if token in stop_ids:
                    finish[row] = "stop"
                elif stop_strings:
                    text = self.actor.tokenizer.decode(out_tokens[row], skip_special_tokens=True)
                    if any(s in text for s in stop_strings):
                        finish[row] = "stop"
            if all(f is not None for f in finish) or step == params.max_new_tokens - 1:
                break
            position = torch.full((n, 1), context.sequence_len_offset, device=self.device)
            logits = self._forward(chosen[:, None].to(self.device), position, context)
            context.sequence_len_offset += 1
        return [
            GenerationResult(
                prompt_token_ids=list(prompt),
                token_ids=out_tokens[row],
                text=self.actor.tokenizer.decode(out_tokens[row], skip_special_tokens=True),
                logprobs=out_logprobs[row],
                finish_reason=finish[row] or "length",
            )
            for row in range(n)
        ]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Nothing to do: this backend samples with the trainer's own parameters."""
        logger.debug("megatron generation backend: update_weights is a no-op (shared parameters)")
