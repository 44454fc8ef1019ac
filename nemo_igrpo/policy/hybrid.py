"""Nemotron-H (hybrid Mamba-2 / attention / MLP) as megatron-core's HybridModel.

megatron-bridge's Nemotron-H bridge turns a `NemotronHForCausalLM` checkpoint into a
`HybridModelProvider` (layer pattern such as "M-M-M*-...": M Mamba-2, * attention, - MLP, no
position embeddings) and maps every weight in both directions; model.py then treats the result
like a GPT model (same parallel state, DDP, optimizer, dist-checkpoints, HF export). What differs
lives here:

- the layer spec. With TransformerEngine: megatron-core's own `hybrid_stack_spec`. Without it
  (CPU, `transformer_impl: local`) no shipped spec avoids TE, so `local_hybrid_stack_spec` builds
  the same layers from megatron's own modules: torch RMSNorm, Column/RowParallelLinear, and the
  project's SDPA core attention. Its checkpoint keys are remapped to the TE spec's fused
  layer-norm names, so dist-checkpoints move between the two specs.
- provider settings the bridge sets for NVIDIA's containers and megatron rejects elsewhere (MoE
  fusions), and the FP8 rule (see `configure_hybrid_provider`).
- the Mamba kernels: on a machine without CUDA, torch references (mamba_reference.py, installed
  by cpu_compat.install_mamba_reference_kernels). On a GPU mamba-ssm and causal-conv1d must be
  installed (the container builds them); a clear error says so otherwise.

Packed micro-batches reset the SSM state at sequence boundaries through
`PackedSeqParams.seq_idx`, which megatron derives from cu_seqlens when `total_tokens` is set
(the actor sets it); the trailing padding segment of a pack is a sequence of its own.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import torch

# Layer symbols of megatron's hybrid pattern this actor builds (M Mamba-2, * attention, - MLP).
# E (MoE, Nemotron-3) and G (gated delta net) need layer specs and tests this project lacks.
SUPPORTED_LAYER_SYMBOLS = frozenset("M*-")


def is_hybrid_config(hf_dir: str | Path) -> bool:
    """True when an HF directory holds a hybrid (Mamba) model the hybrid path builds."""
    from nemo_igrpo.policy.model import HYBRID_ARCHITECTURES

    try:
        archs = json.loads((Path(hf_dir) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return bool(archs) and archs[0] in HYBRID_ARCHITECTURES


def check_hybrid_config(config_path: Path, data: dict) -> None:
    """Refuse hybrid checkpoints outside what this actor builds (called by read_architecture)."""
    from nemo_igrpo.policy.model import UnsupportedModelError

    pattern = data.get("hybrid_override_pattern")
    if pattern is None and isinstance(data.get("layers_block_type"), list):
        names = {"linear_attention": "M", "full_attention": "*", "mlp": "-", "moe": "E"}
        pattern = "".join(names.get(t, "?") for t in data["layers_block_type"])
    if pattern is not None:
        unknown = sorted(set(pattern) - SUPPORTED_LAYER_SYMBOLS)
        if unknown:
            raise UnsupportedModelError(
                f"{config_path}: hybrid layer pattern {pattern!r} has layer kinds {unknown} (E: mixture of experts); "
                "this actor builds Mamba-2 (M), attention (*) and MLP (-) layers only"
            )
    if int(data.get("num_nextn_predict_layers") or 0) > 0:
        raise UnsupportedModelError(
            f"{config_path}: multi-token prediction layers (num_nextn_predict_layers > 0) are not supported"
        )


def _stack_class(torch_final_norm: bool):
    """megatron's HybridStack, refusing megatron-core's inference path (see forward); with
    `torch_final_norm` its final norm is the config's torch norm instead of TENorm, which
    megatron-core 0.19 hard-codes there (hybrid_block.py) and which does not exist without TE."""
    from megatron.core.models.hybrid.hybrid_block import HybridStack
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    class _HybridStack(HybridStack):
        def __init__(self, config, submodules, *args, post_layer_norm: bool = True, **kwargs):
            super().__init__(
                config, submodules, *args, post_layer_norm=post_layer_norm and not torch_final_norm, **kwargs
            )
            self.post_layer_norm = post_layer_norm
            if torch_final_norm and self.post_process and post_layer_norm:
                self.final_norm = WrappedTorchNorm(
                    config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
                )

        def forward(self, *args, inference_context=None, inference_params=None, **kwargs):
            if inference_context is not None or inference_params is not None:
                # megatron's static/dynamic inference runs the Mamba decode step through its own
                # Triton kernels (ssm/ops): no CPU stand-in here, and not tested on GPUs here.
                raise NotImplementedError(
                    "Nemotron-H (hybrid Mamba) does not generate through megatron-core's inference path in this "
                    "project (its Mamba decode kernels are Triton-only and untested here). Use "
                    "generation.backend=vllm (or vllm_server)."
                )
            return super().forward(*args, **kwargs)

    return _HybridStack


def local_hybrid_stack_spec():
    """The hybrid stack of megatron's TE spec, built from TE-free modules (see module docstring)."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.hybrid.hybrid_block import HybridStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    from nemo_igrpo.policy.attention import SDPACoreAttention

    mamba = ModuleSpec(
        module=MambaLayer,
        submodules=MambaLayerSubmodules(
            norm=WrappedTorchNorm,
            mixer=ModuleSpec(
                module=MambaMixer,
                submodules=MambaMixerSubmodules(in_proj=ColumnParallelLinear, out_proj=RowParallelLinear),
            ),
            mamba_bda=get_bias_dropout_add,
            # The TE spec fuses this norm into in_proj (TELayerNormColumnParallelLinear).
            sharded_state_dict_keys_map={"norm.": "mixer.in_proj.layer_norm_"},
        ),
    )
    attention = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear, core_attention=SDPACoreAttention, linear_proj=RowParallelLinear
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_"},
        ),
    )
    mlp = ModuleSpec(
        module=MLPLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=partial(
                MLP.as_mlp_submodule,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"},
        ),
    )
    return ModuleSpec(
        module=_stack_class(torch_final_norm=True),
        submodules=HybridStackSubmodules(mamba_layer=mamba, attention_layer=attention, mlp_layer=mlp),
    )


def hybrid_stack_spec(impl: str):
    """megatron's TE hybrid spec, or the local one."""
    if impl == "transformer_engine":
        from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec as te_spec
        from megatron.core.transformer.spec_utils import ModuleSpec

        return ModuleSpec(module=_stack_class(torch_final_norm=False), submodules=te_spec.submodules)
    return local_hybrid_stack_spec()


def _require_gpu_kernels() -> None:
    """On a GPU the real kernels must import (megatron's own message is a bare ImportError)."""
    from nemo_igrpo.policy.fusions import module_imports

    missing = [m for m in ("mamba_ssm", "causal_conv1d") if not module_imports(m)]
    if missing:
        raise RuntimeError(
            f"Nemotron-H on a GPU needs the Mamba-2 kernels {', '.join(missing)} (mamba-ssm 2.3.1, causal-conv1d "
            "1.7.0: containers/install_gpu_stack.sh builds them)"
        )


def check_hybrid_fp8(fp8: str | None, first_last_layers_bf16: bool = True) -> None:
    """megatron-bridge sets first_last_layers_bf16 for Nemotron-H (its first and last layers stay
    bf16 under FP8), and megatron-core rejects that with delayed scaling ("Delayed scaling does not
    support first / last layer in BF16"). Said here, naming the key, before any model is built."""
    if fp8 == "delayed" and first_last_layers_bf16:
        raise ValueError(
            "policy.fp8=delayed: megatron-bridge keeps Nemotron-H's first and last layers in bf16 "
            "(first_last_layers_bf16), which megatron-core does not support with delayed scaling; "
            "use policy.fp8=tensorwise (or blockwise / mxfp8)"
        )


def configure_hybrid_provider(provider: Any, cfg: Any, impl: str) -> None:
    """Adjust the bridge's HybridModelProvider for this actor (before provider.finalize())."""
    from nemo_igrpo.policy import cpu_compat

    # The bridge sets MoE fusions unconditionally; megatron checks them even without experts and
    # rejects them without TE's grouped GEMM / permute kernels. No supported pattern has experts.
    provider.moe_grouped_gemm = False
    provider.moe_permute_fusion = False
    provider.moe_shared_expert_overlap = False
    spec = hybrid_stack_spec(impl)
    # A one-argument callable: the provider passes itself (it accepts specs of that form).
    provider.hybrid_stack_spec = lambda config: spec
    check_hybrid_fp8(cfg.fp8, bool(getattr(provider, "first_last_layers_bf16", True)))
    if torch.cuda.is_available():
        _require_gpu_kernels()
    else:
        cpu_compat.install_mamba_reference_kernels()
