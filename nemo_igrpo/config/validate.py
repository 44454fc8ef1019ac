"""Semantic checks on a composed config: values that type-check but cannot work together.

Everything here runs at load time, before any model or engine is built, so a setting that
could only fail minutes later (inside megatron-core, after the actor is built) fails in a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from nemo_igrpo.config.schema import IGRPOConfig
from nemo_igrpo.utils.errors import ConfigError


def _fail(source: str, key: str, msg: str) -> None:
    raise ConfigError(f"{source}: '{key}': {msg}")


def _model_heads(cfg: IGRPOConfig) -> Optional[tuple[int, int, str, str]]:
    """(attention heads, key/value heads, where each number comes from) of the policy's model.

    Read from policy.model.hf_path's config.json, or from policy.model.tiny when hf_path is unset.
    None when the checkpoint is not on this machine (a cluster config loaded on a login node: the
    launcher checks the known models' shapes) or its config.json does not give the heads.
    """
    model = cfg.policy.model
    if not model.hf_path:
        tiny = model.tiny
        return (
            tiny.num_attention_heads,
            tiny.num_query_groups,
            "policy.model.tiny.num_attention_heads",
            "policy.model.tiny.num_query_groups",
        )
    config_json = Path(model.hf_path) / "config.json"
    try:
        data = json.loads(config_json.read_text())
    except (OSError, ValueError):
        return None  # absent here, or unreadable: the actor reports it where the model is loaded
    if not isinstance(data, dict):
        return None
    heads = data.get("num_attention_heads")
    kv = data.get("num_key_value_heads")
    if not isinstance(heads, int) or heads < 1:
        return None
    kv_where = f"num_key_value_heads in {config_json}"
    if kv is None:  # no GQA: every attention head has its own key/value head
        kv, kv_where = heads, f"num_attention_heads in {config_json}, which has no num_key_value_heads"
    if not isinstance(kv, int) or kv < 1:
        return None
    return heads, kv, f"num_attention_heads in {config_json}", kv_where


def _check_tensor_parallel(source: str, key: str, tp: int, heads: tuple[int, int, str, str], what: str) -> None:
    """The rule megatron-core (TransformerConfig) and vLLM enforce at start-up: TP divides the
    attention heads, and the key/value heads are a multiple of TP or divide it (then each KV head
    is replicated on TP / kv ranks)."""
    num_heads, num_kv, heads_where, kv_where = heads
    if tp < 1:
        return  # reported by the ">= 1" check
    allowed = [d for d in range(1, num_heads + 1) if num_heads % d == 0 and (num_kv % d == 0 or d % num_kv == 0)]
    if num_heads % tp:
        _fail(
            source,
            key,
            f"{tp} does not divide the model's {num_heads} attention heads ({heads_where}); "
            f"{what} needs a tensor parallel size among {allowed}",
        )
    if num_kv % tp and tp % num_kv:
        _fail(
            source,
            key,
            f"{tp} and the model's {num_kv} key/value heads ({kv_where}) must divide one another; "
            f"{what} needs a tensor parallel size among {allowed}",
        )


def validate_config(cfg: IGRPOConfig, source: str = "config", import_reward_terms: bool = True) -> None:
    """Raise ConfigError naming the file and key of the first setting that cannot work.

    import_reward_terms=False skips importing `module:function` reward terms and algorithm
    plug-ins (algorithm.policy_loss=my_pkg.losses:my_loss, ...): a login node that renders a Slurm
    job may not have the user's package; the job itself checks them at start."""
    a = cfg.algorithm
    # One source of truth for algorithm.* (library users get the same checks from the rollout).
    from nemo_igrpo.algorithms.validation import algorithm_config_problems

    for key, msg in algorithm_config_problems(a, cfg.generation, import_plugins=import_reward_terms):
        _fail(source, key, msg)

    p = cfg.policy
    for key in ("tensor_parallel_size", "pipeline_parallel_size"):
        if getattr(p, key) < 1:
            _fail(source, f"policy.{key}", "must be >= 1")
    if not p.model.hf_path:
        for key in ("num_attention_heads", "num_query_groups"):
            if getattr(p.model.tiny, key) < 1:
                _fail(source, f"policy.model.tiny.{key}", "must be >= 1")
    heads = _model_heads(cfg)
    if heads is not None:
        _check_tensor_parallel(source, "policy.tensor_parallel_size", p.tensor_parallel_size, heads, "megatron-core")
        if cfg.generation.backend == "vllm":  # the colocated engine is built in this job with this TP
            _check_tensor_parallel(
                source, "generation.vllm.tensor_parallel_size", cfg.generation.vllm.tensor_parallel_size, heads, "vLLM"
            )

    g = cfg.generation
    if not (g.temperature >= 0):
        _fail(source, "generation.temperature", "must be >= 0")
    if not (0 < g.top_p <= 1):
        _fail(source, "generation.top_p", "must be in (0, 1]")
    if g.max_new_tokens < 1:
        _fail(source, "generation.max_new_tokens", "must be >= 1")
    if g.data_parallel and g.backend == "vllm" and g.vllm.tensor_parallel_size != 1:
        # One engine per GPU under torchrun (generation/data_parallel.py); a single-process run
        # is unaffected, but the same config must work when launched on a node.
        _fail(
            source,
            "generation.vllm.tensor_parallel_size",
            f"{g.vllm.tensor_parallel_size} with generation.data_parallel=true: every GPU runs its own vLLM engine "
            "(tensor parallel size 1); set generation.data_parallel=false for one engine spanning several GPUs",
        )
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
    # Term names (registered, or module:function imported now), kwargs, correctness term, judge
    # settings: the RewardManager's own checks, without starting its worker processes.
    from nemo_igrpo.rewards.manager import RewardConfigError, check_reward_config

    try:
        check_reward_config(cfg.reward, import_paths=import_reward_terms)
    except RewardConfigError as e:
        key, _, msg = str(e).partition(": ")
        _fail(source, key, msg)
