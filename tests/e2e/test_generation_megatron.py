"""In-framework generation on the Megatron policy (single process, TP=1/PP=1), through
megatron-core's static inference engine: greedy output and log-probs checked against
transformers on the same checkpoint; seeds, batching, stop conditions, log-prob modes and the
process state the engine touches. TP2 / PP2: tests/distributed/test_generation_megatron_parallel.py."""

from __future__ import annotations

import math

import pytest
import torch

from generation_helpers import hf_greedy, hf_model, hf_token_logprobs
from nemo_igrpo.generation.common import logprob_mismatch
from nemo_igrpo.generation.config import GenerationConfig
from nemo_igrpo.generation.interface import SamplingParams

PROMPTS = [[2, 40, 41, 42, 43], [2, 60, 61]]
# Lengths 8, 2, 5, 3 in one call: the engine prefills to the shortest, then steps.
MIXED = [[2, 30, 31, 32, 33, 34, 35, 36], [2, 50], [2, 70, 71, 72, 73], [2, 90, 91]]


@pytest.fixture(scope="module")
def setup(tiny_qwen2_dir):
    from nemo_igrpo.generation.factory import build_generation_backend
    from nemo_igrpo.policy.actor import MegatronActor
    from nemo_igrpo.policy.config import PolicyConfig

    policy_cfg = PolicyConfig()
    policy_cfg.model.hf_path = str(tiny_qwen2_dir)
    actor = MegatronActor(policy_cfg, seed=0, total_steps=4)
    backend = build_generation_backend(GenerationConfig(backend="megatron"), actor.hf_path, seed=0, actor=actor)
    return actor, backend, hf_model(tiny_qwen2_dir)


def _tokens(results):
    return [[s.token_ids for s in samples] for samples in results]


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
    out = backend.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=[stop]))[0][
        0
    ]
    assert out.finish_reason == "stop" and out.token_ids == greedy[: greedy.index(stop) + 1]


def test_prompts_of_different_lengths_batched_equal_one_at_a_time(setup):
    _, backend, reference = setup
    params = SamplingParams(temperature=0.0, max_new_tokens=9, n=2)
    together = backend.generate(MIXED, params)
    for prompt, samples in zip(MIXED, together):
        alone = backend.generate([prompt], params)[0]
        assert [s.token_ids for s in samples] == [s.token_ids for s in alone]
        assert samples[0].token_ids == hf_greedy(reference, prompt, 9)
        torch.testing.assert_close(
            torch.tensor(samples[0].logprobs), torch.tensor(alone[0].logprobs), rtol=0, atol=1e-5
        )
        torch.testing.assert_close(
            torch.tensor(samples[0].logprobs),
            hf_token_logprobs(reference, prompt, samples[0].token_ids),
            rtol=0,
            atol=1e-4,
        )


def test_seeded_samples_do_not_depend_on_batch_composition(setup):
    actor, backend, _ = setup
    from nemo_igrpo.generation.megatron_backend import MegatronGenerationBackend

    params = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=8, n=3, seed=5)
    together = backend.generate(MIXED, params)
    # Alone, in other company, and split over static batches of 2 rows (the engine runs them
    # one after another): sample i of a prompt is drawn from its own generator (seed + i).
    assert _tokens(backend.generate([MIXED[2]], params)) == _tokens(together[2:3])
    assert _tokens(backend.generate([MIXED[3], MIXED[0]], params)) == _tokens([together[3], together[0]])
    small_batches = MegatronGenerationBackend(actor, GenerationConfig(backend="megatron"), seed=0, max_batch_size=2)
    assert _tokens(small_batches.generate(MIXED, params)) == _tokens(together)


def test_processed_logprobs_are_the_sampled_distribution(setup, tiny_qwen2_dir):
    actor, _, reference = setup
    from nemo_igrpo.generation.megatron_backend import MegatronGenerationBackend, top_p_filter

    backend = MegatronGenerationBackend(actor, GenerationConfig(backend="megatron", logprobs_mode="processed_logprobs"))
    temperature, top_p = 0.7, 0.8
    out = backend.generate(PROMPTS, SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=8, n=2, seed=3))
    for prompt, samples in zip(PROMPTS, out):
        for s in samples:
            ids = torch.tensor([prompt + s.token_ids])
            with torch.no_grad():
                logits = reference(ids).logits[0, len(prompt) - 1 : -1].float()
            processed = torch.log_softmax(top_p_filter(logits / temperature, top_p), dim=-1)
            expected = processed.gather(1, torch.tensor(s.token_ids)[:, None])[:, 0]
            assert torch.isfinite(expected).all(), "a token outside the top-p set was sampled"
            torch.testing.assert_close(torch.tensor(s.logprobs), expected, rtol=0, atol=1e-4)


def test_stop_string_and_finish_reasons(setup):
    actor, backend, reference = setup
    greedy = hf_greedy(reference, PROMPTS[1], 12)
    text = actor.tokenizer.decode(greedy, skip_special_tokens=True)
    stop = text[3:5]
    cut = next(
        k for k in range(1, len(greedy) + 1) if stop in actor.tokenizer.decode(greedy[:k], skip_special_tokens=True)
    )
    out = backend.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=12, stop_strings=[stop]))
    assert out[1][0].finish_reason == "stop" and out[1][0].token_ids == greedy[:cut]
    assert stop in out[1][0].text
    other = hf_greedy(reference, PROMPTS[0], 12)
    if stop not in actor.tokenizer.decode(other, skip_special_tokens=True):
        assert out[0][0].token_ids == other and out[0][0].finish_reason == ("length" if len(other) == 12 else "stop")


def test_too_long_request_is_refused_naming_the_prompt(setup):
    _, backend, _ = setup
    with pytest.raises(ValueError, match=r"prompt 1: 1000 prompt \+ 100 new tokens exceed the model's 1024 positions"):
        backend.generate([[2, 3], [5] * 1000], SamplingParams(temperature=0.0, max_new_tokens=100))


def test_process_state_is_restored_and_training_still_works(setup):
    actor, backend, _ = setup
    from megatron.core.inference.utils import InferenceMode

    from nemo_igrpo.batch import TrainSample

    model = actor.model_chunks[0]
    for mode in (False, True):
        model.train(mode)
        rng = torch.get_rng_state()
        out = backend.generate(MIXED, SamplingParams(temperature=1.0, max_new_tokens=6, n=2, seed=1))
        assert model.training is mode
        assert not InferenceMode.is_active()
        assert torch.equal(torch.get_rng_state(), rng)  # the engine reseeds torch; put back
    # A training step right after generating, on the generated samples (autograd must not meet
    # any tensor the engine made under inference mode).
    samples = [
        TrainSample(
            token_ids=s.prompt_token_ids + s.token_ids,
            response_start=len(s.prompt_token_ids),
            advantage=1.0 if i % 2 else -1.0,
            generation_logprobs=torch.tensor(s.logprobs),
        )
        for i, s in enumerate(x for r in out for x in r)
    ]

    def loss_fn(inp, norm):
        return -(inp.logprobs * inp.advantages).sum() / norm.num_tokens, {}

    metrics = actor.train_step(samples, loss_fn)
    assert math.isfinite(metrics["loss"]) and metrics["logprob_mismatch"] < 1.001
