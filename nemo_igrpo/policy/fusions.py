"""Which megatron-core fusion flags may be on, given the kernels this machine actually has.

megatron-bridge's providers switch fusions on by what *usually* exists in NVIDIA's containers:
`gradient_accumulation_fusion` defaults to True whenever TransformerEngine imports, and the
Llama/Qwen bridges set `masked_softmax_fusion`, `persist_layer_norm`, `apply_rope_fusion`, ...
to True. megatron-core 0.19 then needs a specific compiled kernel for several of them, and some
fail hard when it is missing: `ColumnParallelLinear` (the output layer, which is megatron's own
linear even in the TE spec) raises at construction when `gradient_accumulation_fusion` is set
and apex's `fused_weight_gradient_mlp_cuda` does not import; the fused RoPE asserts TE's kernel.
Our image removes apex (TE supersedes it), so the bridge's default would stop the first GPU run.

The rule, one table: a flag stays as the bridge asked only if every module it needs imports; the
flags implemented with torch's own JIT fuser (no extra kernel) stay on only on a GPU, so the CPU
path keeps unfused, bit-stable numerics. NeMo-RL makes the same call for
`gradient_accumulation_fusion` (it sets it off explicitly).
"""

from __future__ import annotations

import importlib
from typing import Callable, Mapping

# flag -> modules megatron-core 0.19.2 imports to run it (empty: torch.jit/compile fusion only).
# Where each requirement comes from (megatron/core/...):
#   gradient_accumulation_fusion  tensor_parallel/layers.py raises without fused_weight_gradient_mlp_cuda
#   masked_softmax_fusion         fusions/fused_softmax.py imports scaled_*_softmax_cuda (apex / megatron kernels)
#   persist_layer_norm            fusions/fused_layer_norm.py needs apex.contrib.layer_norm
#   apply_rope_fusion             models/common/embeddings/rope_utils.py asserts TE's fused RoPE (bshd and thd)
#   bias_activation_fusion, bias_dropout_fusion, cross_entropy_loss_fusion: jit_fuser in fusions/*.py
FUSION_REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "gradient_accumulation_fusion": ("fused_weight_gradient_mlp_cuda",),
    "masked_softmax_fusion": ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda"),
    "persist_layer_norm": ("apex.contrib.layer_norm.layer_norm",),
    "apply_rope_fusion": ("transformer_engine.pytorch",),
    "bias_activation_fusion": (),
    "bias_dropout_fusion": (),
    "cross_entropy_loss_fusion": (),
}


def module_imports(name: str) -> bool:
    """True if `import name` succeeds. Compiled extensions can fail with errors other than
    ImportError (a missing CUDA driver, an ABI mismatch with this torch): all count as absent."""
    try:
        importlib.import_module(name)
        return True
    except Exception:  # noqa: BLE001 - any failure means the kernel cannot be used
        return False


def decide_fusions(
    requested: Mapping[str, bool],
    *,
    on_gpu: bool,
    transformer_impl: str,
    importable: Callable[[str], bool] = module_imports,
) -> dict[str, bool]:
    """The value each fusion flag in FUSION_REQUIREMENTS must take. `requested`: what the
    provider holds now (the bridge's choice); a flag is never switched on that was off."""
    decided = {}
    for flag, modules in FUSION_REQUIREMENTS.items():
        want = bool(requested.get(flag, False))
        if not on_gpu:
            decided[flag] = False  # every fused path is a CUDA kernel or tuned for one
        elif flag == "apply_rope_fusion" and transformer_impl != "transformer_engine":
            decided[flag] = False  # the fused RoPE is TE's; the local spec applies RoPE itself
        else:
            decided[flag] = want and all(importable(m) for m in modules)
    return decided


def apply_fusion_decisions(
    provider, *, on_gpu: bool, transformer_impl: str, importable: Callable[[str], bool] = module_imports
) -> dict[str, bool]:
    """Set the provider's fusion flags by `decide_fusions`; returns the decisions (for logs)."""
    requested = {flag: bool(getattr(provider, flag, False)) for flag in FUSION_REQUIREMENTS}
    decided = decide_fusions(requested, on_gpu=on_gpu, transformer_impl=transformer_impl, importable=importable)
    for flag, value in decided.items():
        if hasattr(provider, flag):
            setattr(provider, flag, value)
    return decided
