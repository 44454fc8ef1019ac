"""The config system: composition, overrides, interpolation, and errors that name file and key."""
from __future__ import annotations

from pathlib import Path

import pytest

from nemo_igrpo.config import loader
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
    _write(d / "model" / "big.yaml", "policy:\n  tensor_parallel_size: 8\n")
    _write(d / "algorithm" / "grpo.yaml", "algorithm:\n  num_drafts: 0\n  num_refinements: 8\n")
    _write(d / "run.yaml", "defaults:\n  - base\n  - model: small\n  - _self_\n"
           "run:\n  name: exp1\ndata:\n  train_path: /data/train.jsonl\ntrainer:\n  max_steps: 7\n")
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
    cfg = load_config(conf_dir / "run.yaml", ["trainer.max_steps=20", "model=big", "algorithm.num_drafts=0",
                                               "algorithm.num_refinements=8", "run.dir=/tmp/x/${run.name}"])
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
    assert "run.dir" in str(e.value) or "run.nope" in str(e.value)


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
    assert load_config(conf_dir / "run.yaml", ["generation.vllm.quantization=fp8_per_block"]).generation.vllm.quantization == "fp8_per_block"


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

    proc = subprocess.run([sys.executable, "-m", "nemo_igrpo", "train", str(conf_dir / "run.yaml"),
                           "trainer.max_stpes=3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "trainer.max_stpes" in proc.stderr and "trainer.max_steps" in proc.stderr
