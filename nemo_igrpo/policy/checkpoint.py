"""Distributed checkpoints of the MegatronActor: model, optimizer, LR scheduler, RNG and the
trainer's own state (data order, counters), as one megatron dist-checkpoint directory.

Written to `<dir>.tmp` and renamed once every rank has finished, so a crash mid-save never
leaves a half-written checkpoint where resume would find it. The optimizer state is saved per
model parameter ('fully_reshardable'), so a checkpoint loads under another TP/PP/DP layout; RNG
states are per rank and restored only under the same layout.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nemo_igrpo.policy import cpu_compat
from nemo_igrpo.policy.model import unwrap
from nemo_igrpo.utils import collectives

CHECKPOINT_FORMAT = "nemo_igrpo.megatron_actor.v1"


def sharded_state(actor, loading: bool, include_rng: bool) -> dict:
    model_sd = {}
    for i, chunk in enumerate(actor.model_chunks):
        key = "model" if len(actor.model_chunks) == 1 else f"model{i}"
        # The bare GPTModel: wrappers (DDP, Float16Module) would add a "module." prefix
        # that their load_state_dict does not expect; the parameters are the same objects.
        model_sd[key] = unwrap(chunk).sharded_state_dict()
    state: dict[str, Any] = dict(model_sd)
    flat_model = {}
    for v in model_sd.values():
        flat_model.update(v)
    # 'fully_reshardable': the distributed optimizer saves its state per model parameter
    # (like the plain optimizer does), so a checkpoint loads under another TP/PP/DP layout;
    # megatron's default for it ('fully_sharded_model_space') does not load in 0.19.
    state["optimizer"] = actor.optimizer.sharded_state_dict(
        flat_model, is_loading=loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"}
    )
    if include_rng:
        state["rng_state"] = rng_sharded_object(actor.layout)
    return state


def rng_sharded_object(layout):
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    rng = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    L = layout
    return ShardedObject(
        "rng_state", rng, (L.pp_size, L.tp_size, L.dp_size), (L.pp_rank, L.tp_rank, L.dp_rank), replica_id=0
    )


def layout_key(layout) -> list[int]:
    return [layout.pp_size, layout.tp_size, layout.dp_size]


def save(actor, ckpt_dir: str, extra_state: dict) -> None:
    """dist-checkpoint of model, optimizer, LR scheduler, RNG and `extra_state`; written to
    `<ckpt_dir>.tmp` and renamed once every rank has finished (never half visible)."""
    from megatron.core import dist_checkpointing

    out = Path(ckpt_dir)
    tmp = out.with_name(out.name + ".tmp")
    if actor.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    collectives.barrier()
    state = sharded_state(actor, loading=False, include_rng=True)
    state["scheduler"] = actor.scheduler.state_dict()
    state["extra_state"] = extra_state
    state["meta"] = {
        "format": CHECKPOINT_FORMAT,
        "layout": layout_key(actor.layout),
        "hf_path": actor.hf_path,
        "distributed_optimizer": actor.cfg.use_distributed_optimizer,
    }
    with cpu_compat.cuda_to_cpu():
        dist_checkpointing.save(state, str(tmp))
    collectives.barrier()
    if actor.is_main:
        replace_dir(tmp, out)
    collectives.barrier()


def load(actor, ckpt_dir: str) -> dict:
    """Restore a save_checkpoint() directory (any TP/PP/DP layout). RNG states are restored
    only when the layout is the same (they are per rank). Returns extra_state."""
    from megatron.core import dist_checkpointing

    path = Path(ckpt_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {ckpt_dir} does not exist")
    with cpu_compat.cuda_to_cpu():
        common = dist_checkpointing.load_common_state_dict(str(path))
    meta = common.get("meta", {})
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{ckpt_dir}: not a nemo_igrpo actor checkpoint (format {meta.get('format')!r})")
    if bool(meta.get("distributed_optimizer")) != actor.cfg.use_distributed_optimizer:
        # megatron-core stores the two optimizers' states differently (the distributed one
        # adds fp32 main params); a checkpoint resumes only with the same optimizer kind.
        raise ValueError(
            f"{ckpt_dir} was saved with policy.use_distributed_optimizer={bool(meta.get('distributed_optimizer'))}; "
            f"resume with the same setting (now {actor.cfg.use_distributed_optimizer})"
        )
    same_layout = list(meta.get("layout", [])) == layout_key(actor.layout)
    state = sharded_state(actor, loading=True, include_rng=same_layout)
    with cpu_compat.cuda_to_cpu():
        loaded = dist_checkpointing.load(state, str(path))
        for i, chunk in enumerate(actor.model_chunks):
            key = "model" if len(actor.model_chunks) == 1 else f"model{i}"
            unwrap(chunk).load_state_dict(loaded[key], strict=True)
        actor.optimizer.load_state_dict(loaded["optimizer"])
    # megatron's scheduler *adds* the saved step count to its own: start from zero.
    actor.scheduler.num_steps = 0
    actor.scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        restore_rng(loaded["rng_state"])
    return loaded["extra_state"]


def restore_rng(rng: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    get_cuda_rng_tracker().set_states(rng["tracker"])


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a completed `tmp` directory to `out`, replacing an older `out`."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
