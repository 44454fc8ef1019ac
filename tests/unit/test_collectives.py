"""No module calls a torch.distributed collective except utils/collectives.py, which puts each
tensor on its group's device and control-plane traffic on the gloo group (GPU-path issue, item 3:
a CPU all-reduce on the NCCL default group ended every multi-GPU run at step 1). The behaviour is
checked with real processes in tests/distributed/test_collectives.py; this keeps the rule."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

PACKAGE = Path(__file__).resolve().parents[2] / "nemo_igrpo"
HELPER = PACKAGE / "utils" / "collectives.py"
COLLECTIVES = {
    "all_reduce",
    "broadcast",
    "broadcast_object_list",
    "all_gather",
    "all_gather_object",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "barrier",
    "reduce",
    "gather",
    "scatter",
    "send",
    "recv",
    "isend",
    "irecv",
    "all_to_all",
    "all_to_all_single",
    "gather_object",
    "scatter_object_list",
    "monitored_barrier",
}


def _distributed_aliases(tree: ast.AST) -> set[str]:
    """Names under which a module refers to torch.distributed ("dist", "torch.distributed")."""
    names = {"torch.distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch.distributed" and a.asname:
                    names.add(a.asname)
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            for a in node.names:
                if a.name == "distributed":
                    names.add(a.asname or "distributed")
    return names


def _raw_collectives(path: Path, root: Path = PACKAGE.parent) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases = _distributed_aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            if ast.unparse(node.func.value) in aliases:
                found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node.func)}")
    return found


def test_no_raw_collectives_outside_the_helper():
    offenders = [hit for p in sorted(PACKAGE.rglob("*.py")) if p != HELPER for hit in _raw_collectives(p)]
    assert offenders == [], "use nemo_igrpo.utils.collectives instead:\n" + "\n".join(offenders)


def test_the_scan_finds_a_raw_collective(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import torch\nimport torch.distributed as dist\nt = torch.ones(1)\ndist.all_reduce(t)\n"
        "torch.distributed.barrier()\n"
    )
    assert len(_raw_collectives(bad, tmp_path)) == 2


def test_group_device_follows_the_backend():
    from nemo_igrpo.utils import collectives

    import torch.distributed as dist

    if dist.is_initialized():  # another test of this process set one up: use it as is
        assert collectives.group_device(None) == torch.device("cpu")
        return
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        assert collectives.group_devices(None) == {"cpu", "cuda"}  # gloo takes both
        assert collectives.group_device(None) == torch.device("cpu")
        t = torch.tensor([2.0])
        assert collectives.all_reduce(t) is t and t.item() == 2.0
    finally:
        dist.destroy_process_group()
        collectives.reset()
