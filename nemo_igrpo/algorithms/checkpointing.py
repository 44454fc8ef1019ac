"""Finding and pruning a run's checkpoints.

A checkpoint is `checkpoints/step_<N>/`. The actor writes it under a temporary name and renames
it only when every file is on disk (see MegatronActor.save_checkpoint), so any directory that
matches `step_<N>` exactly is complete; a kill mid-save leaves only a `.tmp` sibling, which
resume ignores and the next save removes.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Optional

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def prune_checkpoints(root: Path, keep_last_k: int) -> list[Path]:
    """Delete all but the newest `keep_last_k` complete checkpoints, and stale temp dirs."""
    removed = []
    found = complete_checkpoints(root)
    if keep_last_k > 0:
        for _, p in found[:-keep_last_k]:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    for p in Path(root).glob("step_*"):
        if p.is_dir() and not _STEP_DIR.match(p.name):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed
