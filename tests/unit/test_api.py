"""The Python API (nemo_igrpo.api): load, override, train, evaluate, evaluate_suite, prepare_data.

Loading and overriding run for real; train and the evaluations run with the model side replaced
by stand-ins (the real runs are the CLI's, in tests/e2e), so what is checked here is the API's own
work: the config that reaches the trainer, the files and settings that reach the evaluator, and
the suite's table arithmetic and layout."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from nemo_igrpo import api
from nemo_igrpo.evaluation.evaluate import EvalResult
from nemo_igrpo.utils.errors import UserError

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "conf" / "base.yaml"


@pytest.fixture
def cfg(tmp_path):
    return api.load_config(
        BASE, [f"data.train_path={tmp_path / 'train.jsonl'}", f"run.dir={tmp_path / 'run'}", "reward.num_workers=0"]
    )


def test_load_with_list_or_mapping_overrides(tmp_path):
    a = api.load_config(BASE, ["data.train_path=t.jsonl", "trainer.max_steps=7", "algorithm=grpo"])
    b = api.load_config(BASE, {"data.train_path": "t.jsonl", "trainer.max_steps": 7, "algorithm": "grpo"})
    assert a == b and a.trainer.max_steps == 7 and a.algorithm.num_drafts == 0  # the grpo fragment
    with pytest.raises(api.ConfigError, match="required value"):
        api.load_config(BASE)  # data.train_path is required


def test_override_returns_a_new_validated_config(cfg):
    new = api.override(
        cfg,
        {
            "trainer.max_steps": 3,
            "eval.pass_k": [1, 4],
            "policy.model.hf_path": None,
            "reward.terms": [{"name": "math_accuracy", "weight": 2.0}],
            "algorithm.clip_eps_high": 0.28,
        },
    )
    assert (new.trainer.max_steps, new.eval.pass_k, new.policy.model.hf_path) == (3, [1, 4], None)
    assert new.reward.terms[0].weight == 2.0 and new.algorithm.clip_eps_high == 0.28
    assert cfg.trainer.max_steps != 3 and cfg.reward.terms[0].weight != 2.0  # the original is untouched
    assert api.override(cfg, ["seed=5"]).seed == 5


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.max_step=3"], "trainer.max_step"),
        (["trainer.max_steps=many"], "trainer.max_steps"),
        (["algorithm.num_refinements=1"], "'algorithm.num_refinements': must be >= 2"),
        (["algorithm.policy_loss=no_such_pkg:fn"], "cannot import module 'no_such_pkg'"),
        (["algorithm=dapo"], "choose a fragment with load_config"),
        (["nonsense"], "is not key=value"),
    ],
)
def test_override_errors(cfg, overrides, message):
    with pytest.raises(api.ConfigError, match=message.replace("(", r"\(")):
        api.override(cfg, overrides)


def test_override_rejects_a_bare_string(cfg):
    with pytest.raises(TypeError):
        api.override(cfg, "trainer.max_steps=3")


def test_train_hands_the_config_to_the_trainer(cfg, monkeypatch, tmp_path):
    import nemo_igrpo.algorithms.trainer as trainer

    seen = {}
    monkeypatch.setattr(trainer, "train", lambda c: seen.setdefault("cfg", c) and "result")
    new = api.override(cfg, {"policy.model.hf_path": None, "trainer.max_steps": 2})
    assert api.train(new) == "result" and seen["cfg"] is new
    with pytest.raises(UserError, match="is not a directory"):  # checked before the trainer starts
        api.train(api.override(cfg, {"policy.model.hf_path": str(tmp_path / "absent")}))


class _FakeModel:
    """EvalModel's interface; 'solves' a benchmark with an accuracy given per model directory."""

    calls: list = []

    def __init__(self, cfg, source):
        self.source = source

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def evaluate(self, rewards, problems, eval_cfg, name):
        _FakeModel.calls.append(
            (self.source, name, len(problems), eval_cfg.num_samples, eval_cfg.temperature, eval_cfg.top_p)
        )
        acc = {"a": 0.25, "b": 0.5}[Path(self.source).name] + (0.1 if name == "gsm8k" else 0.0)
        return EvalResult(
            name=name,
            num_problems=len(problems),
            num_samples=eval_cfg.num_samples,
            accuracy=acc,
            pass_at_k={1: acc},
            mean_response_length=3.0,
            seconds=0.0,
        )


def _bench(dir_: Path, names) -> Path:
    dir_.mkdir(parents=True, exist_ok=True)
    for n in names:
        (dir_ / f"{n}.jsonl").write_text('{"problem": "1+1=", "answer": "2"}\n{"problem": "2+2=", "answer": "4"}\n')
    return dir_


def test_evaluate_and_suite_wiring(cfg, monkeypatch, tmp_path):
    import nemo_igrpo.evaluation.evaluate as evaluate_mod
    import nemo_igrpo.evaluation.suite as suite_mod

    monkeypatch.setattr(evaluate_mod, "EvalModel", _FakeModel)
    monkeypatch.setattr(suite_mod, "EvalModel", _FakeModel)
    _FakeModel.calls = []
    data = _bench(tmp_path / "bench", ["aime25", "aime24", "math500", "amc23", "gsm8k", "minerva_math"])

    results = api.evaluate(
        cfg, checkpoint=str(tmp_path / "a"), benchmarks=[data / "gsm8k.jsonl", data / "math500.jsonl"]
    )
    assert [(r.name, r.num_problems, r.accuracy) for r in results] == [("gsm8k", 2, 0.35), ("math500", 2, 0.25)]
    with pytest.raises(UserError, match="no benchmarks"):
        api.evaluate(cfg, checkpoint="x")

    _FakeModel.calls = []
    report = api.evaluate_suite(cfg, [tmp_path / "a", tmp_path / "b"], data_dir=data, labels=["GRPO", "iGRPO"])
    # the paper's protocol per benchmark: 64 samples for AIME, 8 for the others, T 0.6, top-p 0.95
    assert [(c[0][-1], c[1], c[3], c[4], c[5]) for c in _FakeModel.calls[:6]] == [
        ("a", "aime25", 64, 0.6, 0.95),
        ("a", "aime24", 64, 0.6, 0.95),
        ("a", "math500", 8, 0.6, 0.95),
        ("a", "amc23", 8, 0.6, 0.95),
        ("a", "gsm8k", 8, 0.6, 0.95),
        ("a", "minerva_math", 8, 0.6, 0.95),
    ]
    assert report.rows[0].average == pytest.approx((0.25 * 6 + 0.1) / 6)
    assert report.difference()["average"] == pytest.approx(0.25) and report.difference()["gsm8k"] == pytest.approx(0.25)
    assert report.suite.deviations == []
    lines = report.table().splitlines()
    assert "NOT" not in lines[0] and "AIME25 64, AIME24 64, MATH500 8" in lines[0]
    assert lines[1].split() == ["model", "AIME25", "AIME24", "MATH500", "AMC", "GSM8K", "Minerva", "Average"]
    assert lines[2].split() == ["GRPO", "25.00", "25.00", "25.00", "25.00", "35.00", "25.00", "26.67"]
    assert lines[4].split() == ["iGRPO", "-", "GRPO"] + ["+25.00"] * 7
    json.dumps(report.as_dict())  # what --output writes is plain JSON


def test_suite_options_and_yaml_suites(cfg, monkeypatch, tmp_path):
    import nemo_igrpo.evaluation.suite as suite_mod

    monkeypatch.setattr(suite_mod, "EvalModel", _FakeModel)
    data = _bench(tmp_path / "bench", ["math500", "gsm8k"])
    report = api.evaluate_suite(
        cfg, [tmp_path / "a"], data_dir=data, benchmarks="gsm8k,math500", samples=["gsm8k=2", "4"]
    )
    assert [(b.name, b.num_samples) for b in report.suite.benchmarks] == [("math500", 4), ("gsm8k", 2)]  # suite order
    assert report.suite.deviations == [
        "benchmarks math500,gsm8k only",
        "math500: 4 samples instead of 8",
        "gsm8k: 2 samples instead of 8",
    ]
    assert report.difference() is None and len(report.table().splitlines()) == 3

    (tmp_path / "extra.jsonl").write_text('{"problem": "q", "answer": "1"}\n')
    suite = tmp_path / "quick.yaml"
    suite.write_text(
        "name: quick\ntemperature: 1.0\nbenchmarks:\n  - {name: gsm8k, num_samples: 3}\n"
        "  - {name: other, title: Other, file: extra.jsonl}\n"
    )
    report = api.evaluate_suite(cfg, [tmp_path / "b"], suite=str(suite), data_dir=data)
    assert [(b.title, b.num_samples) for b in report.suite.benchmarks] == [("gsm8k", 3), ("Other", 1)]
    assert report.rows[0].results["other"].num_problems == 1 and report.suite.temperature == 1.0

    for bad, message in [
        ("benchmarks: []\n", "non-empty 'benchmarks'"),
        ("benchmarks: [{name: a, samples: 2}]\n", "unknown key"),
        ("benchmarks: [{name: a, num_samples: 0}]\n", "num_samples"),
    ]:
        suite.write_text(bad)
        with pytest.raises(UserError, match=message):
            api.evaluate_suite(cfg, [tmp_path / "b"], suite=str(suite), data_dir=data)
    with pytest.raises(UserError, match="neither a known suite"):
        api.evaluate_suite(cfg, ["x"], suite="papr")
    with pytest.raises(UserError, match="--samples aime24=x"):
        api.evaluate_suite(cfg, ["x"], samples=["aime24=x"])
    with pytest.raises(UserError, match="one or two checkpoints"):
        api.evaluate_suite(cfg, ["x", "y", "z"], data_dir=data, benchmarks="gsm8k")


def test_prepare_data_and_example_script(tmp_path):
    src = tmp_path / "gsm8k.jsonl"
    src.write_text('{"question": "q", "answer": "#### 2,000"}\n')
    res = api.prepare_data("gsm8k", src, tmp_path / "out")
    assert json.loads(res.output.read_text())["answer"] == "2000"
    # The example uses only names the API exports.
    tree = ast.parse((REPO / "examples" / "python_api.py").read_text())
    used = {
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "api"
    }
    assert used and used <= set(api.__all__), used - set(api.__all__)
