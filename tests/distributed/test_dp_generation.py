"""Data-parallel generation in the colocated layout (generation/data_parallel.py): two ranks with
one vLLM engine each give exactly the greedy samples, rewards and advantages of one engine on
rank 0, and a weight sync reaches both engines. Real torchrun processes, vLLM's CPU build."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import REPO, run_torchrun

SCRIPT = Path(__file__).parent / "scripts" / "dp_generation.py"


def test_two_engines_equal_one(tiny_llama_dir, tmp_path):
    from nemo_igrpo.demo.task import split_pairs, write_jsonl

    train, held_out = split_pairs(0, 16)
    write_jsonl(train[:60], tmp_path / "train.jsonl")
    write_jsonl(held_out[:6], tmp_path / "eval.jsonl")
    env = {"PYTHONPATH": str(REPO / "tests" / "e2e")}
    reports = {}
    for mode in ("single", "dp"):
        run_torchrun(2, SCRIPT, mode, tiny_llama_dir, tmp_path, tmp_path, timeout=600, env=env)
        reports[mode] = [json.loads((tmp_path / f"{mode}_rank{r}.json").read_text()) for r in (0, 1)]
    single, dp = reports["single"], reports["dp"]
    assert [r["engines"] for r in single] == [True, False] and [r["engines"] for r in dp] == [True, True]
    for key in ("step1", "step2", "eval"):
        assert dp[0][key] == single[0][key], f"{key}: data-parallel generation differs from one engine"
    assert dp[0]["step1"]["tokens"] != dp[0]["step2"]["tokens"], (
        "the update changed nothing: the test cannot see a sync"
    )
    # Both engines took the new weights: rank 1's own engine answers like rank 0's.
    assert dp[1]["own_engine"] == dp[0]["own_engine"] == single[0]["own_engine"]
