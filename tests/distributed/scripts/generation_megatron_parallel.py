"""Run under torchrun with 2 processes (gloo): the Megatron generation backend (megatron-core's
static inference engine) on the same tiny checkpoint at TP1 (two independent DP ranks), TP2 and
PP2. At each layout both ranks call generate() with identical arguments, as the contract says,
and each writes what it got to <out_dir>/<layout>_rank<r>.json; the pytest side compares.

Usage: generation_megatron_parallel.py <hf_dir> <out_dir>
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from nemo_igrpo.generation.config import GenerationConfig
from nemo_igrpo.generation.interface import SamplingParams
from nemo_igrpo.generation.megatron_backend import MegatronGenerationBackend
from nemo_igrpo.policy.actor import MegatronActor
from nemo_igrpo.policy.config import ModelConfig, PolicyConfig

HF_DIR, OUT = sys.argv[1], Path(sys.argv[2])
LAYOUTS = [(1, 1), (2, 1), (1, 2)]
# Different lengths in one call: the engine prefills to the shortest, then steps.
PROMPTS = [[2, 40, 41, 42, 43, 44, 45], [2, 60, 61], [2, 70, 71, 72, 73]]


def as_lists(results):
    return [[{"tokens": s.token_ids, "logprobs": s.logprobs, "finish": s.finish_reason} for s in r] for r in results]


def main() -> None:
    from megatron.core.inference.utils import InferenceMode

    rank = int(os.environ["RANK"])
    for tp, pp in LAYOUTS:
        t0 = time.time()
        cfg = PolicyConfig(
            model=ModelConfig(hf_path=HF_DIR, transformer_impl="local"),
            tensor_parallel_size=tp,
            pipeline_parallel_size=pp,
        )
        actor = MegatronActor(cfg, seed=0, total_steps=1)
        # The same backend seed on every rank, as the trainer builds it; the unseeded request
        # below checks that the ranks of a model-parallel group still sample alike.
        backend = MegatronGenerationBackend(actor, GenerationConfig(backend="megatron"), seed=100 + rank)
        actor.model_chunks[0].train()
        report = {
            "greedy": as_lists(backend.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=10, n=2))),
            "seeded": as_lists(
                backend.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=8, n=3, seed=7))
            ),
            "unseeded": as_lists(backend.generate(PROMPTS[:2], SamplingParams(temperature=1.0, max_new_tokens=6, n=2))),
            "training_restored": actor.model_chunks[0].training,
            "inference_mode_off": not InferenceMode.is_active(),
            "seconds": round(time.time() - t0, 1),
        }
        (OUT / f"tp{tp}_pp{pp}_rank{rank}.json").write_text(json.dumps(report))
        del backend, actor


if __name__ == "__main__":
    main()
