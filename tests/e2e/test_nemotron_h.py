"""Nemotron-H (hybrid Mamba-2) end to end on CPU, on a tiny random checkpoint.

- vLLM (CPU build) generates from the hybrid checkpoint: greedy tokens equal transformers', the
  sampled tokens' log-probs match transformers' within 1e-4; a streamed weight update (another
  random checkpoint of the same shape) takes effect in full.
- `igrpo train` runs iGRPO for a few steps through the real stack (megatron-core hybrid actor with
  the torch Mamba kernels, vLLM colocated with a weight sync after every step, math-verify):
  finite losses, the final HF export loads in transformers with changed weights, and the run
  resumed from its step-2 checkpoint reproduces step 3 of the uninterrupted run exactly.

vLLM's engine settings for hybrid checkpoints come from generation.common.vllm_hybrid_engine_kwargs;
these tests pass the one that matters on CPU (prefix caching off) through the config as well.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from generation_helpers import hf_greedy, hf_model, hf_token_logprobs, state_dict_stream
from helpers import REPO, tiny_hf_model
from nemo_igrpo.generation.config import GenerationConfig
from nemo_igrpo.generation.interface import SamplingParams

PROMPTS = [[2, 40, 41, 42, 43], [2, 60, 61], [2, 70, 71, 72, 73, 74, 75, 76] * 5]


def tiny_nemotron_h(out_dir: Path, seed: int = 0) -> Path:
    """4 layers "M*M-" (hidden 128, attention heads of 64 for vLLM's CPU attention, scan chunk 16)."""
    return tiny_hf_model(
        out_dir, arch="nemotron_h", num_layers=4, num_attention_heads=4, num_key_value_heads=2, seed=seed
    )


@pytest.fixture(scope="module")
def nh_dir(tmp_path_factory) -> Path:
    return tiny_nemotron_h(tmp_path_factory.mktemp("tiny_nemotron_h"))


@pytest.fixture(scope="module")
def engine(nh_dir):
    from nemo_igrpo.generation.common import vllm_hybrid_engine_kwargs
    from nemo_igrpo.generation.factory import build_generation_backend

    cfg = GenerationConfig(backend="vllm")
    cfg.vllm.cpu_omp_threads_bind = "nobind"  # the test machine's cores are shared
    cfg.vllm.max_model_len = 256
    cfg.vllm.dtype = "float32"
    cfg.vllm.enable_prefix_caching = vllm_hybrid_engine_kwargs(str(nh_dir), on_cpu=True)["enable_prefix_caching"]
    cfg.weight_sync_bucket_mb = 1  # several buckets
    backend = build_generation_backend(cfg, str(nh_dir), seed=0)
    yield backend
    backend.close()


def _assert_matches_transformers(engine, model_dir: Path) -> None:
    hf = hf_model(model_dir)
    results = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=12))
    for prompt, (sample,) in zip(PROMPTS, results):
        want = hf_greedy(hf, prompt, len(sample.token_ids))
        assert sample.token_ids == want, (prompt, sample.token_ids, want)
        ref = hf_token_logprobs(hf, prompt, sample.token_ids)
        torch.testing.assert_close(torch.tensor(sample.logprobs), ref, rtol=0, atol=1e-4)


def test_vllm_generates_like_transformers(engine, nh_dir):
    _assert_matches_transformers(engine, nh_dir)
    sampled = engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=8, n=2, seed=5))
    assert all(math.isfinite(lp) for samples in sampled for s in samples for lp in s.logprobs)


def test_vllm_takes_a_weight_update(engine, tmp_path):
    other = tiny_nemotron_h(tmp_path / "other", seed=1)
    engine.update_weights(state_dict_stream(other))
    assert engine.last_update_missing == []
    _assert_matches_transformers(engine, other)


# --- igrpo train ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from nemo_igrpo.demo.task import split_pairs, write_jsonl

    d = tmp_path_factory.mktemp("nh_data")
    train, _ = split_pairs(0, 16)
    write_jsonl(train[:64], d / "train.jsonl")
    return d


def _train(model_dir: Path, data_dir: Path, run_dir: Path, max_steps: int) -> subprocess.CompletedProcess:
    overrides = [
        f"policy.model.hf_path={model_dir}",
        f"data.train_path={data_dir / 'train.jsonl'}",
        "data.eval_path=null",
        f"run.dir={run_dir}",
        f"trainer.max_steps={max_steps}",
        "trainer.save_every=1",
        "trainer.keep_last_k=3",
        "trainer.eval_every=0",
        "data.prompts_per_step=2",
        "algorithm.num_drafts=2",
        "algorithm.num_refinements=2",
        "generation.max_new_tokens=8",
        "generation.vllm.enable_prefix_caching=false",
        # A constant learning rate: a run resumed with a larger max_steps then follows the same schedule.
        "policy.optimizer.lr=1e-3",
        "policy.optimizer.warmup_ratio=0.0",
        "policy.optimizer.min_lr_ratio=1.0",
        "policy.max_tokens_per_microbatch=64",  # several packed micro-batches per step
        "reward.terms=[{name: math_accuracy, weight: 1.0}, {name: 'e2e_rewards:digit_fraction', weight: 1.0}]",
    ]
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "nemo_igrpo", "train", str(REPO / "conf" / "demo.yaml"), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def _metrics(run_dir: Path) -> dict[int, dict]:
    by_step: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step.setdefault(rec["step"], {}).update(rec)
    return by_step


@pytest.fixture(scope="module")
def straight_run(nh_dir, data_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("nh_straight") / "run"
    _train(nh_dir, data_dir, run_dir, 3)
    return run_dir


def test_igrpo_trains_nemotron_h(straight_run, nh_dir):
    from safetensors.torch import load_file

    m = _metrics(straight_run)
    assert sorted(m) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("loss", "entropy", "grad_norm", "reward/refine_mean", "reward/draft_mean"):
            assert math.isfinite(float(m[step][key])), f"step {step}: {key}={m[step].get(key)}"
        assert m[step]["skipped"] == 0.0
        # vLLM's log-probs agree with the trainer's after every weight sync.
        assert m[step]["generation/logprob_mismatch"] < 1.01, m[step]["generation/logprob_mismatch"]
        assert m[step]["timing/weight_sync_s"] > 0
    assert sorted(p.name for p in (straight_run / "checkpoints").iterdir()) == ["step_1", "step_2", "step_3"]
    before = load_file(str(nh_dir / "model.safetensors"))
    after = load_file(str(straight_run / "hf" / "model.safetensors"))
    assert set(after) == set(before)
    changed = [k for k in before if not torch.equal(before[k], after[k].to(before[k].dtype))]
    assert len(changed) > len(before) // 2, f"only {len(changed)} of {len(before)} tensors changed"
    hf_model(straight_run / "hf")  # transformers loads the export


def test_resume_reproduces_the_straight_run(straight_run, nh_dir, data_dir, tmp_path):
    # The straight run as it stood after step 2 (its step_2 checkpoint; a stop there leaves no
    # later checkpoint and no export), resumed: one process start instead of two.
    run_dir = tmp_path / "resumed"
    shutil.copytree(straight_run, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_3")
    shutil.rmtree(run_dir / "hf")
    proc = _train(nh_dir, data_dir, run_dir, 3)
    assert f"resuming from {run_dir / 'checkpoints' / 'step_2'}" in proc.stdout
    a, b = _metrics(straight_run), _metrics(run_dir)
    assert sorted(b) == [1, 2, 3]
    for key in ("loss", "reward/refine_mean", "reward/draft_mean", "entropy", "grad_norm"):
        assert b[3][key] == a[3][key], f"{key}: resumed {b[3][key]} != straight {a[3][key]}"
