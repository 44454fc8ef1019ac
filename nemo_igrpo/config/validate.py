"""Semantic checks on a composed config: values that type-check but cannot work together."""

from __future__ import annotations

from nemo_igrpo.config.schema import IGRPOConfig


def _fail(source: str, key: str, msg: str) -> None:
    from nemo_igrpo.config.loader import ConfigError

    raise ConfigError(f"{source}: '{key}': {msg}")


def _choice(source: str, key: str, value, allowed) -> None:
    if value not in allowed:
        _fail(source, key, f"{value!r} is not one of {sorted(allowed, key=str)}")


def validate_config(cfg: IGRPOConfig, source: str = "config") -> None:
    a = cfg.algorithm
    # One source of truth for algorithm.* (library users get the same checks from the rollout).
    from nemo_igrpo.algorithms.validation import algorithm_config_problems

    for key, msg in algorithm_config_problems(a, cfg.generation):
        _fail(source, key, msg)

    p = cfg.policy
    for key in ("tensor_parallel_size", "pipeline_parallel_size"):
        if getattr(p, key) < 1:
            _fail(source, f"policy.{key}", "must be >= 1")
    _choice(source, "policy.precision", p.precision, {"fp32", "bf16"})
    _choice(source, "policy.fp8", p.fp8, {None, "delayed", "tensorwise", "blockwise", "mxfp8"})
    _choice(source, "policy.activation_recompute", p.activation_recompute, {None, "selective", "full"})
    _choice(source, "policy.model.transformer_impl", p.model.transformer_impl, {"auto", "transformer_engine", "local"})

    g = cfg.generation
    _choice(source, "generation.backend", g.backend, {"vllm", "vllm_server", "megatron", "trtllm_server"})
    if not (g.temperature >= 0):
        _fail(source, "generation.temperature", "must be >= 0")
    if not (0 < g.top_p <= 1):
        _fail(source, "generation.top_p", "must be in (0, 1]")
    if g.max_new_tokens < 1:
        _fail(source, "generation.max_new_tokens", "must be >= 1")
    # The backends' own checks (sync paths, server limits, vLLM settings), at load time rather
    # than minutes later when the engine starts.
    from nemo_igrpo.generation.common import check_generation_config

    try:
        check_generation_config(g)
    except ValueError as e:
        key, _, msg = str(e).partition(": ")
        _fail(source, key, msg)

    if cfg.data.prompts_per_step < 1:
        _fail(source, "data.prompts_per_step", "must be >= 1")
    if cfg.trainer.max_steps < 0:
        _fail(source, "trainer.max_steps", "must be >= 0")
    if not cfg.reward.terms:
        _fail(source, "reward.terms", "at least one reward term is needed")
    if cfg.reward.timeout_s <= 0:
        _fail(source, "reward.timeout_s", "must be > 0")
