"""Every run config under conf/ loads and validates, and the paper's layouts fit their models.

A run config is a YAML file whose defaults reach conf/base.yaml; group fragments (conf/model,
conf/algorithm, conf/cluster) and files starting with "_" are pieces of run configs.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
sys.path.insert(0, str(REPO / "launch"))

from layout import LayoutError, check_layout, padded_vocab_size  # noqa: E402
from model_shapes import MODEL_SHAPES, shape_for  # noqa: E402

from nemo_igrpo.config import load_config  # noqa: E402
from nemo_igrpo.config.loader import ConfigError  # noqa: E402

FRAGMENT_GROUPS = {"model", "algorithm", "cluster"}


def _is_run_config(path: Path) -> bool:
    rel = path.relative_to(CONF)
    if rel.parts[0] in FRAGMENT_GROUPS or path.name.startswith("_"):
        return False
    return "defaults" in (yaml.safe_load(path.read_text()) or {})  # base.yaml itself is not a run


@functools.lru_cache(maxsize=None)
def _load(path: Path):
    """Each config is composed once per session; tests only read the (frozen by convention) result.

    A config may leave only data.train_path to be filled in at run time (the demo's generated
    data); every other required value must be set in the file.
    """
    from nemo_igrpo.config.loader import compose
    from omegaconf import OmegaConf

    missing = set(OmegaConf.missing_keys(compose(path)))
    assert missing <= {"data.train_path"}, f"{path}: required values missing: {sorted(missing)}"
    return load_config(path, ["data.train_path=placeholder.jsonl"] if missing else [])


RUN_CONFIGS = sorted(p for p in CONF.rglob("*.yaml") if _is_run_config(p))
PAPER_CONFIGS = [p for p in RUN_CONFIGS if p.relative_to(CONF).parts[0] == "paper"]
PAPER_MODELS = [
    "DeepSeek-R1-Distill-Qwen-7B",
    "DeepSeek-R1-Distill-Qwen-14B",
    "OpenMath-Nemotron-7B",
    "OpenMath-Nemotron-14B",
    "Nemotron-H-8B-Base-8K",
    "OpenReasoning-Nemotron-7B",
]


def _id(p: Path) -> str:
    return str(p.relative_to(CONF))


def test_the_paper_runs_are_all_there():
    names = {p.stem for p in PAPER_CONFIGS}
    for model in PAPER_MODELS:
        stem = model.lower().replace("-", "_")
        for algo in ("igrpo", "grpo"):
            assert f"{stem}_{algo}" in names
            assert f"{stem}_{algo}_fp8" in names


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=_id)
def test_run_config_loads_and_validates(path):
    cfg = _load(path)
    assert cfg.run.name


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=_id)
def test_paper_config_has_the_papers_settings(path):
    cfg = _load(path)
    a, g, o = cfg.algorithm, cfg.generation, cfg.policy.optimizer
    # Matched rollout budget: 4 drafts + 4 refinements vs 8 GRPO completions.
    assert a.num_drafts + a.num_refinements == 8
    assert (a.num_drafts, a.num_refinements) == ((0, 8) if "_grpo" in path.stem else (4, 4))
    assert a.kl_beta == 0.0 and a.loss_aggregation == "seq-mean-token-mean"
    assert (o.lr, o.min_lr_ratio, o.warmup_ratio) == (1.0e-6, 0.1, 0.1)
    assert (g.temperature, g.max_prompt_tokens, g.max_new_tokens) == (0.7, 1024, 4096)
    assert g.vllm.gpu_memory_utilization == 0.85
    assert cfg.policy.precision == "bf16" and cfg.policy.activation_recompute == "full"
    assert cfg.data.prompts_per_step * 8 == 1024  # the paper's 1,024 completions per optimizer step
    fp8 = path.parent.name == "fp8"
    assert cfg.policy.fp8 == ("tensorwise" if fp8 else None)
    # FP8 variants generate in FP8 too, with the importance-sampling correction for it.
    assert (g.vllm.quantization, a.tis_cap) == (("fp8_per_tensor", 2.0) if fp8 else (None, None))
    assert shape_for(cfg.policy.model.hf_path) is not None, cfg.policy.model.hf_path
    # The paper's node layouts: 7B/8B 1 training + 1 vLLM node, 14B 4 + 1.
    big = "14b" in path.stem
    assert (cfg.cluster.nodes, cfg.cluster.generation_nodes, cfg.cluster.gpus_per_node) == (
        (5, 1, 8) if big else (2, 1, 8)
    )
    assert g.backend == "vllm_server"


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=_id)
def test_paper_layout_divides_the_model_and_fits_80gb(path):
    cfg = _load(path)
    shape = shape_for(cfg.policy.model.hf_path)
    tp, pp = cfg.policy.tensor_parallel_size, cfg.policy.pipeline_parallel_size
    # The rules megatron-core / vLLM enforce at start-up, checked here directly ...
    assert shape.num_attention_heads % tp == 0 and shape.num_query_groups % tp == 0
    assert shape.num_layers % pp == 0
    assert padded_vocab_size(shape.vocab_size, tp) % (128 * tp) == 0
    train_gpus = (cfg.cluster.nodes - cfg.cluster.generation_nodes) * cfg.cluster.gpus_per_node
    assert train_gpus % (tp * pp) == 0
    vtp = cfg.generation.vllm.tensor_parallel_size
    assert shape.num_query_groups % vtp == 0 and cfg.cluster.gpus_per_node % vtp == 0
    # ... and by the launcher's check, which also estimates memory per GPU.
    layout = check_layout(cfg, str(path))
    assert layout.dp == train_gpus // (tp * pp)
    assert layout.train_memory_gib < 80
    # The actor runs sequence parallel with the TE spec at TP > 1, and the estimate assumes what it does.
    assert layout.sequence_parallel == (tp > 1 and cfg.policy.model.transformer_impl != "local")
    assert layout.colocated_vllm_gib is None  # vLLM has its own node in every paper layout
    assert layout.kv_cache_tokens_per_replica >= cfg.generation.vllm.max_model_len
    # prompt + longest draft + completion fits the context the server is started with.
    draft = cfg.algorithm.template.max_draft_tokens or cfg.generation.max_new_tokens
    longest = (
        cfg.generation.max_prompt_tokens + cfg.generation.max_new_tokens + (draft if cfg.algorithm.num_drafts else 0)
    )
    assert longest <= cfg.generation.vllm.max_model_len <= shape.max_position_embeddings


def test_model_shape_table_is_self_consistent():
    for name, s in MODEL_SHAPES.items():
        assert s.hidden_size % s.num_attention_heads == 0, name
        assert s.num_attention_heads % s.num_query_groups == 0, name
        assert s.head_dim == 128, name  # all six models use 128-wide heads


@pytest.mark.parametrize(
    "override, key",
    [
        (["policy.tensor_parallel_size=8"], "policy.tensor_parallel_size"),  # 28 heads / 8
        (["policy.pipeline_parallel_size=3"], "cluster.nodes"),  # 8 GPUs / (2 x 3)
        (
            ["policy.pipeline_parallel_size=8", "policy.tensor_parallel_size=1"],
            "policy.pipeline_parallel_size",
        ),  # 28 layers / 8
        (["cluster.nodes=3"], "data.prompts_per_step"),  # 125 x 4 over DP=8
        (["policy.tensor_parallel_size=1", "policy.activation_recompute=null"], "policy.max_tokens_per_microbatch"),
        (["generation.vllm.tensor_parallel_size=8"], "generation.vllm.tensor_parallel_size"),  # 4 KV heads / 8
        (["cluster.generation_nodes=0"], "cluster.generation_nodes"),  # vllm_server with no server node
    ],
)
def test_bad_layouts_are_refused_naming_the_key(override, key):
    path = CONF / "paper" / "deepseek_r1_distill_qwen_7b_igrpo.yaml"
    extra = ["data.prompts_per_step=125"] if key == "data.prompts_per_step" else []
    cfg = load_config(path, override + extra)
    with pytest.raises(LayoutError, match=key.replace(".", r"\.")):
        check_layout(cfg, str(path))


def test_a_bad_fragment_key_names_the_file():
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(CONF / "paper" / "deepseek_r1_distill_qwen_7b_igrpo.yaml", ["policy.tensor_paralel_size=2"])


@pytest.mark.parametrize("group", sorted(FRAGMENT_GROUPS))
def test_every_fragment_composes_and_validates(group):
    """Each group fragment, swapped into a paper config, loads, validates and takes effect."""
    path = CONF / "paper" / "deepseek_r1_distill_qwen_7b_igrpo.yaml"
    for frag in sorted((CONF / group).glob("*.yaml")):
        data = yaml.safe_load(frag.read_text())
        assert "defaults" not in data, frag
        cfg = load_config(path, [f"{group}={frag.stem}"])
        section, values = next(iter(data.items()))
        for key, value in values.items():
            if not isinstance(value, dict):
                assert getattr(getattr(cfg, section), key) == value, (frag, key)
