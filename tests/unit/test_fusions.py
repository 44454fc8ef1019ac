"""Fusion flags are on only where the kernel megatron-core needs for them imports (GPU-path
issue, item 2: megatron-bridge turns gradient_accumulation_fusion on whenever TE imports, and
megatron-core's ColumnParallelLinear then raises without apex's fused_weight_gradient_mlp_cuda)."""

from __future__ import annotations

import pytest

from nemo_igrpo.policy.fusions import FUSION_REQUIREMENTS, apply_fusion_decisions, decide_fusions, module_imports
from nemo_igrpo.policy.model import uses_sequence_parallel

ALL_ON = {flag: True for flag in FUSION_REQUIREMENTS}
TE_ONLY = {"transformer_engine.pytorch"}  # the project's container: TE, no apex
EVERYTHING = {m for mods in FUSION_REQUIREMENTS.values() for m in mods}


def _decide(present: set[str], on_gpu=True, impl="transformer_engine", requested=ALL_ON):
    return decide_fusions(requested, on_gpu=on_gpu, transformer_impl=impl, importable=lambda m: m in present)


def test_container_with_te_and_no_apex_turns_gradient_accumulation_fusion_off():
    d = _decide(TE_ONLY)
    assert d["gradient_accumulation_fusion"] is False  # the bridge's default would raise in the output layer
    assert d["masked_softmax_fusion"] is False and d["persist_layer_norm"] is False
    assert d["apply_rope_fusion"] is True  # TE's fused RoPE is there
    # torch-JIT fusions need no extra kernel
    assert d["bias_activation_fusion"] and d["bias_dropout_fusion"] and d["cross_entropy_loss_fusion"]


def test_every_kernel_present_keeps_the_bridges_choice():
    assert _decide(EVERYTHING) == ALL_ON
    off = {flag: False for flag in FUSION_REQUIREMENTS}
    assert _decide(EVERYTHING, requested=off) == off, "a flag the bridge left off is never switched on"


@pytest.mark.parametrize("flag", sorted(f for f, mods in FUSION_REQUIREMENTS.items() if mods))
def test_each_kernel_flag_follows_its_own_kernels(flag):
    missing = set(FUSION_REQUIREMENTS[flag])
    assert _decide(EVERYTHING - missing)[flag] is False
    assert _decide(EVERYTHING)[flag] is True


def test_cpu_and_local_spec():
    assert not any(_decide(EVERYTHING, on_gpu=False).values()), "CPU keeps unfused, bit-stable math"
    local = _decide(EVERYTHING, impl="local")
    assert local["apply_rope_fusion"] is False  # TE's kernel; the local spec applies RoPE itself
    assert local["gradient_accumulation_fusion"] is True  # apex present: the output layer can use it


def test_apply_sets_provider_attributes():
    class Provider:  # the attributes a GPTModelProvider holds, as the bridge leaves them
        gradient_accumulation_fusion = True
        apply_rope_fusion = True
        masked_softmax_fusion = True

    p = Provider()
    apply_fusion_decisions(p, on_gpu=True, transformer_impl="transformer_engine", importable=lambda m: m in TE_ONLY)
    assert (p.gradient_accumulation_fusion, p.apply_rope_fusion, p.masked_softmax_fusion) == (False, True, False)


def test_module_imports_is_real():
    assert module_imports("json") is True
    assert module_imports("fused_weight_gradient_mlp_cuda") is False  # apex is not installed here


def test_sequence_parallel_rule():
    assert uses_sequence_parallel("transformer_engine", 2) is True
    assert uses_sequence_parallel("transformer_engine", 1) is False
    assert uses_sequence_parallel("local", 4) is False
