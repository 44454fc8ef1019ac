"""Plug-ins without a fork: policy losses, advantage estimators, aggregations and KL estimators
selected by import path (`algorithm.policy_loss=my_pkg.losses:my_loss`), resolved by the same
registry lookups the trainer and the rollout use, and checked when the config is loaded.

The plug-in package is the shipped example (examples/plugins/my_igrpo_plugins), put on the path
as a user would with PYTHONPATH; broken plug-ins are written by the tests themselves."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nemo_igrpo.algorithms.advantages import ADVANTAGE_ESTIMATORS, compute_group_advantages, get_advantage_estimator
from nemo_igrpo.algorithms.config import AlgorithmConfig
from nemo_igrpo.algorithms.kl import KL_ESTIMATORS, kl_penalty
from nemo_igrpo.batch import LossInputs, LossNormalizer
from nemo_igrpo.algorithms.losses import LOSS_AGGREGATIONS, POLICY_LOSSES, make_loss_fn
from nemo_igrpo.algorithms.validation import algorithm_config_problems, check_algorithm_config
from nemo_igrpo.config import ConfigError, load_config
from nemo_igrpo.utils.errors import UserError
from nemo_igrpo.utils.registry import PluginResolutionError, Registry

from helpers import max_demo_warm_start

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "plugins"
BASE = REPO / "conf" / "base.yaml"
LOSS = "my_igrpo_plugins.losses:unclipped_pg"
AGG = "my_igrpo_plugins.losses:seq_mean_token_sqrt"
ADV = "my_igrpo_plugins.advantages:rank_advantage"


@pytest.fixture
def plugins_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


@pytest.fixture
def bad_plugins(tmp_path, monkeypatch):
    (tmp_path / "bad_plugins.py").write_text(
        textwrap.dedent("""
        import torch
        NOT_CALLABLE = 3
        def one_arg(rewards):            # an estimator is called as fn(rewards, eps)
            return rewards
        def extra_required(inputs, cfg, scale):
            return None
        def flexible(*args, **kwargs):   # *args binds any count: accepted
            return args[0]
        def wrong_return(inputs, cfg):
            return inputs.logprobs
        class Losses:
            @staticmethod
            def nested(inputs, cfg):
                return None
    """)
    )
    (tmp_path / "raises_on_import.py").write_text("raise RuntimeError('plugin import failed on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _batch():
    """Two sequences (3 and 1 trained tokens) with advantages +1 and -0.5, like the actor's pack."""
    old = torch.tensor([-1.0, -2.0, -0.5, -1.5], dtype=torch.float64)
    new = (old + torch.tensor([0.1, -0.2, 0.3, 0.05], dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([1.0, 1.0, 1.0, -0.5], dtype=torch.float64)
    seq = torch.tensor([0, 0, 0, 1])
    return LossInputs(logprobs=new, old_logprobs=old, advantages=adv, seq_ids=seq, num_seqs=2), new, old


# --- resolution ----------------------------------------------------------------------------------


def test_import_paths_resolve_through_the_trainers_lookups(plugins_on_path):
    from my_igrpo_plugins.advantages import rank_advantage
    from my_igrpo_plugins.losses import seq_mean_token_sqrt, unclipped_pg

    assert POLICY_LOSSES.lookup(LOSS) is unclipped_pg
    assert LOSS_AGGREGATIONS.lookup(AGG) is seq_mean_token_sqrt
    assert get_advantage_estimator(ADV) is rank_advantage
    # import paths are not added to the registry: the list of built-in choices stays as it was
    assert LOSS not in POLICY_LOSSES and sorted(POLICY_LOSSES) == ["clipped", "gspo"]


def test_plugin_loss_and_aggregation_compute_the_loss(plugins_on_path):
    cfg = AlgorithmConfig(policy_loss=LOSS, loss_aggregation=AGG)
    check_algorithm_config(cfg)
    inputs, new, old = _batch()
    norm = LossNormalizer(num_tokens=4, num_seqs=2, max_response_length=8)
    loss, metrics = make_loss_fn(cfg)(inputs, norm)  # what the trainer builds from the config
    ratio = torch.exp(new.detach() - old)
    per_token = -inputs.advantages * ratio
    expected = (per_token[:3].sum() / math.sqrt(3) + per_token[3:].sum() / 1.0) / 2
    assert torch.allclose(loss.detach(), expected)
    assert metrics["clip_frac_low"] == 0 and metrics["clip_frac_high"] == 0
    loss.backward()
    # d/dlogp of -A exp(logp - old) / sqrt(len) / S
    grad = (-inputs.advantages * ratio / torch.tensor([math.sqrt(3)] * 3 + [1.0], dtype=torch.float64)) / 2
    assert torch.allclose(new.grad, grad)


def test_plugin_advantage_in_the_rollouts_group_computation(plugins_on_path):
    out = compute_group_advantages(ADV, [[0.0, 1.0, 1.0, 0.0], [2.0, 2.0], [0.0, 0.5, 1.0]], eps=1e-6)
    assert out[0] == pytest.approx([-2 / 3, 2 / 3, 2 / 3, -2 / 3])
    assert out[1] == [0.0, 0.0]  # a constant group gets no advantage
    assert out[2] == pytest.approx([-1.0, 0.0, 1.0])


def test_kl_estimator_by_import_path(bad_plugins):
    log_ratio_fn = "bad_plugins:flexible"  # returns its input: k1
    x = torch.tensor([0.5, -30.0])
    assert torch.equal(kl_penalty(x, torch.zeros(2), log_ratio_fn), torch.tensor([0.5, -10.0]))  # clamped as built-ins
    assert KL_ESTIMATORS.problem(log_ratio_fn) is None


@pytest.mark.parametrize(
    "value, message",
    [
        ("no_such_pkg.losses:fn", "cannot import module 'no_such_pkg.losses' (is its folder on PYTHONPATH"),
        ("raises_on_import:fn", "RuntimeError: plugin import failed on purpose"),
        ("bad_plugins:missing", "module 'bad_plugins' has no attribute 'missing'"),
        ("bad_plugins:NOT_CALLABLE", "'NOT_CALLABLE' is a int, not a callable"),
        (
            "bad_plugins:extra_required",
            "cannot be called with 2 positional argument(s) "
            "(expected fn(inputs: LossInputs, cfg: AlgorithmConfig) -> PolicyLossOutput)",
        ),
        ("bad_plugins:", "an import path must look like 'my_pkg.module:my_function'"),
        ("nope", "'nope' is not a registered policy loss (clipped, gspo)"),
    ],
)
def test_resolution_errors_name_the_key(bad_plugins, value, message):
    with pytest.raises(PluginResolutionError) as e:
        POLICY_LOSSES.lookup(value)
    assert str(e.value).startswith(f"algorithm.policy_loss: {value!r}"), str(e.value)
    assert message in str(e.value), str(e.value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, UserError)  # library and CLI both


def test_signature_checks(bad_plugins):
    assert POLICY_LOSSES.problem("bad_plugins:Losses.nested") is None  # dotted attribute after the colon
    assert POLICY_LOSSES.problem("bad_plugins:flexible") is None
    assert "cannot be called with 2 positional" in ADVANTAGE_ESTIMATORS.problem("bad_plugins:one_arg")


def test_plugin_returning_the_wrong_type_is_named(bad_plugins):
    inputs, _, _ = _batch()
    loss_fn = make_loss_fn(AlgorithmConfig(policy_loss="bad_plugins:wrong_return"))
    with pytest.raises(TypeError, match="algorithm.policy_loss='bad_plugins:wrong_return' returned Tensor"):
        loss_fn(inputs, LossNormalizer(4, 2, 8))


def test_registered_names_cannot_contain_a_colon():
    reg = Registry("thing", "x.key", arity=1)
    with pytest.raises(ValueError, match="contain no ':'"):
        reg.register("a:b")


# --- configuration -------------------------------------------------------------------------------


def test_config_accepts_import_paths(plugins_on_path):
    cfg = load_config(
        BASE,
        [
            "data.train_path=x.jsonl",
            f"algorithm.policy_loss={LOSS}",
            f"algorithm.advantage={ADV}",
            f"algorithm.loss_aggregation={AGG}",
        ],
    )
    assert (cfg.algorithm.policy_loss, cfg.algorithm.advantage, cfg.algorithm.loss_aggregation) == (LOSS, ADV, AGG)


def test_config_rejects_bad_import_path_naming_file_and_key(bad_plugins):
    with pytest.raises(ConfigError) as e:
        load_config(BASE, ["data.train_path=x.jsonl", "algorithm.advantage=bad_plugins:one_arg"])
    msg = str(e.value)
    assert msg.startswith(f"{BASE}: 'algorithm.advantage': 'bad_plugins:one_arg'") and "positional" in msg, msg


def test_login_node_checks_only_the_form(tmp_path):
    # The Slurm launcher renders jobs without importing the user's package (import_reward_terms=False).
    ov = ["data.train_path=x.jsonl", "algorithm.policy_loss=not_installed_here.losses:fn"]
    assert load_config(BASE, ov, import_reward_terms=False).algorithm.policy_loss == "not_installed_here.losses:fn"
    assert (
        algorithm_config_problems(AlgorithmConfig(policy_loss=":fn"), import_plugins=False)[0][0]
        == "algorithm.policy_loss"
    )
    with pytest.raises(ConfigError, match="cannot import module 'not_installed_here.losses'"):
        load_config(BASE, ov)


def test_cli_reports_a_bad_plugin_as_one_line(bad_plugins):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": os.pathsep.join([str(bad_plugins), str(EXAMPLES)])}
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "nemo_igrpo", "train", "--print-config", str(BASE), "data.train_path=x.jsonl"]
    proc = subprocess.run(
        cmd + ["algorithm.policy_loss=bad_plugins:extra_required"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().startswith("igrpo train: error: ") and "'algorithm.policy_loss'" in proc.stderr
    proc = subprocess.run(
        cmd + [f"algorithm.policy_loss={LOSS}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"policy_loss: {LOSS}" in proc.stdout


def test_real_training_run_uses_the_plugins(tmp_path):
    """`igrpo train` (megatron-core actor, in-framework generation, 2 steps on the demo's warm
    start) with a loss, an advantage and an aggregation given by import path; the plug-ins
    record their calls, so the run is known to have gone through them."""
    from nemo_igrpo.demo.task import split_pairs, write_jsonl

    (tmp_path / "counting_plugins.py").write_text(
        textwrap.dedent("""
        import os
        from my_igrpo_plugins.advantages import rank_advantage
        from my_igrpo_plugins.losses import seq_mean_token_sqrt, unclipped_pg

        def _log(what):
            with open(os.environ["PLUGIN_LOG"], "a") as f:
                f.write(what + "\\n")

        def loss(inputs, cfg):
            _log("loss")
            return unclipped_pg(inputs, cfg)

        def advantage(rewards, eps):
            _log("advantage")
            return rank_advantage(rewards, eps)

        def aggregate(per_token, seq_ids, num_seqs, norm):
            _log("aggregate")
            return seq_mean_token_sqrt(per_token, seq_ids, num_seqs, norm)
    """)
    )
    train, _ = split_pairs(0, 16)
    write_jsonl(train[:40], tmp_path / "train.jsonl")
    warm_start = max_demo_warm_start()
    log = tmp_path / "calls.log"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PLUGIN_LOG": str(log),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), str(EXAMPLES), os.environ.get("PYTHONPATH")])),
    }
    env.pop("RANK", None)
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "nemo_igrpo",
        "train",
        str(REPO / "conf" / "demo.yaml"),
        f"policy.model.hf_path={warm_start}",
        f"data.train_path={tmp_path / 'train.jsonl'}",
        "data.eval_path=null",
        f"run.dir={run_dir}",
        "data.prompts_per_step=2",
        "algorithm.num_drafts=2",
        "algorithm.num_refinements=4",
        "generation.backend=megatron",
        "trainer.max_steps=2",
        "trainer.save_every=0",
        "trainer.export_hf=false",
        "trainer.progress_bars=false",
        "reward.num_workers=0",
        "algorithm.policy_loss=counting_plugins:loss",
        "algorithm.advantage=counting_plugins:advantage",
        "algorithm.loss_aggregation=counting_plugins:aggregate",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    calls = log.read_text().split()
    assert {"loss", "advantage", "aggregate"} <= set(calls), calls
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["clip_frac_high"] == 0.0 for r in records)
