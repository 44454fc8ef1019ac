"""torch.distributed and megatron-core parallel state for the actor.

Under torchrun the process group comes from the environment (RANK, WORLD_SIZE, MASTER_*); a
plain `python` process gets a world of one on a free local port, so tests, notebooks and
`igrpo convert` need no launcher. gloo on CPU, nccl on GPU.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nemo_igrpo.utils import collectives


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    rank: int
    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_last_pp_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(timeout_minutes: float = collectives.DEFAULT_TIMEOUT_MINUTES) -> None:
    """Initialise torch.distributed once (no-op when already done), then the gloo control group.

    `timeout_minutes` (policy.distributed_timeout_minutes) bounds every collective wait, on
    the default group (NCCL's watchdog: torch's default is 10 minutes) and on the control
    group where ranks 1..N wait while rank 0 generates and evaluates."""
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl" if use_cuda else "gloo"
        limit = collectives.timeout(timeout_minutes)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=limit)
        else:
            # A single process without torchrun: always a fresh port. An inherited MASTER_PORT
            # (say, from a parent that runs its own process group) would already be taken.
            port = _free_port()
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ["MASTER_PORT"] = str(port)
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=limit)
    if not collectives._control_ready:
        collectives.init_control_group(timeout_minutes)


def init_parallel_state(
    tp: int, pp: int, seed: int, timeout_minutes: float = collectives.DEFAULT_TIMEOUT_MINUTES
) -> ParallelLayout:
    """Set up megatron's TP/PP/DP groups (re-creating them if a previous actor in this process
    used another layout) and its model-parallel RNG streams."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from nemo_igrpo.policy import cpu_compat

    cpu_compat.enable()
    init_process_group(timeout_minutes)
    world = dist.get_world_size()
    if tp < 1 or pp < 1 or world % (tp * pp) != 0:
        raise ValueError(
            f"policy.tensor_parallel_size={tp} x policy.pipeline_parallel_size={pp} must divide the world size {world}"
        )
    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()) != (tp, pp):
            ps.destroy_model_parallel()
    if not ps.model_parallel_is_initialized():
        with cpu_compat.cuda_to_cpu():
            ps.initialize_model_parallel(
                tensor_model_parallel_size=tp,
                pipeline_model_parallel_size=pp,
                distributed_timeout_minutes=int(math.ceil(timeout_minutes)),
            )
    # Same seed on every rank: megatron derives the TP-rank-specific and DP streams from it.
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return ParallelLayout(
        world_size=world,
        rank=dist.get_rank(),
        tp_size=tp,
        pp_size=pp,
        dp_size=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )
