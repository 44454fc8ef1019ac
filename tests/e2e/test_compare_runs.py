"""End-to-end: `igrpo compare` (python -m nemo_igrpo.compare) with real `igrpo train` processes
on the tiny model: two arms x two seeds, one step each, megatron generation backend (the
cheapest engine to start); then the same command again, which must skip every finished run.

Checks the run layout, that the arms really ran at the matched budget (the GRPO arm samples all
N + G from the bare prompt, the iGRPO arm logs draft diagnostics), and the report files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from helpers import REPO


def test_compare_two_arms_two_seeds(tiny_llama_dir, tmp_path):
    from nemo_igrpo.demo.task import split_pairs, write_jsonl

    train, held_out = split_pairs(0, 16)
    write_jsonl(train[:50], tmp_path / "train.jsonl")
    write_jsonl(held_out[:4], tmp_path / "eval.jsonl")
    out = tmp_path / "report"
    cmd = [
        sys.executable,
        "-m",
        "nemo_igrpo.compare",
        "--seeds",
        "2",
        "--out",
        str(out),
        str(REPO / "conf" / "demo.yaml"),
        f"policy.model.hf_path={tiny_llama_dir}",
        f"data.train_path={tmp_path / 'train.jsonl'}",
        f"data.eval_path={tmp_path / 'eval.jsonl'}",
        "data.prompts_per_step=2",
        "algorithm.num_drafts=2",
        "algorithm.num_refinements=2",
        "generation.max_new_tokens=4",
        "generation.backend=megatron",
        "trainer.max_steps=1",
        "trainer.save_every=0",
        "trainer.export_hf=false",
        "trainer.progress_bars=false",
        "eval.num_samples=1",
        "logging.tensorboard=false",
        # The random tiny model is never right: a graded reward gives the groups variance.
        "reward.terms=[{name: math_accuracy, weight: 1.0}, {name: 'e2e_rewards:digit_fraction', weight: 1.0}]",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = (out / "train.log").read_text()[-6000:] if (out / "train.log").exists() else ""
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{log}"

    for arm in ("igrpo", "grpo"):
        for seed in (0, 1):
            run_dir = out / arm / f"seed{seed}"
            assert (run_dir / "COMPARE_DONE").exists() and (run_dir / "config.yaml").exists()
            recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
            step1 = {k: v for r in recs if r["step"] == 1 for k, v in r.items()}
            assert "eval/accuracy" in step1 and any("eval/accuracy" in r for r in recs if r["step"] == 0)
            assert "diag/stage2_zero_variance_frac" in step1
            # Matched budget: 2 prompts x (2 + 2) for iGRPO (2 trained each), 2 x 4 trained for GRPO.
            assert step1["samples/trained"] == (4.0 if arm == "igrpo" else 8.0)
            assert ("diag/best_draft_prop31" in step1) == (arm == "igrpo")
            assert f"seed: {seed}" in (run_dir / "config.yaml").read_text()

    report = json.loads((out / "report.json").read_text())
    assert report["arms"]["igrpo"]["seeds_done"] == [0, 1] == report["arms"]["grpo"]["seeds_done"]
    assert report["paired"]["igrpo - grpo"]["n"] == 2
    assert "| igrpo - grpo | 2 |" in (out / "report.md").read_text()
    assert (out / "plots" / "accuracy.png").exists() and (out / "plots" / "zero_variance.png").exists()

    # Resume: the same command trains nothing and rewrites the same report.
    t0 = time.time()
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done, skipped") == 4
    assert json.loads((out / "report.json").read_text())["arms"] == report["arms"]
    assert time.time() - t0 < 120
