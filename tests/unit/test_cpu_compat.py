"""The CPU compatibility layer for megatron-core: each redirection does what its comment says,
megatron's own functions run through it, and disable() restores the originals."""

from __future__ import annotations

import pytest
import torch

from nemo_igrpo.policy import cpu_compat

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is inert when CUDA exists (tested below)")


@pytest.fixture
def compat():
    if torch.cuda.is_available():
        pytest.skip("the layer is inert when CUDA exists")
    # Another test in this process (an in-process actor) may have left the layer on: start from
    # the unpatched state so "the originals" are torch's own functions, and put it back after.
    was_enabled = cpu_compat.is_enabled()
    if was_enabled:
        cpu_compat.disable()
    originals = {
        name: getattr(torch.cuda, name) for name in ("current_device", "get_rng_state", "synchronize", "Stream")
    }
    assert cpu_compat.enable() is True
    yield
    cpu_compat.disable()
    for name, fn in originals.items():
        assert getattr(torch.cuda, name) is fn, f"disable() did not restore torch.cuda.{name}"
    assert not cpu_compat.is_enabled()
    if was_enabled:
        cpu_compat.enable()


def test_enable_is_idempotent_and_disable_restores(compat):
    patched = torch.cuda.current_device
    assert cpu_compat.enable() is True  # second call: no double patching
    assert torch.cuda.current_device is patched
    assert torch.cuda.current_device() == torch.device("cpu")


@pytest.fixture
def layer_off():
    """The layer switched off for one test, and put back as it was (an in-process actor in an
    earlier test of this process may have left it on)."""
    was_enabled = cpu_compat.is_enabled()
    if was_enabled:
        cpu_compat.disable()
    yield
    if was_enabled:
        cpu_compat.enable()


@cpu_only
def test_disabled_layer_leaves_cuda_calls_failing(layer_off):
    # Without the layer a CPU-only machine cannot run these: this is what the layer fixes.
    assert not cpu_compat.is_enabled()
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")
    with cpu_compat.cuda_to_cpu():  # no-op when not enabled
        with pytest.raises((RuntimeError, AssertionError)):
            torch.zeros(1, device="cuda")


def test_streams_events_synchronize_are_accepted(compat):
    stream = torch.cuda.Stream(device=torch.cuda.current_device())
    event = torch.cuda.Event()
    # What megatron's DDP and schedules do with them; each would raise without the layer
    # (torch.cuda.Stream() initialises CUDA).
    assert torch.cuda.current_stream().wait_stream(stream) is None
    assert torch.cuda.current_stream().wait_event(event) is None
    assert event.record() is None and event.query() is True and stream.query() is True
    assert torch.cuda.synchronize() is None
    with torch.cuda.stream(stream):
        t = torch.ones(2) * 3  # work inside the stream context runs, on the CPU
    assert t.device.type == "cpu" and t.tolist() == [3.0, 3.0]


def test_streams_events_raise_without_the_layer():
    # The counterpart: on this CUDA-less machine the same calls fail when the layer is off, so
    # the test above checks the layer, not torch.
    was_enabled = cpu_compat.is_enabled()
    cpu_compat.disable()
    try:
        with pytest.raises(Exception):
            torch.cuda.Stream(device=0)
        with pytest.raises(Exception):
            torch.cuda.current_stream()
    finally:
        if was_enabled:
            cpu_compat.enable()


def test_cuda_device_requests_land_on_cpu_only_inside_the_scope(compat):
    with cpu_compat.cuda_to_cpu():
        a = torch.zeros(3, dtype=torch.int, device="cuda")
        b = torch.tensor([1.0], device=torch.device("cuda", 0))
        c = torch.ones(2).cuda()
        d = torch.ones(2).to("cuda")
        m = torch.nn.Linear(2, 2).cuda(torch.cuda.current_device())
        assert torch.ones(1).type() == "torch.cuda.FloatTensor"
        assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        assert torch.ones(1).to(torch.float64).dtype == torch.float64  # dtype-only .to untouched
    for t in (a, b, c, d, m.weight):
        assert t.device.type == "cpu"
    assert torch.ones(1).type() == "torch.FloatTensor"
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")


def test_megatron_clip_grads_runs_and_clips(compat):
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 3.0)  # norm 6
    with cpu_compat.cuda_to_cpu():
        clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=6.0)
    assert torch.allclose(p.grad.norm(), torch.tensor(1.0), atol=1e-5)


def test_rng_tracker_forks_the_cpu_generator(compat):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    def draw():
        model_parallel_cuda_manual_seed(1234, tp_rank=0, ep_rank=0, etp_rank=0)
        before = torch.rand(4)
        with get_cuda_rng_tracker().fork():
            forked = torch.rand(4)
        after = torch.rand(4)
        return before, forked, after

    b1, f1, a1 = draw()
    b2, f2, a2 = draw()
    assert torch.equal(b1, b2) and torch.equal(f1, f2) and torch.equal(a1, a2), "seeding is not reproducible"
    assert not torch.equal(b1, f1), "the model-parallel stream must differ from the default one"
    # The fork restores the default stream: `after` is the default stream's second draw.
    torch.manual_seed(1234)
    expected = torch.rand(8)
    assert torch.equal(torch.cat([b1, a1]), expected)


def test_tp_ranks_get_different_model_parallel_streams(compat):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    draws = []
    for tp_rank in (0, 1):
        model_parallel_cuda_manual_seed(7, tp_rank=tp_rank, ep_rank=0, etp_rank=0)
        default = torch.rand(3)
        with get_cuda_rng_tracker().fork():
            draws.append((default, torch.rand(3)))
    assert torch.equal(draws[0][0], draws[1][0]), "the default (data-parallel) stream must agree across TP ranks"
    assert not torch.equal(draws[0][1], draws[1][1]), "TP ranks must draw different model-parallel values"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only")
def test_inert_with_cuda():  # pragma: no cover - runs on the GPU machine
    assert cpu_compat.enable() is False
    assert not cpu_compat.is_enabled()
