"""Collectives on the right device and with the configured timeout (GPU-path issue, items 3 and
6), checked on CPU with real processes: see scripts/collectives_check.py."""

from __future__ import annotations

import json
from pathlib import Path


from helpers import run_torchrun

SCRIPT = Path(__file__).parent / "scripts" / "collectives_check.py"


def _reports(tmp_path: Path, mode: str, timeout: float = 120) -> list[dict]:
    run_torchrun(2, SCRIPT, mode, tmp_path, timeout=timeout)
    return [json.loads((tmp_path / f"{mode}_rank{r}.json").read_text()) for r in (0, 1)]


def test_cuda_only_default_group(tmp_path):
    for rank, rep in enumerate(_reports(tmp_path, "cuda_only")):
        assert rep["default_group_devices"] == {"ok": True, "value": ["cuda"]}
        # The simulation is faithful: a CPU tensor on a CUDA-only group fails as on NCCL ...
        assert not rep["raw_cpu_all_reduce"]["ok"] and "device type cpu" in rep["raw_cpu_all_reduce"]["error"]
        # ... and a control-plane collective before the gloo group exists is refused clearly.
        assert not rep["before_control_group"]["ok"] and "init_control_group" in rep["before_control_group"]["error"]
        assert "cpu" in rep["control_group_devices"]["value"]
        # The trainer's flag and broadcast (a CPU all-reduce before the fix) work.
        assert rep["any_rank"] == {"ok": True, "value": True}, rep["any_rank"]
        assert rep["broadcast"] == {"ok": True, "value": {"from": 0, "batch": [0, 1, 2]}}, rep["broadcast"]
        assert rep["all_gather_objects"] == {"ok": True, "value": [{"rank": 0}, {"rank": 1}]}
        assert rep["barrier"]["ok"], rep["barrier"]


def test_timeout_reaches_both_groups(tmp_path):
    _, waiting = _reports(tmp_path, "timeout")
    # 3-second limit against a 20-second absence: the wait ends after 3 s with gloo's own timeout
    # error, the limit passed to init_process_group (on CPU the control group is the default
    # group; torch's default would wait 30 minutes).
    assert not waiting["control_broadcast"]["ok"], waiting
    assert "3000ms" in waiting["control_broadcast"]["error"], waiting
    assert 2.5 < waiting["control_wait_s"] < 15, waiting
    assert not waiting["default_all_reduce"]["ok"], waiting
