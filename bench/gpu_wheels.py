"""The wheel folder that travels to the GPU test machine: its manifest, splitting into parts,
packing parts into carries, checking what arrived and joining parts back into files.

Standard library only: bench/gpu_check.py imports this with the GPU machine's own python before
any package is installed, and the unit tests use it on small files.

Layout of the folder (default .gpu-wheels/, git-ignored):
    gNN/<file>                one whole file (<= PART_SIZE), or
    gNN/<file>.partKK         one piece of a larger file (`split -b 58M` sizes)
    joined/<file>             a split file put back together on the GPU machine
Each gNN folder holds at most GROUP_LIMIT bytes, so it is one carry (one transfer) to the GPU
machine. The manifest records name, version, size and sha256 of every whole file and of every
part, and which group holds each part.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO / ".gpu-wheels"
DEFAULT_MANIFEST = REPO / "bench" / "gpu_wheels_manifest.json"
# `split -b 58M`: 58 MiB pieces (60.8 MB), under the 64 MiB a single carry may hold.
PART_SIZE = 58 * 2**20
# What one carry may bring: the transfer limit is 64 MiB per call for all carried paths; keep
# 4 MiB of room so a carry can also bring a small file (a changed manifest, a log).
GROUP_LIMIT = 60 * 2**20


class WheelFolderError(RuntimeError):
    """The folder does not match the manifest; the message names each missing or bad piece and
    the carry that brings it."""


@dataclass
class FileEntry:
    file: str  # file name (wheel or sdist)
    name: str  # normalised project name
    version: str
    install: str  # resolve | nodeps | build
    source: Optional[Path] = None  # where the whole file lies (prepare time only)


def sha256_file(path: Path, chunk: int = 8 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def split_file(src: Path, dest_dir: Path, part_size: int = PART_SIZE) -> list[Path]:
    """Cut `src` into dest_dir/<name>.part00, .part01, ... of part_size bytes (the last shorter),
    like `split -b`. Returns the part paths in order."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    with open(src, "rb") as f:
        i = 0
        while True:
            b = f.read(part_size)
            if not b:
                break
            p = dest_dir / f"{src.name}.part{i:02d}"
            p.write_bytes(b)
            parts.append(p)
            i += 1
    return parts


def pack_groups(items: list[tuple[str, int]], limit: int = GROUP_LIMIT) -> list[list[str]]:
    """First-fit decreasing: put (key, size) items into as few groups of <= limit bytes as it
    finds. Deterministic (ties broken by key) so the same files give the same carries."""
    groups: list[tuple[int, list[str]]] = []
    for key, size in sorted(items, key=lambda kv: (-kv[1], kv[0])):
        if size > limit:
            raise ValueError(f"{key}: {size} bytes is more than one carry ({limit}); split it first")
        for gi, (used, keys) in enumerate(groups):
            if used + size <= limit:
                groups[gi] = (used + size, keys + [key])
                break
        else:
            groups.append((size, [key]))
    return [keys for _, keys in groups]


def build_folder(
    entries: list[FileEntry], out: Path, part_size: int = PART_SIZE, group_limit: int = GROUP_LIMIT
) -> dict:
    """Write the folder (groups of whole files and parts) from entries whose `source` is set and
    return the manifest."""
    staging = out / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    files = []
    pieces: list[tuple[str, int]] = []  # (staging name, size)
    for e in entries:
        assert e.source is not None
        size = e.source.stat().st_size
        if size > part_size:
            parts = split_file(e.source, staging, part_size)
        else:
            parts = [staging / e.file]
            shutil.copyfile(e.source, parts[0])
        files.append(
            {
                "file": e.file,
                "name": e.name,
                "version": e.version,
                "install": e.install,
                "size": size,
                "sha256": sha256_file(e.source),
                "parts": [{"name": p.name, "size": p.stat().st_size, "sha256": sha256_file(p)} for p in parts],
            }
        )
        pieces += [(p.name, p.stat().st_size) for p in parts]
    groups = pack_groups(pieces, group_limit)
    where = {}
    for gi, keys in enumerate(groups, start=1):
        for k in keys:
            where[k] = f"g{gi:02d}"
    for old in out.glob("g[0-9][0-9]"):
        shutil.rmtree(old)
    for f in files:
        for part in f["parts"]:
            part["path"] = f"{where[part['name']]}/{part['name']}"
            dst = out / part["path"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            (staging / part["name"]).rename(dst)
            del part["name"]
    shutil.rmtree(staging)
    manifest = {
        "format": 1,
        "part_size": part_size,
        "group_limit": group_limit,
        "files": files,
        "groups": [
            {
                "name": f"g{gi:02d}",
                "size": sum(dict(pieces)[k] for k in keys),
                "paths": sorted(f"g{gi:02d}/{k}" for k in keys),
            }
            for gi, keys in enumerate(groups, start=1)
        ],
    }
    return manifest


def load_manifest(path: Path = DEFAULT_MANIFEST) -> dict:
    return json.loads(Path(path).read_text())


def carry_of(manifest: dict, part_path: str, folder_rel: str = ".gpu-wheels") -> str:
    """'carry 3 of 8 (carry=[".gpu-wheels/g03"])' for a part path like 'g03/x.whl.part01'."""
    group = part_path.split("/", 1)[0]
    names = [g["name"] for g in manifest["groups"]]
    i = names.index(group) + 1 if group in names else 0
    return f'carry {i} of {len(names)} (carry=["{folder_rel}/{group}"])'


def check_folder(manifest: dict, folder: Path, folder_rel: str = ".gpu-wheels", hashes: bool = True) -> list[str]:
    """Return one message per missing or corrupt part (empty: all there). A part that is present
    with the right size is hashed only when `hashes` (the plan checks presence; the real run
    checks content too)."""
    problems = []
    for f in manifest["files"]:
        for part in f["parts"]:
            p = folder / part["path"]
            if not p.is_file():
                problems.append(
                    f"missing {folder_rel}/{part['path']} (part of {f['file']}): {carry_of(manifest, part['path'], folder_rel)} brings it"
                )
            elif p.stat().st_size != part["size"]:
                problems.append(
                    f"wrong size {folder_rel}/{part['path']}: {p.stat().st_size} bytes, manifest says "
                    f"{part['size']}; redo {carry_of(manifest, part['path'], folder_rel)}"
                )
            elif hashes and sha256_file(p) != part["sha256"]:
                problems.append(
                    f"corrupt {folder_rel}/{part['path']}: sha256 differs from the manifest; redo "
                    f"{carry_of(manifest, part['path'], folder_rel)}"
                )
    return problems


def join_files(manifest: dict, folder: Path) -> dict[str, Path]:
    """Put split files back together under folder/joined/ (once: a joined file whose sha256
    matches is kept) and return file name -> path of every whole file. Raises WheelFolderError
    if a part is missing or a joined file's sha256 differs from the manifest."""
    problems = check_folder(manifest, folder)
    if problems:
        raise WheelFolderError("wheel folder incomplete:\n  " + "\n  ".join(problems))
    out = {}
    joined_dir = folder / "joined"
    for f in manifest["files"]:
        if len(f["parts"]) == 1 and f["parts"][0]["path"].endswith("/" + f["file"]):
            out[f["file"]] = folder / f["parts"][0]["path"]  # whole file, verified by its part hash
            continue
        dst = joined_dir / f["file"]
        if dst.is_file() and dst.stat().st_size == f["size"] and sha256_file(dst) == f["sha256"]:
            out[f["file"]] = dst
            continue
        joined_dir.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".tmp")
        with open(tmp, "wb") as w:  # `cat part00 part01 ... > file`
            for part in f["parts"]:
                with open(folder / part["path"], "rb") as r:
                    shutil.copyfileobj(r, w, 8 * 2**20)
        got = sha256_file(tmp)
        if got != f["sha256"]:
            tmp.unlink()
            raise WheelFolderError(
                f"{f['file']}: joined sha256 {got[:12]}... differs from the manifest's "
                f"{f['sha256'][:12]}...; its parts: {[p['path'] for p in f['parts']]}"
            )
        tmp.rename(dst)
        out[f["file"]] = dst
    return out
