"""A reward term that fails on every sample stops `igrpo train` with one clear line (exit 2) after
reward.max_failing_steps steps, with the last completed step checkpointed so nothing is lost."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import REPO


def test_failing_reward_term_stops_with_checkpoint(tiny_llama_dir, tmp_path):
    from nemo_igrpo.demo.task import split_pairs, write_jsonl

    train, held_out = split_pairs(0, 16)
    write_jsonl(train[:50], tmp_path / "train.jsonl")
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "nemo_igrpo",
        "train",
        str(REPO / "conf" / "demo.yaml"),
        f"policy.model.hf_path={tiny_llama_dir}",
        f"data.train_path={tmp_path / 'train.jsonl'}",
        "data.eval_path=null",
        f"run.dir={run_dir}",
        "data.prompts_per_step=2",
        "algorithm.num_drafts=1",
        "algorithm.num_refinements=2",
        "generation.max_new_tokens=4",
        "generation.backend=megatron",
        "trainer.max_steps=5",
        "trainer.progress_bars=false",
        "reward.num_workers=0",
        "reward.max_failing_steps=2",
        "reward.terms=[{name: math_accuracy, weight: 1.0}, {name: 'e2e_rewards:broken', weight: 1.0}]",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tests" / "e2e"), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("igrpo train: error:")]
    # One line, and the last thing said (megatron-bridge's own import noise may come earlier).
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr[-4000:]
    assert "e2e_rewards:broken" in errors[0] and "reward.max_failing_steps=2" in errors[0], errors[0]
    assert "KeyError" in errors[0], errors[0]
    # Step 2 reached the limit: step 1 is checkpointed, and a rerun resumes from it.
    assert (run_dir / "checkpoints" / "step_1").is_dir(), sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert not (run_dir / "checkpoints" / "step_2").exists()
