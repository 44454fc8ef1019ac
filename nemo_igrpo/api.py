"""The Python API next to the `igrpo` command line: load a config, override it, train, evaluate.

    from nemo_igrpo import api

    cfg = api.load_config("conf/paper/deepseek_r1_distill_qwen_7b_igrpo.yaml", ["trainer.max_steps=20"])
    cfg = api.override(cfg, {"algorithm.policy_loss": "my_pkg.losses:my_loss", "seed": 1})
    result = api.train(cfg)                       # same as `igrpo train`; resumes an existing run.dir
    scores = api.evaluate(cfg, checkpoint=cfg.run.dir, benchmarks=["data/benchmarks/math500.jsonl"])
    report = api.evaluate_suite(cfg, [cfg.run.dir], suite="paper", data_dir="data/benchmarks")
    print(report.table())

Every function checks its input the way the CLI does (the same loader, validation and error
types: ConfigError, DataError, ... all subclasses of `nemo_igrpo.utils.errors.UserError`), so a
script fails on a typo before a model is built. Heavy packages (torch, megatron-core, vLLM) are
imported by `train` / `evaluate*` only, so `import nemo_igrpo.api` stays cheap.
See examples/python_api.py for a complete script.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence, Union

from nemo_igrpo.config.loader import ConfigError
from nemo_igrpo.config.loader import load_config as _load_config
from nemo_igrpo.config.loader import save_config, to_yaml
from nemo_igrpo.config.schema import IGRPOConfig
from nemo_igrpo.utils.errors import UserError

if TYPE_CHECKING:  # only for annotations: importing these pulls in torch
    from nemo_igrpo.data.prepare import PrepareResult
    from nemo_igrpo.evaluation.evaluate import EvalResult
    from nemo_igrpo.evaluation.suite import SuiteReport

__all__ = [
    "ConfigError",
    "IGRPOConfig",
    "UserError",
    "evaluate",
    "evaluate_suite",
    "load_config",
    "override",
    "prepare_data",
    "save_config",
    "to_yaml",
    "train",
]

Overrides = Union[Iterable[str], Mapping[str, Any], None]


def _dotlist(overrides: Overrides) -> list[str]:
    """`key=value` strings from either form; mapping values are written as YAML flow values so
    lists and dicts (`reward.terms`) survive the round trip."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        import yaml

        out = []
        for key, value in overrides.items():
            text = (
                value
                if isinstance(value, str)
                else yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
            )
            if text.endswith("\n...") or text.endswith("..."):  # safe_dump's document end marker for scalars
                text = text.rsplit("...", 1)[0].strip()
            out.append(f"{key}={text}")
        return out
    if isinstance(overrides, str):
        raise TypeError("overrides: pass a list of 'key=value' strings or a mapping, not one string")
    return [str(o) for o in overrides]


def load_config(path: str | os.PathLike, overrides: Overrides = None) -> IGRPOConfig:
    """Compose, override, validate and return the typed config, exactly as `igrpo train PATH
    key=value ...` does (fragment overrides such as `algorithm=dapo` included)."""
    return _load_config(path, _dotlist(overrides))


def override(cfg: IGRPOConfig, overrides: Overrides, *, source: str = "override") -> IGRPOConfig:
    """A new config: `cfg` with dotted overrides applied (`["trainer.max_steps=5"]` or
    `{"trainer.max_steps": 5}`), type-checked and validated like a loaded one. `cfg` is unchanged.

    Fragment choices (`algorithm=dapo`) need the config's file: use load_config for those."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from nemo_igrpo.config.validate import validate_config

    merged = OmegaConf.structured(cfg)
    for item in _dotlist(overrides):
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{source}: '{item}' is not key=value")
        if (
            "." not in key
            and OmegaConf.select(merged, key, default=None) is not None
            and OmegaConf.is_dict(merged[key])
        ):
            raise ConfigError(
                f"{source}: '{item}' replaces a whole section; choose a fragment with load_config(path, ['{item}'])"
            )
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            bad = getattr(e, "full_key", None) or key
            msg = str(getattr(e, "msg", None) or e).splitlines()[0]
            raise ConfigError(f"{source}: bad override '{item}' at '{bad}': {msg}") from None
    try:
        new = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: bad value for '{getattr(e, 'full_key', None) or '?'}': {e}") from None
    validate_config(new, source=source)
    return new  # type: ignore[return-value]


def train(cfg: IGRPOConfig):
    """Train (or resume, when cfg.run.dir holds a checkpoint) and return the trainer's result
    (`last_step`, `stopped_by_signal`). Single process here; under torchrun every rank calls it."""
    from nemo_igrpo.algorithms.trainer import train as _train
    from nemo_igrpo.cli import _check_model_dir

    _check_model_dir(cfg.policy.model.hf_path)
    return _train(cfg)


def evaluate(
    cfg: IGRPOConfig, checkpoint: Optional[str] = None, benchmarks: Optional[Sequence[str | os.PathLike]] = None
) -> list["EvalResult"]:
    """Single-shot evaluation (cfg.eval: samples, temperature, top-p, pass@k) of `checkpoint` (a
    run dir, a checkpoints/step_N dir or a HF dir; default policy.model.hf_path) on each JSONL
    benchmark (default data.eval_path). One EvalResult per benchmark, named by its file stem."""
    from nemo_igrpo.data.datasets import load_problems
    from nemo_igrpo.evaluation.evaluate import EvalModel
    from nemo_igrpo.rewards.manager import RewardManager

    files = [str(b) for b in benchmarks] if benchmarks else ([cfg.data.eval_path] if cfg.data.eval_path else [])
    if not files:
        raise UserError("evaluate: no benchmarks given and data.eval_path is not set")
    source = checkpoint or cfg.policy.model.hf_path
    if not source:
        raise UserError("evaluate: no checkpoint given and policy.model.hf_path is not set")
    sets = [
        (
            Path(f).stem,
            load_problems(f, cfg.data.prompt_key, cfg.data.answer_key, split="test", limit=cfg.data.max_eval_samples),
        )
        for f in files
    ]
    with EvalModel(cfg, str(source)) as model, RewardManager(cfg.reward) as rewards:
        return [model.evaluate(rewards, problems, cfg.eval, name) for name, problems in sets]


def evaluate_suite(
    cfg: IGRPOConfig,
    checkpoints: Sequence[str | os.PathLike],
    *,
    suite: str = "paper",
    data_dir: str | os.PathLike = "data/benchmarks",
    samples: Sequence[str] = (),
    benchmarks: Optional[str] = None,
    labels: Optional[Sequence[str]] = None,
) -> "SuiteReport":
    """`igrpo eval --suite`: one or two checkpoints on the suite's prepared benchmarks. The report
    has `.table()` (the paper's layout), `.markdown()`, `.as_dict()` and `.difference()`.
    `samples` / `benchmarks` as the CLI's --samples / --benchmarks (recorded as deviations)."""
    from nemo_igrpo.evaluation.suite import apply_options, load_suite, run_suite

    chosen = apply_options(load_suite(suite), samples=samples, only=benchmarks)
    return run_suite(cfg, chosen, [str(c) for c in checkpoints], data_dir=data_dir, labels=labels)


def prepare_data(name: str, source: str | os.PathLike, output: str | os.PathLike, **kwargs) -> "PrepareResult":
    """`igrpo data prepare NAME SRC OUT` (keyword options as nemo_igrpo.data.prepare.prepare_dataset)."""
    from nemo_igrpo.data.prepare import prepare_dataset

    return prepare_dataset(name, source, output, **kwargs)
