"""Nemotron-H (hybrid Mamba-2 / attention / MLP) on the megatron-core actor, under torchrun (2
processes, gloo): parity with transformers' pure-torch Nemotron-H (log-probs, entropies,
gradients), packed sequences with SSM state reset, TP2 and PP2 against TP1, dist-checkpoint
resume across layouts, bit-exact HF export and `igrpo convert`, and the Megatron generation
backend's refusal. One launch (policy_scripts/hybrid_checks.py); each test reads its checks.

The Mamba kernels on this CPU path are the torch references of policy/mamba_reference.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_torchrun, tiny_hf_model

SCRIPT = Path(__file__).parent / "policy_scripts" / "hybrid_checks.py"


def tiny_nemotron_h(out_dir: Path) -> Path:
    """4 layers "M*M-", hidden 128, 16 Mamba heads of 16 in 2 groups, state 16, scan chunk 16;
    4 attention heads of 64 over 2 KV heads (TP2 splits every one of these)."""
    return tiny_hf_model(out_dir, arch="nemotron_h", num_layers=4, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    work = tmp_path_factory.mktemp("policy_hybrid")
    hf = tiny_nemotron_h(work / "hf")
    out = work / "report.json"
    run_torchrun(2, SCRIPT, hf, out, work, timeout=600)
    return json.loads(out.read_text())["checks"]


def _assert(report, names):
    missing = [n for n in names if n not in report]
    assert not missing, f"checks not run: {missing}"
    failed = {n: report[n] for n in names if report[n]}
    assert not failed, "\n\n".join(f"{n}: {msg}" for n, msg in failed.items())


def test_tp1_matches_transformers(report):
    _assert(report, ["logprobs_match_transformers", "grads_match_transformers"])


def test_packed_sequences_reset_the_ssm_state(report):
    _assert(report, ["packing_and_padding_invisible"])


def test_hf_export_and_convert_are_exact(report):
    _assert(report, ["export_and_save_hf_exact_tp1", "convert_round_trip_exact"])


@pytest.mark.parametrize("tag", ["tp2_pp1", "tp1_pp2"])
def test_layout_matches_tp1(report, tag):
    _assert(report, [f"export_exact_{tag}", f"logprobs_{tag}", f"step_{tag}"])


@pytest.mark.parametrize("tag", ["tp2_pp1", "tp1_pp2"])
def test_checkpoint_from_tp1_resumes(report, tag):
    _assert(report, ["checkpoint_written", f"resume_from_tp1_{tag}"])


def test_megatron_generation_backend_refuses_clearly(report):
    _assert(report, ["megatron_generation_refused"])


def test_full_recompute_and_bf16(report):
    _assert(report, ["full_recompute_exact_and_bf16_close"])
