"""`igrpo compare` without training: statistics, arms at a matched budget, the interleaved and
resumable run order (training replaced by a fake that writes a metrics file), the report and
its plots; and the second demo task's graded reward and data split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from nemo_igrpo import compare
from nemo_igrpo.utils.errors import UserError

REPO = Path(__file__).resolve().parents[2]


# --- statistics ---------------------------------------------------------------------------------


def test_mean_ci_matches_student_t():
    s = compare.mean_ci([0.90, 0.92, 0.94])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.92)
    assert s["std"] == pytest.approx(0.02)
    half = 4.302652729911275 * 0.02 / 3**0.5  # t(0.975, 2)
    assert s["ci95"] == pytest.approx([0.92 - half, 0.92 + half])
    assert compare.mean_ci([0.5])["ci95"] is None and compare.mean_ci([])["mean"] is None


def test_t_quantile_table_fallback(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_scipy(name, *a, **k):
        if name.startswith("scipy"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    assert compare.t_quantile_975(4) == pytest.approx(2.776)
    assert compare.t_quantile_975(100) == pytest.approx(1.96)


# --- arms ---------------------------------------------------------------------------------------


def test_arms_share_the_budget():
    assert compare.arm_overrides("igrpo", 4, 4, {}) == ["algorithm.num_drafts=4", "algorithm.num_refinements=4"]
    assert compare.arm_overrides("grpo", 4, 4, {}) == ["algorithm.num_drafts=0", "algorithm.num_refinements=8"]
    assert compare.arm_overrides("grpo", 2, 6, {}) == ["algorithm.num_drafts=0", "algorithm.num_refinements=8"]
    assert "algorithm.all_zero_drafts=skip" in compare.arm_overrides("igrpo_skip", 4, 4, {})
    assert "algorithm.adaptive_draft_budget=true" in compare.arm_overrides("igrpo_adaptive", 4, 4, {})
    custom = compare.parse_custom_arms(["wide=algorithm.num_drafts=2,algorithm.num_refinements=6"])
    assert compare.arm_overrides("wide", 4, 4, custom) == ["algorithm.num_drafts=2", "algorithm.num_refinements=6"]
    with pytest.raises(UserError, match="unknown arm 'nope'"):
        compare.arm_overrides("nope", 4, 4, {})
    with pytest.raises(UserError, match="NAME=key=value"):
        compare.parse_custom_arms(["justaname"])


# --- runs, resume and report (training faked) ----------------------------------------------------


def fake_metrics(run_dir: Path, seed: int, arm: str, steps: int) -> None:
    """What a finished `igrpo train` leaves: step 0 and last-step evaluations, per-step records."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lift = 0.10 if arm == "igrpo" else 0.05
    recs = [{"step": 0, "eval/accuracy": 0.5 + 0.01 * seed}]
    for s in range(1, steps + 1):
        rec = {
            "step": s,
            "reward/refine_mean": 0.5 + 0.02 * s,
            "entropy": 0.3 - 0.01 * s,
            "diag/stage2_zero_variance_frac": 0.8 if arm == "igrpo" else 0.6,
        }
        if arm == "igrpo":
            rec.update(
                {
                    "diag/stage1_zero_variance_frac": 0.5,
                    "diag/best_draft_correct": 0.9,
                    "diag/best_draft_prop31": 0.85,
                    "diag/refine_acc_draft_wrong": 0.1,
                    "diag/refine_copy_frac": 0.9,
                }
            )
        recs.append(rec)
    recs.append({"step": steps, "eval/accuracy": 0.5 + 0.01 * seed + lift + 0.002 * seed * (arm == "grpo")})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def args_for(tmp_path: Path, *extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    compare.add_arguments(p)
    return p.parse_intermixed_args(
        [
            str(REPO / "conf" / "demo.yaml"),
            "--out",
            str(tmp_path / "report"),
            *extra,
            "policy.model.hf_path=/nowhere",
            "data.train_path=/t.jsonl",
            "data.eval_path=/e.jsonl",
            "trainer.max_steps=3",
        ]
    )


def test_runs_are_interleaved_resumable_and_reported(tmp_path, monkeypatch):
    calls = []
    fail_on = {("grpo", 1)}  # this run "crashes" the first time

    def fake_train(config, overrides, run_dir, log_path, timeout, launcher=None):
        seed = int([o for o in overrides if o.startswith("seed=")][0].split("=")[1])
        arm = "grpo" if "algorithm.num_drafts=0" in overrides else "igrpo"
        assert f"run.dir={run_dir.resolve()}" in overrides and "trainer.max_steps=3" in overrides
        calls.append((arm, seed))
        if (arm, seed) in fail_on:
            fail_on.discard((arm, seed))
            raise UserError("training run failed")
        fake_metrics(run_dir, seed, arm, 3)
        return 10.0 + seed

    monkeypatch.setattr(compare, "_train", fake_train)
    args = args_for(tmp_path, "--seeds", "3")
    with pytest.raises(UserError, match="failed"):
        compare.run(args)
    assert calls == [("igrpo", 0), ("grpo", 0), ("igrpo", 1), ("grpo", 1)]  # interleaved seed by seed
    calls.clear()
    assert compare.run(args) == 0  # the same command continues: finished runs are skipped
    assert calls == [("grpo", 1), ("igrpo", 2), ("grpo", 2)]

    out = tmp_path / "report"
    rep = json.loads((out / "report.json").read_text())
    assert rep["budget"] == {"num_drafts": 4, "num_refinements": 4, "per_prompt": 8}
    igrpo, grpo = rep["arms"]["igrpo"], rep["arms"]["grpo"]
    assert igrpo["seeds_done"] == [0, 1, 2] and grpo["seeds_done"] == [0, 1, 2]
    assert igrpo["accuracy_before"]["mean"] == pytest.approx(0.51)
    assert igrpo["gain"]["mean"] == pytest.approx(0.10) and grpo["gain"]["mean"] == pytest.approx(0.052)
    paired = rep["paired"]["igrpo - grpo"]
    assert paired["per_seed"] == pytest.approx([0.05, 0.048, 0.046]) and paired["wins"] == 3
    assert paired["ci95"][0] < paired["mean"] < paired["ci95"][1]
    assert igrpo["seconds"]["mean"] == pytest.approx(11.0)
    assert igrpo["diag"]["diag/best_draft_prop31"]["mean"] == pytest.approx(0.85)
    assert "diag/best_draft_prop31" not in grpo["diag"]
    md = (out / "report.md").read_text()
    assert "| igrpo | `algorithm.num_drafts=4 algorithm.num_refinements=4` | 3 |" in md
    assert "| igrpo - grpo | 3 | +4.8 [" in md and "3 of 3" in md
    assert "trained groups with zero reward variance" in md
    plots = {p.name for p in (out / "plots").iterdir()}
    assert {"accuracy.png", "reward.png", "entropy.png", "zero_variance.png", "best_draft_prop31.png"} <= plots
    for arm in ("igrpo", "grpo"):
        for seed in range(3):
            assert (out / arm / f"seed{seed}" / compare.DONE_FILE).exists()


def test_report_only_and_unfinished_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "_train", lambda *a: pytest.fail("--report-only must not train"))
    out = tmp_path / "report"
    fake_metrics(out / "igrpo" / "seed0", 0, "igrpo", 3)
    (out / "igrpo" / "seed0" / compare.DONE_FILE).write_text(json.dumps({"seconds": 5.0}))
    fake_metrics(out / "grpo" / "seed0", 0, "grpo", 2)  # no marker and stopped at step 2 of 3: left out
    assert compare.run(args_for(tmp_path, "--seeds", "1", "--report-only")) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["arms"]["igrpo"]["seeds_done"] == [0] and rep["arms"]["grpo"]["seeds_done"] == []
    assert rep["paired"]["igrpo - grpo"]["n"] == 0
    # A run launched elsewhere (no marker) that evaluated step 0 and the last step counts.
    fake_metrics(out / "grpo" / "seed0", 0, "grpo", 3)
    assert compare.run(args_for(tmp_path, "--seeds", "1", "--report-only")) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["arms"]["grpo"]["seeds_done"] == [0] and rep["arms"]["grpo"]["per_seed"]["0"]["seconds"] is None
    assert rep["paired"]["igrpo - grpo"]["n"] == 1


def test_launcher_prefixes_the_training_command(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, stdout, stderr, timeout):
        seen["cmd"] = cmd
        return SimpleNamespace(returncode=0)

    from types import SimpleNamespace

    monkeypatch.setattr(compare.subprocess, "run", fake_run)
    compare._train("c.yaml", ["seed=1"], tmp_path / "r", tmp_path / "log", None, "torchrun --nproc-per-node 8")
    assert seen["cmd"] == ["torchrun", "--nproc-per-node", "8", "-m", "nemo_igrpo", "train", "c.yaml", "seed=1"]


def test_a_run_without_final_evaluation_is_an_error(tmp_path, monkeypatch):
    def no_eval(config, overrides, run_dir, log_path, timeout, launcher=None):
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 3, "entropy": 0.1}) + "\n")
        return 1.0

    monkeypatch.setattr(compare, "_train", no_eval)
    with pytest.raises(UserError, match="without held-out evaluations"):
        compare.run(args_for(tmp_path, "--seeds", "1"))


def test_bad_arm_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "_train", lambda *a: pytest.fail("must not train"))
    with pytest.raises(Exception, match="algorithm"):
        compare.run(args_for(tmp_path, "--seeds", "1", "--arms", "igrpo,bad", "--arm", "bad=algorithm.nosuchkey=1"))


# --- the second demo task ---------------------------------------------------------------------------


def test_parts_fraction_is_graded():
    from nemo_igrpo.demo.pairs import parts_fraction

    assert parts_fraction("", "<answer>45,71</answer>", "45,71") == 1.0
    assert parts_fraction("", "<answer>38,71</answer>", "45,71") == 0.5
    assert parts_fraction("", "<answer>38,12</answer>", "45,71") == 0.0
    assert parts_fraction("", "<answer>45</answer>", "45,71") == 0.0  # wrong number of parts
    assert parts_fraction("", "45,71", "45,71") == 0.0  # no tag
    assert parts_fraction("", "<answer>1,2</answer> <answer>45, 71</answer>", "45,71") == 1.0  # the last tag


def test_pairs_data_keep_held_out_pairs_apart(tmp_path):
    from nemo_igrpo.demo.pairs import write_pairs_data
    from nemo_igrpo.demo.task import split_pairs

    train_path, eval_path = write_pairs_data(tmp_path, num_train=500, num_eval=64)
    train = [json.loads(line) for line in train_path.read_text().splitlines()]
    held = [json.loads(line) for line in eval_path.read_text().splitlines()]
    assert len(train) == 500 and len(held) == 64
    _, held_pairs = split_pairs(0, 256)
    held_texts = {f"max({a},{b})" for a, b in held_pairs}
    for rec in train:
        assert not any(part in held_texts for part in rec["problem"].rstrip("=").split(",max"))
    first = held[0]
    a, b = first["problem"][4:].split(")")[0].split(",")
    assert first["answer"].split(",")[0] == str(max(int(a), int(b)))


def test_demo_max2_config_loads():
    from nemo_igrpo.config import load_config

    cfg = load_config(
        str(REPO / "conf" / "demo_max2.yaml"), ["policy.model.hf_path=/m", "data.train_path=/t", "data.eval_path=/e"]
    )
    assert cfg.reward.correctness_term == "nemo_igrpo.demo.pairs:parts_fraction"
    assert cfg.algorithm.num_drafts == 4 and cfg.algorithm.num_refinements == 4


def test_demo_task_choice_uses_the_shipped_warm_starts(tmp_path, monkeypatch, capsys):
    """`igrpo demo --task max2` end to end except the training itself: data, both warm starts
    taken from the shipped assets (their keys match the configs, so nothing is retrained), the
    config and overrides handed to the trainer, the summary."""
    from types import SimpleNamespace

    import nemo_igrpo.algorithms.trainer as trainer
    from nemo_igrpo.demo import run as demo_run

    seen = {}

    def fake_train(cfg):
        seen["cfg"] = cfg
        fake_metrics(Path(cfg.run.dir), 0, "igrpo", cfg.trainer.max_steps)
        return SimpleNamespace(last_step=cfg.trainer.max_steps, resumed_from=None)

    monkeypatch.setattr(trainer, "train", fake_train)
    args = SimpleNamespace(
        seed=4,
        task="max2",
        config=None,
        cache_dir=str(tmp_path / "cache"),
        overrides=[f"run.dir={tmp_path / 'run'}", "trainer.max_steps=2"],
    )
    assert demo_run.run_demo(args) == 0
    cfg = seen["cfg"]
    assert cfg.seed == 4 and cfg.trainer.max_steps == 2
    assert cfg.reward.correctness_term == "nemo_igrpo.demo.pairs:parts_fraction"
    assert "warmstart-max2-" in cfg.policy.model.hf_path and cfg.data.train_path.endswith(
        "data-max2-split0/train.jsonl"
    )
    out = capsys.readouterr().out
    assert "using the shipped model" in out and "warm start (max2) step" not in out  # no retraining
    assert json.loads((tmp_path / "run" / "demo_summary.json").read_text())["accuracy_after"] == pytest.approx(0.6)
