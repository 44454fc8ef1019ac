"""The config system: composition, overrides, interpolation, and errors that name file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from nemo_igrpo.config.loader import ConfigError, load_config, save_config

REPO = Path(__file__).resolve().parents[2]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def conf_dir(tmp_path: Path) -> Path:
    d = tmp_path / "conf"
    _write(d / "base.yaml", (REPO / "conf" / "base.yaml").read_text())
    _write(d / "model" / "small.yaml", "policy:\n  tensor_parallel_size: 2\n  pipeline_parallel_size: 2\n")
    # TP=8 needs a model whose heads it divides (checked at load time): 8 heads, 8 KV heads.
    _write(
        d / "model" / "big.yaml",
        "policy:\n  tensor_parallel_size: 8\n  model:\n    tiny: {num_attention_heads: 8, num_query_groups: 8}\n",
    )
    _write(d / "algorithm" / "grpo.yaml", "algorithm:\n  num_drafts: 0\n  num_refinements: 8\n")
    _write(
        d / "run.yaml",
        "defaults:\n  - base\n  - model: small\n  - _self_\n"
        "run:\n  name: exp1\ndata:\n  train_path: /data/train.jsonl\ntrainer:\n  max_steps: 7\n",
    )
    return d


def test_composition_and_public_keys(conf_dir):
    cfg = load_config(conf_dir / "run.yaml")
    assert cfg.policy.tensor_parallel_size == 2 and cfg.policy.pipeline_parallel_size == 2
    assert cfg.trainer.max_steps == 7
    assert cfg.run.dir == "runs/exp1"  # interpolation resolved
    assert cfg.algorithm.num_drafts == 4 and cfg.algorithm.num_refinements == 4
    assert cfg.generation.backend == "vllm" and cfg.seed == 1234
    assert type(cfg.policy).__name__ == "PolicyConfig"  # typed objects, not dicts


def test_dotted_and_group_overrides(conf_dir):
    cfg = load_config(
        conf_dir / "run.yaml",
        [
            "trainer.max_steps=20",
            "model=big",
            "algorithm.num_drafts=0",
            "algorithm.num_refinements=8",
            "run.dir=/tmp/x/${run.name}",
        ],
    )
    assert cfg.trainer.max_steps == 20
    assert cfg.policy.tensor_parallel_size == 8
    assert cfg.algorithm.num_drafts == 0
    assert cfg.run.dir == "/tmp/x/exp1"


def test_group_not_declared_in_defaults_can_be_added(conf_dir):
    cfg = load_config(conf_dir / "run.yaml", ["algorithm=grpo"])
    assert (cfg.algorithm.num_drafts, cfg.algorithm.num_refinements) == (0, 8)


def test_unknown_key_names_file_key_and_suggestion(conf_dir):
    _write(conf_dir / "typo.yaml", "defaults: [base]\ndata: {train_path: x}\ntrainer:\n  max_step: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(conf_dir / "typo.yaml")
    msg = str(e.value)
    assert "typo.yaml" in msg and "trainer.max_step" in msg and "trainer.max_steps" in msg


def test_unknown_override_key_names_override(conf_dir):
    with pytest.raises(ConfigError) as e:
        load_config(conf_dir / "run.yaml", ["algorithm.num_draft=2"])
    assert "algorithm.num_draft" in str(e.value) and "algorithm.num_drafts" in str(e.value)


def test_wrong_type_names_key(conf_dir):
    with pytest.raises(ConfigError) as e:
        load_config(conf_dir / "run.yaml", ["trainer.max_steps=many"])
    assert "trainer.max_steps" in str(e.value)


def test_missing_required_value(conf_dir):
    _write(conf_dir / "nodata.yaml", "defaults: [base]\n")
    with pytest.raises(ConfigError) as e:
        load_config(conf_dir / "nodata.yaml")
    assert "data.train_path" in str(e.value) and "nodata.yaml" in str(e.value)


def test_bad_interpolation(conf_dir):
    with pytest.raises(ConfigError) as e:
        load_config(conf_dir / "run.yaml", ["run.dir=${run.nope}"])
    # Both: the key being set and the reference that does not exist (and the file).
    assert "'run.dir'" in str(e.value) and "'run.nope'" in str(e.value) and "run.yaml" in str(e.value), e.value


def test_missing_fragment_lists_choices(conf_dir):
    with pytest.raises(ConfigError) as e:
        load_config(conf_dir / "run.yaml", ["model=smal"])
    assert "small" in str(e.value)


def test_semantic_validation(conf_dir):
    with pytest.raises(ConfigError) as e:
        load_config(conf_dir / "run.yaml", ["algorithm.num_refinements=1"])
    assert "algorithm.num_refinements" in str(e.value)
    # Generation settings the backends would reject are caught at load time, key named.
    with pytest.raises(ConfigError) as e:
        load_config(conf_dir / "run.yaml", ["generation.vllm.quantization=fp4"])
    assert "generation.vllm.quantization" in str(e.value) and "fp8_per_tensor" in str(e.value)
    assert (
        load_config(conf_dir / "run.yaml", ["generation.vllm.quantization=fp8_per_block"]).generation.vllm.quantization
        == "fp8_per_block"
    )


def test_invalid_yaml_names_file(conf_dir):
    _write(conf_dir / "broken.yaml", "defaults: [base\n")
    with pytest.raises(ConfigError) as e:
        load_config(conf_dir / "broken.yaml")
    assert "broken.yaml" in str(e.value)


def test_saved_config_round_trips(conf_dir, tmp_path):
    cfg = load_config(conf_dir / "run.yaml", ["trainer.max_steps=11"])
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, out)
    again = load_config(out)
    assert again == cfg


def test_cli_typo_exits_nonzero_naming_key(conf_dir):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "nemo_igrpo", "train", str(conf_dir / "run.yaml"), "trainer.max_stpes=3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "trainer.max_stpes" in proc.stderr and "trainer.max_steps" in proc.stderr


# --- checks that need the model's shape or the reward registry, still before any model is built ---


def _hf_dir(tmp_path: Path, **config) -> Path:
    """A model folder with only a config.json: the load-time checks read nothing else."""
    import json

    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], **config}))
    return d


def test_tensor_parallel_must_fit_the_heads_of_the_hf_model(conf_dir, tmp_path):
    hf = _hf_dir(tmp_path, num_attention_heads=28, num_key_value_heads=4)  # DeepSeek-R1-Distill-Qwen-7B
    model = f"policy.model.hf_path={hf}"
    assert load_config(conf_dir / "run.yaml", [model, "policy.tensor_parallel_size=4"]).policy.tensor_parallel_size == 4
    with pytest.raises(ConfigError) as e:
        load_config(conf_dir / "run.yaml", [model, "policy.tensor_parallel_size=3"])
    msg = str(e.value)
    assert (
        "run.yaml" in msg and "'policy.tensor_parallel_size': 3 does not divide the model's 28 attention heads" in msg
    )
    assert f"num_attention_heads in {hf / 'config.json'}" in msg and "[1, 2, 4, 28]" in msg
    # 7 divides the 28 attention heads but not the 4 key/value heads (nor they 7).
    with pytest.raises(ConfigError) as e:
        load_config(conf_dir / "run.yaml", [model, "policy.tensor_parallel_size=7"])
    assert "7 and the model's 4 key/value heads" in str(e.value) and "num_key_value_heads in" in str(e.value)


def test_missing_num_key_value_heads_means_one_per_attention_head(conf_dir, tmp_path):
    hf = _hf_dir(tmp_path, num_attention_heads=12)
    assert load_config(conf_dir / "run.yaml", [f"policy.model.hf_path={hf}", "policy.tensor_parallel_size=3"])
    with pytest.raises(ConfigError, match="8 does not divide the model's 12 attention heads"):
        load_config(conf_dir / "run.yaml", [f"policy.model.hf_path={hf}", "policy.tensor_parallel_size=8"])


def test_key_value_heads_fewer_than_tp_are_replicated(conf_dir, tmp_path):
    # megatron-core replicates KV heads when TP is a multiple of their number (the TP=2 runs
    # of the tests use a tiny model with 1 KV head).
    hf = _hf_dir(tmp_path, num_attention_heads=2, num_key_value_heads=1)
    assert load_config(conf_dir / "run.yaml", [f"policy.model.hf_path={hf}", "policy.tensor_parallel_size=2"])


def test_tensor_parallel_must_fit_the_heads_of_the_tiny_model(conf_dir):
    with pytest.raises(ConfigError) as e:
        load_config(conf_dir / "run.yaml", ["policy.tensor_parallel_size=3"])
    assert "policy.model.tiny.num_attention_heads" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(
            conf_dir / "run.yaml",
            [
                "policy.tensor_parallel_size=2",
                "policy.model.tiny.num_attention_heads=6",
                "policy.model.tiny.num_query_groups=3",
            ],
        )
    assert "2 and the model's 3 key/value heads (policy.model.tiny.num_query_groups)" in str(e.value)


def test_model_not_on_this_machine_is_not_checked(conf_dir):
    # A cluster config rendered on a login node: the launcher checks the known shapes there.
    cfg = load_config(
        conf_dir / "run.yaml", ["policy.model.hf_path=/nonexistent/Some-7B", "policy.tensor_parallel_size=3"]
    )
    assert cfg.policy.tensor_parallel_size == 3


def test_colocated_vllm_tensor_parallel_must_fit_the_heads(conf_dir, tmp_path):
    hf = _hf_dir(tmp_path, num_attention_heads=28, num_key_value_heads=4)
    ovs = [f"policy.model.hf_path={hf}", "policy.tensor_parallel_size=1", "generation.vllm.tensor_parallel_size=3"]
    with pytest.raises(ConfigError, match=r"'generation.vllm.tensor_parallel_size': 3 does not divide .* vLLM needs"):
        load_config(conf_dir / "run.yaml", ovs)
    # A server backend's engine is started elsewhere, with its own settings.
    assert load_config(conf_dir / "run.yaml", ovs + ["generation.backend=vllm_server"])


def user_reward(prompt, response, reference):
    return 1.0


@pytest.mark.parametrize(
    "terms, needle",
    [
        ("[{name: math_acuracy}]", "'reward.terms[0].name': reward term 'math_acuracy' is not registered"),
        (
            "[{name: math_accuracy}, {name: 'no_such_pkg.rewards:score'}]",
            "'reward.terms[1].name': reward term 'no_such_pkg.rewards:score': cannot import module 'no_such_pkg.rewards'",
        ),
        (
            f"[{{name: math_accuracy}}, {{name: '{__name__}:no_such_function'}}]",
            f"'reward.terms[1].name': reward term '{__name__}:no_such_function': module '{__name__}' has no attribute",
        ),
        ("[{name: math_accuracy, kwargs: {boxxed: first}}]", "'reward.terms[0].kwargs': math_accuracy does not accept"),
    ],
)
def test_reward_terms_are_resolved_at_load_time(conf_dir, terms, needle):
    with pytest.raises(ConfigError) as e:
        load_config(conf_dir / "run.yaml", [f"reward.terms={terms}"])
    assert "run.yaml" in str(e.value) and needle in str(e.value)


def test_import_path_reward_term_loads(conf_dir):
    cfg = load_config(
        conf_dir / "run.yaml", [f"reward.terms=[{{name: math_accuracy}}, {{name: '{__name__}:user_reward'}}]"]
    )
    assert [t.name for t in cfg.reward.terms] == ["math_accuracy", f"{__name__}:user_reward"]
    with pytest.raises(ConfigError, match="'reward.max_failing_steps': must be >= 0"):
        load_config(conf_dir / "run.yaml", ["reward.max_failing_steps=-1"])


def test_reward_import_paths_can_be_left_to_the_job(conf_dir):
    # A Slurm login node renders the job but may not have the user's reward package installed.
    ovs = ["reward.terms=[{name: math_accuracy}, {name: 'cluster_only_pkg.rewards:score'}]"]
    with pytest.raises(ConfigError, match="cannot import module 'cluster_only_pkg.rewards'"):
        load_config(conf_dir / "run.yaml", ovs)
    assert len(load_config(conf_dir / "run.yaml", ovs, import_reward_terms=False).reward.terms) == 2
    with pytest.raises(ConfigError, match="reward term 'nope' is not registered"):  # registered names still checked
        load_config(conf_dir / "run.yaml", ["reward.terms=[{name: nope}]"], import_reward_terms=False)
