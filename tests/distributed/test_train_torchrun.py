"""`igrpo train` launched by torchrun with tensor parallelism: two real processes (gloo), vLLM on
rank 0, the rollout broadcast to rank 1, collective weight export, checkpoint and HF export."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from helpers import REPO, free_port


def test_train_under_torchrun_tp2(tiny_llama_dir, tmp_path):
    from nemo_igrpo.demo.task import split_pairs, write_jsonl

    train, held_out = split_pairs(0, 8)
    write_jsonl(train[:100], tmp_path / "train.jsonl")
    write_jsonl(held_out, tmp_path / "eval.jsonl")
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "nemo_igrpo",
        "train",
        str(REPO / "conf" / "demo.yaml"),
        f"policy.model.hf_path={tiny_llama_dir}",
        f"data.train_path={tmp_path / 'train.jsonl'}",
        f"data.eval_path={tmp_path / 'eval.jsonl'}",
        f"run.dir={run_dir}",
        "data.prompts_per_step=4",
        "algorithm.num_drafts=2",
        "algorithm.num_refinements=2",
        "generation.max_new_tokens=12",
        "trainer.eval_every=0",
        "eval.num_samples=1",
        "trainer.max_steps=2",
        "policy.tensor_parallel_size=2",
        "policy.optimizer.lr=1e-3",
        "reward.terms=[{name: math_accuracy, weight: 1.0}, {name: 'e2e_rewards:digit_fraction', weight: 1.0}]",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tests" / "e2e"), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    assert [r["step"] for r in recs] == [0, 1, 2]  # written once (rank 0), not once per rank
    for r in recs[1:]:
        assert math.isfinite(r["loss"]) and math.isfinite(r["entropy"]) and r["skipped"] == 0.0
        assert r["generation/logprob_mismatch"] < 1.05  # TP=2 recomputation agrees with vLLM
    assert (run_dir / "checkpoints" / "step_2").is_dir()
    assert (run_dir / "hf" / "config.json").exists()
