"""The Megatron generation backend (megatron-core's static inference engine) under torchrun with
2 processes (gloo): at TP2 and at PP2 both ranks call generate() together and each gets the full
results, identical to the TP1 run on the same checkpoint. One launch builds the three layouts in
turn (see scripts/generation_megatron_parallel.py); each test reads its part."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_torchrun, tiny_hf_model

SCRIPT = Path(__file__).parent / "scripts" / "generation_megatron_parallel.py"
LAYOUTS = ["tp1_pp1", "tp2_pp1", "tp1_pp2"]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    work = tmp_path_factory.mktemp("generation_megatron_parallel")
    hf = tiny_hf_model(work / "hf", arch="qwen2")
    run_torchrun(2, SCRIPT, hf, work, timeout=600)
    return {tag: [json.loads((work / f"{tag}_rank{r}.json").read_text()) for r in (0, 1)] for tag in LAYOUTS}


def _tokens(results):
    return [[s["tokens"] for s in samples] for samples in results]


def _assert_logprobs_close(got, want, atol=1e-4):
    for p, (gs, ws) in enumerate(zip(got, want)):
        for i, (g, w) in enumerate(zip(gs, ws)):
            diff = max((abs(a - b) for a, b in zip(g["logprobs"], w["logprobs"])), default=0.0)
            assert diff <= atol, f"prompt {p} sample {i}: log-probs differ by {diff}"


@pytest.mark.parametrize("tag", LAYOUTS)
def test_every_rank_gets_the_full_results(reports, tag):
    rank0, rank1 = reports[tag]
    # The script builds the backend with a different seed per rank. At TP1 the two ranks are
    # independent generators (data parallel), so their unseeded samples differ; in a
    # model-parallel group the unseeded seeds are broadcast and the ranks must agree.
    keys = ("greedy", "seeded") if tag == "tp1_pp1" else ("greedy", "seeded", "unseeded")
    if tag == "tp1_pp1":
        assert _tokens(rank0["unseeded"]) != _tokens(rank1["unseeded"])
    for key in keys:
        assert len(rank0[key]) == len(rank1[key]) > 0
        assert _tokens(rank0[key]) == _tokens(rank1[key]), f"{tag} {key}: ranks disagree"
        assert [[s["finish"] for s in r] for r in rank0[key]] == [[s["finish"] for s in r] for r in rank1[key]]
    assert rank0["training_restored"] and rank1["training_restored"]
    assert rank0["inference_mode_off"] and rank1["inference_mode_off"]


@pytest.mark.parametrize("tag", ["tp2_pp1", "tp1_pp2"])
def test_greedy_matches_tp1(reports, tag):
    base = reports["tp1_pp1"][0]["greedy"]
    for rank_report in reports[tag]:
        assert _tokens(rank_report["greedy"]) == _tokens(base)
        _assert_logprobs_close(rank_report["greedy"], base)


@pytest.mark.parametrize("tag", ["tp2_pp1", "tp1_pp2"])
def test_seeded_sampling_matches_tp1(reports, tag):
    # Same seeds, logits equal up to float summation order: the same draws (deterministic on a
    # given machine; a flip would need a logit perturbation to straddle a sampling boundary).
    base = reports["tp1_pp1"][0]["seeded"]
    for rank_report in reports[tag]:
        assert _tokens(rank_report["seeded"]) == _tokens(base)
        _assert_logprobs_close(rank_report["seeded"], base)
