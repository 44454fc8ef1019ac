"""Build the megatron-core model of the policy from a Hugging Face checkpoint directory.

Every model goes through the same path, tiny test models included: an HF directory ->
megatron-bridge's AutoBridge -> a GPTModelProvider (dense decoders) or HybridModelProvider
(Nemotron-H, see hybrid.py) that we adjust (layer spec, precision, recompute, FP8, RL-specific
dropout) -> megatron model chunks (DDP- and Float16Module-wrapped for the trained policy).
Keeping one path means what CI tests on CPU is what runs on GPUs, and vLLM loads exactly the
directory the actor started from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, get_args

import torch

from nemo_igrpo.policy import cpu_compat
from nemo_igrpo.policy.config import FP8Recipe, PolicyConfig, Precision, Recompute, TinyModelConfig
from nemo_igrpo.policy.fusions import apply_fusion_decisions
from nemo_igrpo.utils.errors import UnsupportedModelError

# Dense decoder families the actor's layer specs (TE, or local + SDPA) build correctly. The
# DeepSeek-R1-Distill-Qwen and OpenMath-Nemotron checkpoints are Qwen2ForCausalLM.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
HYBRID_ARCHITECTURES = ("NemotronHForCausalLM",)

FP8_RECIPES: tuple[str, ...] = get_args(FP8Recipe)


def read_architecture(hf_dir: str | Path) -> str:
    config_path = Path(hf_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"policy.model.hf_path: {hf_dir} has no config.json (not a Hugging Face model directory)"
        )
    try:
        archs = json.loads(config_path.read_text()).get("architectures") or []
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: invalid JSON ({e})") from e
    if not archs:
        raise UnsupportedModelError(f"{config_path}: no 'architectures' entry; cannot tell which model this is")
    arch = archs[0]
    if arch in HYBRID_ARCHITECTURES:
        from nemo_igrpo.policy.hybrid import check_hybrid_config

        check_hybrid_config(config_path, json.loads(config_path.read_text()))
        return arch
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{config_path}: architecture {arch} is not supported yet. "
            f"Supported: {', '.join(SUPPORTED_ARCHITECTURES + HYBRID_ARCHITECTURES)}"
        )
    return arch


def tiny_model_dir(tiny: TinyModelConfig, cache_dir: str | Path, seed: int) -> Path:
    """Where the tiny HF model for this config and seed lives (content-addressed)."""
    key = hashlib.sha256(json.dumps({**asdict(tiny), "seed": seed}, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"tiny-{tiny.arch}-{key}"


def make_tiny_model_dir(tiny: TinyModelConfig, cache_dir: str | Path, seed: int) -> Path:
    """Create (once; atomically: temp dir + rename) the tiny HF model directory. Call on one rank."""
    from nemo_igrpo.utils.tiny_model import make_tiny_hf_model

    out = tiny_model_dir(tiny, cache_dir, seed)
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    make_tiny_hf_model(
        tmp,
        arch=tiny.arch,
        num_layers=tiny.num_layers,
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.ffn_hidden_size,
        num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_query_groups,
        vocab_size=tiny.vocab_size,
        max_position_embeddings=tiny.max_position_embeddings,
        tie_word_embeddings=tiny.tie_word_embeddings,
        seed=seed,
    )
    if tiny.rotary_base != 10000.0:
        # make_tiny_hf_model writes rope_theta 10000; the weights do not depend on it.
        cfg_path = tmp / "config.json"
        data = json.loads(cfg_path.read_text())
        data["rope_theta"] = tiny.rotary_base
        if isinstance(data.get("rope_parameters"), dict):
            data["rope_parameters"]["rope_theta"] = tiny.rotary_base
        cfg_path.write_text(json.dumps(data, indent=2))
    try:
        os.rename(tmp, out)
    except OSError:
        # Another process won the race; its directory is complete (rename is atomic).
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@dataclass
class BuiltModel:
    bridge: Any  # megatron.bridge.AutoBridge
    provider: Any  # the GPTModelProvider or HybridModelProvider (a TransformerConfig)
    chunks: list  # megatron model chunks (one per virtual pipeline stage; we use one)
    transformer_impl: str  # "transformer_engine" | "local"
    sequence_parallel: bool = False


def _check_fp8(cfg: PolicyConfig, impl: str) -> None:
    if cfg.fp8 is None:
        return
    if cfg.fp8 not in FP8_RECIPES:
        raise ValueError(f"policy.fp8: {cfg.fp8!r} is not one of {', '.join(FP8_RECIPES)} (or null)")
    if impl != "transformer_engine":
        raise RuntimeError(
            f"policy.fp8={cfg.fp8} needs TransformerEngine (its FP8 GEMMs); transformer_engine.pytorch does not import "
            "here or policy.model.transformer_impl=local. Install TE (see docs/policy.md) or set policy.fp8=null."
        )
    if not torch.cuda.is_available():
        raise RuntimeError(f"policy.fp8={cfg.fp8} needs a GPU")
    major, minor = torch.cuda.get_device_capability()
    if cfg.fp8 == "mxfp8" and major < 10:
        raise RuntimeError(
            f"policy.fp8=mxfp8 needs a Blackwell GPU (compute capability 10.x); this one is {major}.{minor}"
        )
    if major < 9 and (major, minor) != (8, 9):
        raise RuntimeError(
            f"policy.fp8={cfg.fp8} needs FP8 tensor cores (Ada/Hopper or newer); this GPU is {major}.{minor}"
        )


def build_model(
    cfg: PolicyConfig,
    hf_dir: str | Path,
    *,
    trainable: bool,
    load_weights: bool = True,
) -> BuiltModel:
    """Model chunks for this rank's pipeline stage. `trainable`: wrap in megatron DDP (gradient
    buffers, DP reduction); otherwise a frozen model in eval mode (the KL reference)."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.transformer.module import MegatronModule

    from nemo_igrpo.policy.attention import layer_spec, resolve_transformer_impl

    hybrid = read_architecture(hf_dir) in HYBRID_ARCHITECTURES
    impl = resolve_transformer_impl(cfg.model.transformer_impl)
    if hybrid:
        from nemo_igrpo.policy.hybrid import check_hybrid_fp8

        check_hybrid_fp8(cfg.fp8)
    _check_fp8(cfg, impl)
    # Library callers build PolicyConfig without the loader's type check: the same lists, from the types.
    if cfg.precision not in get_args(Precision):
        raise ValueError(f"policy.precision: {cfg.precision!r} is not one of {', '.join(get_args(Precision))}")
    if cfg.activation_recompute is not None and cfg.activation_recompute not in get_args(Recompute):
        raise ValueError(
            f"policy.activation_recompute: {cfg.activation_recompute!r} is not one of null, "
            f"{', '.join(get_args(Recompute))}"
        )

    bridge_mod = cpu_compat.import_megatron_bridge()
    if load_weights:
        bridge = bridge_mod.AutoBridge.from_hf_pretrained(str(hf_dir))
    else:
        # Structure only (the weights come from a Megatron checkpoint): the directory needs a
        # config.json but no safetensors (e.g. a checkpoint's hf_template/).
        from transformers import AutoConfig

        bridge = bridge_mod.AutoBridge.from_hf_config(AutoConfig.from_pretrained(str(hf_dir)))
    provider = bridge.to_megatron_provider(load_weights=load_weights)
    provider.tensor_model_parallel_size = cfg.tensor_parallel_size
    provider.pipeline_model_parallel_size = cfg.pipeline_parallel_size
    if hybrid:
        from nemo_igrpo.policy.hybrid import configure_hybrid_provider

        configure_hybrid_provider(provider, cfg, impl)
    else:
        provider.transformer_layer_spec = lambda config: layer_spec(config, impl)
    # RL needs the log-probs of the training pass to equal those of the log-prob pass for the
    # same weights (the importance ratio starts at exactly 1): no dropout.
    provider.attention_dropout = 0.0
    provider.hidden_dropout = 0.0
    # Packed micro-batches have different token counts; with PP the stages exchange the
    # activation shape before each transfer instead of assuming one fixed shape.
    provider.variable_seq_lengths = True
    # megatron rejects variable_seq_lengths with the (MoE-only) allgather dispatcher even for
    # dense models; alltoall is the dispatcher it accepts (unused without experts).
    provider.moe_token_dispatcher_type = "alltoall"
    # Losses arrive already normalised over the whole step (LossNormalizer); see actor.py.
    provider.calculate_per_token_loss = True
    on_gpu = torch.cuda.is_available()
    # Fusion flags only where their kernels import (the bridge turns some on by what NVIDIA's
    # containers usually ship; see fusions.py), decided the same way on every machine.
    apply_fusion_decisions(provider, on_gpu=on_gpu, transformer_impl=impl)
    provider.sequence_parallel = uses_sequence_parallel(impl, cfg.tensor_parallel_size)
    if cfg.activation_recompute == "selective":
        provider.recompute_granularity = "selective"
    elif cfg.activation_recompute == "full":
        provider.recompute_granularity = "full"
        provider.recompute_method = "uniform"
        provider.recompute_num_layers = 1
    if cfg.fp8 is not None:
        # delayed/tensorwise scale per tensor and keep e5m2 for gradients ("hybrid");
        # blockwise and mxfp8 are e4m3 throughout.
        provider.fp8 = "hybrid" if cfg.fp8 in ("delayed", "tensorwise") else "e4m3"
        provider.fp8_recipe = cfg.fp8
    bf16 = cfg.precision == "bf16"
    provider.finalize()

    ddp_config = None
    if trainable:
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            overlap_param_gather=False,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
            average_in_collective=False,
            check_for_nan_in_grad=False,  # the actor skips non-finite updates itself
        )
    with cpu_compat.cuda_to_cpu():
        chunks = provider.provide_distributed_model(
            ddp_config=ddp_config,
            wrap_with_ddp=trainable,
            bf16=bf16,
            fp16=False,
            use_cpu_initialization=not on_gpu,
        )
    for chunk in chunks:
        if trainable:
            chunk.train()
        else:
            chunk.eval()
            for p in chunk.parameters():
                p.requires_grad_(False)
    assert all(isinstance(c, MegatronModule) for c in chunks)
    return BuiltModel(
        bridge=bridge,
        provider=provider,
        chunks=chunks,
        transformer_impl=impl,
        sequence_parallel=bool(provider.sequence_parallel),
    )


def uses_sequence_parallel(transformer_impl: str, tensor_parallel_size: int) -> bool:
    """Sequence parallelism (activations outside the TP regions split over the TP ranks) with
    the TransformerEngine spec whenever TP > 1, as NeMo-RL and Megatron-Bridge recipes run it:
    it divides the layer-input activations by TP at no extra communication (the all-reduces
    become reduce-scatter + all-gather). The local spec's torch LayerNorm does not support it."""
    return transformer_impl == "transformer_engine" and tensor_parallel_size > 1


def unwrap(chunk: Any) -> Any:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk
