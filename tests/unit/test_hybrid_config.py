"""Nemotron-H decisions that need no model: which hybrid checkpoints the actor accepts, the FP8
recipe rule (first/last layers in bf16), the paper FP8 configs, and the vLLM engine settings for
hybrid checkpoints (generation/common.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nemo_igrpo.generation.common import vllm_hybrid_engine_kwargs
from nemo_igrpo.policy.hybrid import check_hybrid_fp8
from nemo_igrpo.policy.model import UnsupportedModelError, read_architecture

REPO = Path(__file__).resolve().parents[2]


def _config_dir(tmp_path: Path, **fields) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({"architectures": ["NemotronHForCausalLM"], **fields}))
    return d


def test_dense_nemotron_h_is_accepted(tmp_path):
    assert read_architecture(_config_dir(tmp_path, hybrid_override_pattern="M-M*-")) == "NemotronHForCausalLM"
    layers = ["linear_attention", "mlp", "full_attention"]
    assert read_architecture(_config_dir(tmp_path, layers_block_type=layers)) == "NemotronHForCausalLM"


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"hybrid_override_pattern": "ME*E"}, "mixture of experts"),
        ({"layers_block_type": ["linear_attention", "moe"]}, "mixture of experts"),
        ({"hybrid_override_pattern": "M*", "num_nextn_predict_layers": 1}, "multi-token prediction"),
    ],
)
def test_hybrid_variants_without_a_spec_are_refused(tmp_path, fields, words):
    with pytest.raises(UnsupportedModelError, match=words):
        read_architecture(_config_dir(tmp_path, **fields))


def test_delayed_fp8_is_refused_naming_a_recipe_that_works():
    with pytest.raises(ValueError, match=r"policy\.fp8=delayed.*first_last_layers_bf16.*tensorwise"):
        check_hybrid_fp8("delayed")
    for recipe in (None, "tensorwise", "blockwise", "mxfp8"):
        check_hybrid_fp8(recipe)


def test_build_model_refuses_delayed_fp8_before_anything_else(tmp_path):
    from nemo_igrpo.policy.config import ModelConfig, PolicyConfig
    from nemo_igrpo.policy.model import build_model

    cfg = PolicyConfig(
        model=ModelConfig(hf_path=str(_config_dir(tmp_path, hybrid_override_pattern="M*"))), fp8="delayed"
    )
    with pytest.raises(ValueError, match="first_last_layers_bf16"):
        build_model(cfg, cfg.model.hf_path, trainable=False)


@pytest.mark.parametrize("name", ["nemotron_h_8b_base_8k_igrpo_fp8", "nemotron_h_8b_base_8k_grpo_fp8"])
def test_paper_fp8_configs_use_a_recipe_the_bridge_accepts(name):
    from nemo_igrpo.config import load_config

    cfg = load_config(REPO / "conf" / "paper" / "fp8" / f"{name}.yaml", [])
    assert cfg.policy.fp8 == "tensorwise"
    check_hybrid_fp8(cfg.policy.fp8)


def test_vllm_settings_for_hybrid_checkpoints(tmp_path):
    nh = _config_dir(tmp_path, hybrid_override_pattern="M*")
    assert vllm_hybrid_engine_kwargs(str(nh), on_cpu=True) == {
        "mamba_ssm_cache_dtype": "float32",
        "enable_prefix_caching": False,
    }
    assert vllm_hybrid_engine_kwargs(str(nh), on_cpu=False) == {"mamba_ssm_cache_dtype": "float32"}
    nh16 = _config_dir(tmp_path, hybrid_override_pattern="M*", mamba_ssm_cache_dtype="bfloat16")
    assert vllm_hybrid_engine_kwargs(str(nh16), on_cpu=False) == {"mamba_ssm_cache_dtype": "bfloat16"}
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert vllm_hybrid_engine_kwargs(str(dense), on_cpu=True) == {}
    assert vllm_hybrid_engine_kwargs(str(tmp_path / "missing"), on_cpu=True) == {}
