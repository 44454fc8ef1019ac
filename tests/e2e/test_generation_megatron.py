"""In-framework generation on the Megatron policy (single process, TP=1/PP=1): KV-cached
greedy output and log-probs checked against transformers on the same checkpoint."""
from __future__ import annotations

import math

import pytest

from generation_helpers import hf_greedy, hf_model, hf_token_logprobs
from nemo_igrpo.generation.common import logprob_mismatch
from nemo_igrpo.generation.config import GenerationConfig
from nemo_igrpo.generation.interface import SamplingParams

PROMPTS = [[2, 40, 41, 42, 43], [2, 60, 61]]


@pytest.fixture(scope="module")
def setup(tiny_qwen2_dir):
    from nemo_igrpo.generation.factory import build_generation_backend
    from nemo_igrpo.policy.actor import MegatronActor
    from nemo_igrpo.policy.config import PolicyConfig

    policy_cfg = PolicyConfig()
    policy_cfg.model.hf_path = str(tiny_qwen2_dir)
    actor = MegatronActor(policy_cfg, seed=0, total_steps=1)
    backend = build_generation_backend(GenerationConfig(backend="megatron"), actor.hf_path, seed=0, actor=actor)
    return actor, backend, hf_model(tiny_qwen2_dir)


def test_greedy_matches_transformers(setup):
    _, backend, reference = setup
    out = backend.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=12, n=2))
    for prompt, samples in zip(PROMPTS, out):
        assert len(samples) == 2 and samples[0].token_ids == samples[1].token_ids
        expected = hf_greedy(reference, prompt, 12)
        assert samples[0].token_ids == expected
        assert samples[0].finish_reason == ("length" if len(expected) == 12 else "stop")


def test_sampled_logprobs_match_recomputation_and_seeds(setup):
    _, backend, reference = setup
    params = SamplingParams(temperature=1.0, max_new_tokens=10, n=3, seed=21)
    out = backend.generate(PROMPTS, params)
    again = backend.generate(PROMPTS, params)
    assert [[s.token_ids for s in r] for r in out] == [[s.token_ids for s in r] for r in again]
    train, gen = [], []
    for prompt, samples in zip(PROMPTS, out):
        assert samples[0].token_ids != samples[1].token_ids or samples[1].token_ids != samples[2].token_ids
        for s in samples:
            assert len(s.logprobs) == len(s.token_ids) and all(math.isfinite(x) for x in s.logprobs)
            train.append(hf_token_logprobs(reference, prompt, s.token_ids))
            gen.append(s.logprobs)
    assert logprob_mismatch(train, gen) < 1.001  # same weights, same fp32 math


def test_stop_token(setup):
    _, backend, reference = setup
    greedy = hf_greedy(reference, PROMPTS[0], 12)
    stop = greedy[3]
    out = backend.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=[stop]))[0][0]
    assert out.finish_reason == "stop" and out.token_ids == greedy[: greedy.index(stop) + 1]
