"""Helpers shared by tests: tiny models and real multi-process runs under torchrun."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tiny_hf_model(out_dir: Path, arch: str = "llama", **kwargs) -> Path:
    """Write a tiny random HF model + char tokenizer (head_dim 64: hidden 128, 2 heads)."""
    from nemo_igrpo.utils.tiny_model import make_tiny_hf_model

    kwargs.setdefault("num_layers", 2)
    kwargs.setdefault("hidden_size", 128)
    kwargs.setdefault("num_attention_heads", 2)
    kwargs.setdefault("num_key_value_heads", 1)
    return Path(make_tiny_hf_model(out_dir, arch=arch, **kwargs))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(
    nproc: int, script: str | Path, *args: str, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run `script` under torchrun with `nproc` CPU processes (gloo). Raises with the full output
    of every rank when the run fails, so a failing distributed test says why."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(script),
        *map(str, args),
    ]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun {script} {' '.join(map(str, args))} exited {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-8000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
        )
    return proc


def max_demo_warm_start() -> Path:
    """The shipped warm start of the max(a, b) demo (not the max2 task's, `warmstart-max2-*`)."""
    assets = REPO / "nemo_igrpo" / "demo" / "assets"
    found = sorted(p for p in assets.glob("warmstart-*") if not p.name.startswith("warmstart-max2-"))
    assert len(found) == 1, f"expected one max-demo warm start under {assets}, found {found}"
    return found[0]
