"""The Megatron generation backend draws samples with generators on the model's device
(GPU-path issue, item 5: CPU generators with CUDA probabilities made every T > 0 request fail).
This machine has no GPU, so the check is that the CUDA device reaches the generator's
constructor: torch then tries to initialise CUDA and says it cannot."""

from __future__ import annotations

import pytest
import torch

from nemo_igrpo.generation.interface import SamplingParams
from nemo_igrpo.generation.megatron_backend import MegatronGenerationBackend, sampling_generator


def _backend_on(device: torch.device) -> MegatronGenerationBackend:
    backend = MegatronGenerationBackend.__new__(MegatronGenerationBackend)  # the sampling state only
    backend.device = device
    backend._rng = torch.Generator().manual_seed(0)
    backend._mp_group = None  # a single process: no model-parallel group to agree with
    return backend


def test_generators_follow_the_model_device_on_cpu():
    gens = _backend_on(torch.device("cpu"))._generators(SamplingParams(seed=5), 3)
    assert [g.device.type for g in gens] == ["cpu"] * 3
    assert [g.initial_seed() for g in gens] == [5, 6, 7]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CUDA path on a machine without a GPU")
def test_generators_are_created_on_the_cuda_device():
    with pytest.raises(Exception, match="(?i)cuda|nvidia|driver"):
        sampling_generator(0, torch.device("cuda", 0))
    with pytest.raises(Exception, match="(?i)cuda|nvidia|driver"):
        _backend_on(torch.device("cuda", 0))._generators(SamplingParams(seed=1), 2)
    with pytest.raises(Exception, match="(?i)cuda|nvidia|driver"):  # unseeded requests too
        _backend_on(torch.device("cuda", 0))._generators(SamplingParams(seed=None), 2)
