"""Run under torchrun (2 CPU processes). Usage: collectives_check.py MODE REPORT_DIR

MODE "cuda_only": the default group is a backend registered for CUDA devices only (gloo inside),
standing in for NCCL: a raw all-reduce of a CPU tensor must raise exactly as on a multi-GPU job,
and the trainer's control-plane collectives must still work (they run on the gloo control group).
MODE "timeout": policy.distributed_timeout_minutes reaches init_process_group and the control
group: with a 3-second limit, rank 1 gives up waiting for a late rank 0 in about that time.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

MODE, OUT = sys.argv[1], Path(sys.argv[2])
rank = int(os.environ["RANK"])
report: dict = {}


def record(name, fn):
    try:
        report[name] = {"ok": True, "value": fn()}
    except Exception as e:  # noqa: BLE001 - the report says what failed
        report[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}


if MODE == "cuda_only":
    from torch.distributed import ProcessGroupGloo

    def cuda_only(store, rank, size, timeout):
        return ProcessGroupGloo(store, rank, size, timeout)

    dist.Backend.register_backend("cudaonly", cuda_only, devices=["cuda"])
    dist.init_process_group("cudaonly")
    from nemo_igrpo.algorithms import trainer
    from nemo_igrpo.utils import collectives

    record("default_group_devices", lambda: sorted(collectives.group_devices(None)))
    record("raw_cpu_all_reduce", lambda: dist.all_reduce(torch.ones(1)))
    record("before_control_group", lambda: collectives.any_rank(False))
    collectives.init_control_group(5.0)
    record("control_group_devices", lambda: sorted(collectives.group_devices(collectives.control_group())))
    record("any_rank", lambda: trainer._all_ranks_agree(rank == 1))
    record("broadcast", lambda: trainer._broadcast({"from": rank, "batch": list(range(3))}))
    record("all_gather_objects", lambda: collectives.all_gather_objects({"rank": rank}))
    record("barrier", lambda: collectives.barrier())
elif MODE == "timeout":
    from nemo_igrpo.policy.distributed import init_process_group
    from nemo_igrpo.utils import collectives

    init_process_group(timeout_minutes=0.05)  # 3 s
    if rank == 0:
        time.sleep(20)  # "generating": longer than the limit
        report["slept"] = True
    else:
        t0 = time.time()
        record("control_broadcast", lambda: collectives.broadcast_object("x"))
        report["control_wait_s"] = round(time.time() - t0, 2)
        record("default_all_reduce", lambda: dist.all_reduce(torch.ones(1)))
(OUT / f"{MODE}_rank{rank}.json").write_text(json.dumps(report, default=str))
# A timed-out gloo group cannot be torn down politely; the report is written, so leave now.
os._exit(0)
