"""Pieces every generation backend shares: request validation, weight buckets, and the
train/inference log-prob mismatch metric."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union, get_args

import torch

from nemo_igrpo.generation.config import (
    GenerationConfig,
    LogprobsMode,
    Quantization,
    SleepLevel,
    VLLMConfig,
    WeightTransport,
)
from nemo_igrpo.generation.interface import SamplingParams

logger = logging.getLogger(__name__)

SUPPORTED_LOGPROBS_MODES = get_args(LogprobsMode)
FINISH_REASONS = ("stop", "length")
# How weights reach each kind of server (see docs/generation.md).
SERVER_WEIGHT_SYNC_PATHS = {
    "vllm_server": ("reload_from_dir", "nccl", "none"),
    "trtllm_server": ("cuda_ipc", "none"),
}


def vllm_cpu_environment(cfg: VLLMConfig) -> dict[str, str]:
    """The environment variables the CPU build of vLLM reads at engine start-up.

    VLLM_CPU_KVCACHE_SPACE (GiB) sizes the KV cache; without it vLLM-cpu guesses from host
    memory. VLLM_CPU_OMP_THREADS_BIND / VLLM_CPU_NUM_OF_RESERVED_CPU decide which cores the
    worker's OpenMP threads are pinned to. They must be set before the engine (or `vllm serve`)
    starts; GPU builds ignore them.
    """
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(cfg.cpu_kvcache_space_gb),
        "VLLM_CPU_OMP_THREADS_BIND": cfg.cpu_omp_threads_bind,
    }
    if cfg.cpu_reserved_cpus is not None:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(cfg.cpu_reserved_cpus)
    return env


def apply_vllm_cpu_environment(cfg: VLLMConfig) -> None:
    """Export `vllm_cpu_environment(cfg)` into this process; a value already in the environment
    wins (an operator's explicit setting) and is logged when it differs from the config."""
    for key, value in vllm_cpu_environment(cfg).items():
        current = os.environ.get(key)
        if current is None:
            os.environ[key] = value
        elif current != value:
            logger.info("%s=%s from the environment overrides the config value %s", key, current, value)


# Architectures whose layers carry a recurrent (Mamba-2) state: vLLM keeps that state in a
# separate cache with its own settings.
VLLM_HYBRID_ARCHITECTURES = ("NemotronHForCausalLM",)


def vllm_hybrid_engine_kwargs(model_dir: str, *, on_cpu: bool) -> dict:
    """`vllm.LLM(...)` keyword overrides for a hybrid Mamba checkpoint ({} for any other model);
    the colocated backend applies them on top of vllm_engine_kwargs.

    - mamba_ssm_cache_dtype: passed through from the checkpoint's config.json (transformers'
      NemotronHConfig default "float32"; what vLLM would pick itself, made explicit so it is
      visible in the engine arguments). The decode state then accumulates in float32, as the
      trainer's scan does, which keeps the train/inference log-prob gap at its bf16 floor.
    - enable_prefix_caching=False on CPU: with prefix caching vLLM 0.32 switches hybrid models to
      mamba_cache_mode='align', whose CPU scan ignores return_intermediate_states, and prompts
      longer than a cache block crash in mamba_mixer2 (IndexError). On GPUs the setting stays.
    """
    import json

    try:
        data = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    if (data.get("architectures") or [None])[0] not in VLLM_HYBRID_ARCHITECTURES:
        return {}
    kwargs: dict = {"mamba_ssm_cache_dtype": data.get("mamba_ssm_cache_dtype") or "float32"}
    if on_cpu:
        kwargs["enable_prefix_caching"] = False
    return kwargs


# vLLM's online quantization schemes (bf16 weights in, quantized in the engine on every load):
# the ones that fit a trainer streaming new weights each step.
VLLM_ONLINE_QUANTIZATION = get_args(Quantization)


def check_generation_config(cfg: GenerationConfig) -> None:
    """Raise ValueError naming the key when a generation setting cannot work."""
    if cfg.logprobs_mode not in SUPPORTED_LOGPROBS_MODES:
        raise ValueError(
            f"generation.logprobs_mode: {cfg.logprobs_mode!r} is not one of {list(SUPPORTED_LOGPROBS_MODES)}"
        )
    if cfg.weight_sync_bucket_mb <= 0:
        raise ValueError(f"generation.weight_sync_bucket_mb: must be > 0, got {cfg.weight_sync_bucket_mb}")
    if cfg.vllm.sleep_level not in get_args(SleepLevel):
        raise ValueError(f"generation.vllm.sleep_level: must be 1 or 2, got {cfg.vllm.sleep_level}")
    if cfg.server.max_concurrent_requests < 1:
        raise ValueError(
            f"generation.server.max_concurrent_requests: must be >= 1, got {cfg.server.max_concurrent_requests}"
        )
    if cfg.server.max_retries < 0:
        raise ValueError(f"generation.server.max_retries: must be >= 0, got {cfg.server.max_retries}")
    if cfg.server.timeout_s <= 0:
        raise ValueError(f"generation.server.timeout_s: must be > 0, got {cfg.server.timeout_s}")
    if cfg.server.connect_timeout_s <= 0:
        raise ValueError(f"generation.server.connect_timeout_s: must be > 0, got {cfg.server.connect_timeout_s}")
    if cfg.server.backoff_s < 0:
        raise ValueError(f"generation.server.backoff_s: must be >= 0, got {cfg.server.backoff_s}")
    allowed_sync = SERVER_WEIGHT_SYNC_PATHS.get(cfg.backend, SERVER_WEIGHT_SYNC_PATHS["vllm_server"])
    if cfg.server.weight_sync not in allowed_sync:
        raise ValueError(
            f"generation.server.weight_sync: {cfg.server.weight_sync!r} is not one of "
            f"{list(allowed_sync)} (generation.backend={cfg.backend!r})"
        )
    if cfg.vllm.quantization is not None and cfg.vllm.quantization not in VLLM_ONLINE_QUANTIZATION:
        raise ValueError(
            f"generation.vllm.quantization: {cfg.vllm.quantization!r} is not one of "
            f"{list(VLLM_ONLINE_QUANTIZATION)} (or null for none)"
        )
    if cfg.vllm.weight_transport not in get_args(WeightTransport):
        raise ValueError(
            f"generation.vllm.weight_transport: {cfg.vllm.weight_transport!r} is not one of "
            f"{list(get_args(WeightTransport))}"
        )
    if cfg.vllm.cpu_kvcache_space_gb < 1:
        raise ValueError(f"generation.vllm.cpu_kvcache_space_gb: must be >= 1, got {cfg.vllm.cpu_kvcache_space_gb}")


def check_request(prompts: Sequence[Sequence[int]], params: SamplingParams, vocab_size: Optional[int] = None) -> None:
    """Reject malformed requests before they reach an engine, naming the sample or the key."""
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            raise TypeError(f"prompt {i}: got text; backends take token ids (tokenise once, in the rollout code)")
        if len(prompt) == 0:
            raise ValueError(f"prompt {i}: empty token-id list")
        for tok in prompt:
            if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
                raise ValueError(f"prompt {i}: token id {tok!r} is not a non-negative int")
            if vocab_size is not None and tok >= vocab_size:
                raise ValueError(f"prompt {i}: token id {tok} is outside the vocabulary (size {vocab_size})")
    if not params.temperature >= 0:
        raise ValueError(f"sampling temperature: must be >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise ValueError(f"sampling top_p: must be in (0, 1], got {params.top_p}")
    if params.max_new_tokens < 1:
        raise ValueError(f"sampling max_new_tokens: must be >= 1, got {params.max_new_tokens}")
    if params.n < 1:
        raise ValueError(f"sampling n: must be >= 1, got {params.n}")
    for tok in params.stop_token_ids:
        if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
            raise ValueError(f"sampling stop_token_ids: {tok!r} is not a non-negative int")


def normalise_finish_reason(reason: Optional[str], where: str) -> str:
    """Backends report "stop" (a stop token/string or EOS) or "length"; anything else is an error
    the caller should see (e.g. "abort" when the engine dropped the request)."""
    if reason in FINISH_REASONS:
        return reason
    raise RuntimeError(f"{where}: generation ended with finish reason {reason!r} (expected 'stop' or 'length')")


def iter_weight_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group (name, tensor) pairs into lists of at most `bucket_bytes` (a single larger tensor
    gets a bucket of its own). Pulls lazily from the iterable, so the caller never holds more
    than one bucket of exported weights beyond what the trainer already has."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket size must be > 0 bytes, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    seen: set[str] = set()
    for name, tensor in named_tensors:
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"weights must be (str, torch.Tensor) pairs, got ({type(name).__name__}, {type(tensor).__name__})"
            )
        if name in seen:
            raise ValueError(f"weight {name!r} appears twice in one update")
        seen.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def host_bucket(bucket: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of a bucket, keyed by name, ready for safetensors.

    safetensors refuses tensors that share memory (e.g. tied embedding and LM-head weights
    exported as views of one tensor), so a tensor whose storage was already seen is cloned.
    On GPU this is the one device-to-host copy per bucket that HTTP/RPC transport needs.
    """
    out: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in bucket:
        host = tensor.detach().to("cpu").contiguous()
        ptr = host.untyped_storage().data_ptr()
        if ptr in seen_storages:
            host = host.clone()
        seen_storages.add(host.untyped_storage().data_ptr())
        out[name] = host
    return out


def bucket_to_safetensors_bytes(bucket: list[tuple[str, torch.Tensor]]) -> bytes:
    from safetensors.torch import save

    return save(host_bucket(bucket))


def _flatten_logprobs(values: Union[torch.Tensor, Sequence], what: str) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().to(torch.float64).reshape(-1)
    flat: list[float] = []
    for v in values:
        if isinstance(v, (list, tuple)):
            flat.extend(float(x) for x in v)
        elif isinstance(v, torch.Tensor):
            flat.extend(v.detach().to(torch.float64).reshape(-1).tolist())
        else:
            flat.append(float(v))
    return torch.tensor(flat, dtype=torch.float64)


def logprob_mismatch(
    train_logprobs: Union[torch.Tensor, Sequence],
    gen_logprobs: Union[torch.Tensor, Sequence],
    mask: Optional[torch.Tensor] = None,
    warn_above: Optional[float] = 1.05,
) -> float:
    """Mean over tokens of exp(|logp_train - logp_gen|): 1.0 when trainer and generator agree.

    Takes tensors of equal shape or (ragged) lists of per-sequence log-probs. `mask` (same shape
    as the tensors) selects the tokens that count. Logs a warning above `warn_above` (pass
    `cfg.logprob_mismatch_warn`; None disables the warning): a large value means the generator's
    weights, precision or log-prob mode differ from the trainer's, and the importance ratio is
    off before any optimisation happened.
    """
    train = _flatten_logprobs(train_logprobs, "train_logprobs")
    gen = _flatten_logprobs(gen_logprobs, "gen_logprobs")
    if train.shape != gen.shape:
        raise ValueError(f"train_logprobs has {train.numel()} tokens, gen_logprobs has {gen.numel()}")
    if mask is not None:
        keep = mask.detach().reshape(-1).to(torch.bool)
        if keep.numel() != train.numel():
            raise ValueError(f"mask has {keep.numel()} entries for {train.numel()} tokens")
        train, gen = train[keep], gen[keep]
    if train.numel() == 0:
        raise ValueError("logprob_mismatch: no tokens to compare")
    if not (torch.isfinite(train).all() and torch.isfinite(gen).all()):
        raise ValueError("logprob_mismatch: non-finite log-prob (check generation.logprobs_mode and top_p)")
    value = float(torch.exp((train - gen).abs()).mean())
    warn_on_logprob_mismatch(value, train.numel(), warn_above)
    if math.isnan(value):
        raise ValueError("logprob_mismatch: result is NaN")
    return value


def warn_on_logprob_mismatch(value: float, num_tokens: int, warn_above: Optional[float]) -> None:
    """The warning of `logprob_mismatch`, for callers that measured the value themselves (the
    actor measures it inside the update's forward pass)."""
    if warn_above is not None and not value <= warn_above:
        logger.warning(
            "train/inference log-prob mismatch %.4f exceeds %.4f over %d tokens: the generator does not "
            "match the trainer (stale weights after sync, precision, or logprobs_mode)",
            value,
            warn_above,
            num_tokens,
        )
