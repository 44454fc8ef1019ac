"""Every torch.distributed collective of this package goes through here.

Two rules, each the fix of a bug that only shows on GPUs:

1. A tensor handed to a collective lives on a device its group's backend supports. NCCL groups
   take CUDA tensors only: an all-reduce of a CPU tensor on the default group of a multi-GPU job
   raises ("No backend type associated with device type cpu"), while the same code passes on
   the CPU machines CI runs. `all_reduce` moves the tensor to `group_device(group)` and back.
2. Control-plane traffic (rank 0's rollout broadcast to the other ranks, stop flags, metric
   dictionaries, barriers around file operations) runs on a separate gloo group with the
   configured timeout (`policy.distributed_timeout_minutes`). Ranks 1..N wait there while rank 0
   generates or evaluates, which can take longer than NCCL's 10-minute watchdog; a gloo wait
   holds no GPU stream and no NCCL work item, and its timeout is ours to choose.

tests/unit/test_collectives.py checks both on CPU: a backend registered for CUDA devices only
stands in for NCCL, and no module outside this one may call a collective directly.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# The gloo group for control-plane collectives (None before init_control_group or when the
# default group already is gloo, in which case the default group serves).
_control_group: Optional[Any] = None
_control_ready = False

DEFAULT_TIMEOUT_MINUTES = 180.0


def ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if ready() else 1


def rank() -> int:
    return dist.get_rank() if ready() else 0


def timeout(minutes: float) -> datetime.timedelta:
    if not minutes > 0:
        raise ValueError(f"policy.distributed_timeout_minutes must be > 0, got {minutes}")
    return datetime.timedelta(minutes=minutes)


def group_devices(group=None) -> set[str]:
    """Device types the group's backend takes tensors on, e.g. {"cpu", "cuda"} for gloo,
    {"cuda"} for NCCL (from torch's backend config "cpu:gloo,cuda:gloo" / "cuda:nccl")."""
    config = dist.get_backend_config(group)
    return {part.split(":", 1)[0].strip() for part in config.split(",") if ":" in part}


def group_device(group=None) -> torch.device:
    """The device a tensor must be on for a collective on `group`: the CPU when the backend
    takes CPU tensors (gloo), else this process's current CUDA device (NCCL)."""
    devices = group_devices(group)
    if "cpu" in devices:
        return torch.device("cpu")
    if "cuda" in devices:
        return torch.device("cuda", torch.cuda.current_device())
    raise RuntimeError(
        f"process group backend {dist.get_backend_config(group)!r} supports neither CPU nor CUDA tensors"
    )


def init_control_group(minutes: float) -> None:
    """Create the gloo control group over all ranks (collective: every rank calls it once,
    right after init_process_group)."""
    global _control_group, _control_ready
    if not ready():
        raise RuntimeError("init_control_group() before torch.distributed is initialised")
    if "cpu" in group_devices(None) and dist.get_backend() == "gloo":
        _control_group = None  # the default group is gloo already (CPU runs): use it
    else:
        _control_group = dist.new_group(backend="gloo", timeout=timeout(minutes))
    _control_ready = True


def control_group():
    """The group for control-plane collectives (gloo). Falls back to the default group before
    init_control_group, which is correct only where the default group is gloo; say so."""
    if not _control_ready and ready() and "cpu" not in group_devices(None):
        raise RuntimeError("a control-plane collective ran before init_control_group() on a CUDA-only default group")
    return _control_group


def reset() -> None:
    """Forget the control group (after destroy_process_group; tests)."""
    global _control_group, _control_ready
    _control_group = None
    _control_ready = False


# ---------------------------------------------------------------------------------------------
# Tensor collectives (data plane): the tensor goes to its group's device.


def all_reduce(tensor: torch.Tensor, op=None, group=None) -> torch.Tensor:
    """In-place all-reduce of `tensor` on `group`, on the device that group requires (the
    tensor is copied there and back only when it is elsewhere). Returns `tensor`."""
    op = dist.ReduceOp.SUM if op is None else op
    device = group_device(group)
    if tensor.device == device:
        dist.all_reduce(tensor, op=op, group=group)
        return tensor
    moved = tensor.to(device)
    dist.all_reduce(moved, op=op, group=group)
    tensor.copy_(moved)
    return tensor


def broadcast(tensor: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """In-place broadcast from global rank `src` on `group`, on the device that group requires."""
    device = group_device(group)
    if tensor.device == device:
        dist.broadcast(tensor, src=src, group=group)
        return tensor
    moved = tensor.to(device)
    dist.broadcast(moved, src=src, group=group)
    tensor.copy_(moved)
    return tensor


# ---------------------------------------------------------------------------------------------
# Control plane (gloo, long timeout).


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`src`'s object on every rank (identity on a single process)."""
    if world_size() == 1:
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=control_group())
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any rank (e.g. a SIGTERM seen by one process)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=control_group())
    return bool(t.item())


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj, group=control_group())
    return out


def barrier() -> None:
    """Wait for every rank (over the control group: no GPU work is queued by it)."""
    if world_size() == 1:
        return
    dist.barrier(group=control_group())
