"""Build the generation backend named by `generation.backend`; the rollout code sees only the
`GenerationBackend` interface."""

from __future__ import annotations

from typing import Optional

from nemo_igrpo.generation.common import check_generation_config
from nemo_igrpo.generation.config import BACKENDS, GenerationConfig
from nemo_igrpo.generation.interface import GenerationBackend


def build_generation_backend(
    cfg: GenerationConfig, hf_path: str, *, seed: int, actor: Optional[object] = None, per_rank_engine: bool = False
) -> GenerationBackend:
    """`hf_path`: the policy's HF checkpoint dir (initial weights of the colocated engine, and
    the tokenizer the server clients fall back on). `actor`: the MegatronActor, needed by the
    in-framework backend only. `per_rank_engine`: this rank's engine of a data-parallel
    generation job (generation/data_parallel.py). Imports are lazy so a run that does not use
    vLLM never imports it."""
    if cfg.backend not in BACKENDS:
        raise ValueError(f"generation.backend: {cfg.backend!r} is not one of {list(BACKENDS)}")
    check_generation_config(cfg)
    if cfg.backend == "vllm":
        from nemo_igrpo.generation.vllm_colocated import VLLMColocatedBackend

        return VLLMColocatedBackend(hf_path, cfg, seed=seed, external_launcher=per_rank_engine)
    if cfg.backend == "vllm_server":
        from nemo_igrpo.generation.openai_server import OpenAIServerBackend

        return OpenAIServerBackend(cfg, hf_path, seed=seed)
    if cfg.backend == "trtllm_server":
        from nemo_igrpo.generation.trtllm_server import TRTLLMServerBackend

        return TRTLLMServerBackend(cfg, hf_path, seed=seed)
    if actor is None:
        raise ValueError("generation.backend 'megatron' generates with the policy itself: pass actor=")
    from nemo_igrpo.generation.megatron_backend import MegatronGenerationBackend

    return MegatronGenerationBackend(actor, cfg, seed=seed)
