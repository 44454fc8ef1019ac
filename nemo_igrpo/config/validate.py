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
    if a.num_drafts < 0:
        _fail(source, "algorithm.num_drafts", "must be >= 0 (0 means plain GRPO)")
    if a.num_refinements < 2:
        _fail(
            source,
            "algorithm.num_refinements",
            f"must be >= 2: group-relative advantages over {a.num_refinements} sample(s) are always zero",
        )
    if a.refinement_rounds < 1:
        _fail(source, "algorithm.refinement_rounds", "must be >= 1")
    if a.refinement_rounds > 1 and a.num_drafts == 0:
        _fail(source, "algorithm.refinement_rounds", "extra refinement rounds need drafts (algorithm.num_drafts > 0)")
    _choice(source, "algorithm.tie_break", a.tie_break, {"random", "first"})
    _choice(source, "algorithm.all_zero_drafts", a.all_zero_drafts, {"append", "skip"})
    _choice(
        source,
        "algorithm.loss_aggregation",
        a.loss_aggregation,
        {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"},
    )
    _choice(source, "algorithm.kl_estimator", a.kl_estimator, {"k1", "k2", "k3"})
    if a.kl_beta < 0:
        _fail(source, "algorithm.kl_beta", "must be >= 0")
    if not (0 <= a.clip_eps_low < 1 and a.clip_eps_high >= 0):
        _fail(source, "algorithm.clip_eps_low", "need 0 <= clip_eps_low < 1 and clip_eps_high >= 0")
    if a.dual_clip_c is not None and a.dual_clip_c <= 1:
        _fail(source, "algorithm.dual_clip_c", "must be > 1 (dual clip bounds the loss of negative advantages)")
    if a.minibatches_per_step < 1:
        _fail(source, "algorithm.minibatches_per_step", "must be >= 1")
    from nemo_igrpo.algorithms.advantages import ADVANTAGE_ESTIMATORS
    from nemo_igrpo.algorithms.losses import POLICY_LOSSES

    _choice(source, "algorithm.advantage", a.advantage, set(ADVANTAGE_ESTIMATORS))
    _choice(source, "algorithm.policy_loss", a.policy_loss, set(POLICY_LOSSES))
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

    if cfg.data.prompts_per_step < 1:
        _fail(source, "data.prompts_per_step", "must be >= 1")
    if cfg.trainer.max_steps < 0:
        _fail(source, "trainer.max_steps", "must be >= 0")
    if not cfg.reward.terms:
        _fail(source, "reward.terms", "at least one reward term is needed")
    if cfg.reward.timeout_s <= 0:
        _fail(source, "reward.timeout_s", "must be > 0")
