#!/usr/bin/env bash
# Install the GPU stack of nemo-igrpo on top of an NGC PyTorch container. Used by containers/Dockerfile
# and, on clusters without Docker, inside a writable enroot container (containers/enroot.md).
#
# The combination (checked against the packages' published metadata on PyPI, 2026-11; no image was
# built or run here, see containers/enroot.md "What was checked"):
#   torch 2.13.0 (+cu130)     vLLM 0.33.0 pins torch==2.13.0 exactly; it is also the CPU lock's torch
#   vllm 0.33.0               needs transformers >=5.16.1,<5.20
#   transformers 5.17.0       the only minor inside both vLLM's range and megatron-bridge 0.6.2's (>=5.15,<5.18)
#   megatron-core 0.19.2      torch>=2.6; what requirements/cpu.txt tests
#   megatron-bridge 0.6.2     --no-deps: its metadata pulls hydra-core/antlr 4.9 (breaks math-verify),
#                             flashinfer 0.6.18 (vLLM wants 0.7.0.post1) and many unused packages
#   transformer-engine 2.20.2 core wheel for CUDA 13 + the torch extension built here against torch
#                             2.13 (the extension is source-only; the NGC build is for NGC's own torch)
#   mamba-ssm 2.3.1, causal-conv1d   Mamba-2 kernels for Nemotron-H (megatron-bridge's pin), built here
set -euo pipefail
: "${TORCH_VERSION:=2.13.0}" "${TORCHVISION_VERSION:=0.28.0}" "${VLLM_VERSION:=0.33.0}"
: "${TRANSFORMERS_VERSION:=5.17.0}" "${MCORE_VERSION:=0.19.2}" "${BRIDGE_VERSION:=0.6.2}"
: "${TE_VERSION:=2.20.2}" "${MAMBA_VERSION:=2.3.1}" "${CAUSAL_CONV1D_VERSION:=1.7.0}"
: "${CUDA_ARCHS:=80;90}"          # A100 and H100; add 100 for Blackwell
: "${MAX_JOBS:=16}"
REPO_DIR=${REPO_DIR:-/opt/nemo-igrpo}
PIP=(python -m pip install --no-cache-dir --progress-bar off)
export PIP_CONSTRAINT=""          # NGC pins its own torch/TE builds in /etc/pip/constraint.txt

# 1. Replace NGC's torch build (and everything compiled against it) with the torch vLLM is built for.
python -m pip uninstall -y torch torchvision torchaudio torch-tensorrt torchao apex flash-attn \
  transformer-engine transformer-engine-torch transformer-engine-cu12 transformer-engine-cu13 \
  nvidia-modelopt nvfuser lightning-thunder 2>/dev/null || true
"${PIP[@]}" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# 2. vLLM and the Hugging Face stack; vLLM itself without its audio/video pins (torchaudio 2.11,
#    torchcodec, PyNvVideoCodec: not needed for text generation, and torchaudio 2.11 does not match torch 2.13).
"${PIP[@]}" -r "${REPO_DIR}/containers/requirements-gpu.txt" "transformers==${TRANSFORMERS_VERSION}"
"${PIP[@]}" --no-deps "vllm==${VLLM_VERSION}"

# 3. TransformerEngine: core library wheel + the PyTorch extension compiled against this torch.
"${PIP[@]}" --no-deps "transformer_engine==${TE_VERSION}" "transformer_engine_cu13==${TE_VERSION}"
NVTE_FRAMEWORK=pytorch NVTE_CUDA_ARCHS="${CUDA_ARCHS}" MAX_JOBS="${MAX_JOBS}" NVTE_PYTORCH_FORCE_BUILD=TRUE \
  CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} \
  "${PIP[@]}" --no-build-isolation --no-deps "transformer_engine_torch==${TE_VERSION}"

# 4. Megatron: core, the HF bridge (--no-deps, see above), Mamba kernels for Nemotron-H.
"${PIP[@]}" --no-deps "megatron-core==${MCORE_VERSION}" "megatron-bridge==${BRIDGE_VERSION}"
TORCH_CUDA_ARCH_LIST="$(echo "${CUDA_ARCHS}" | sed 's/\([0-9]\)\([0-9]\)/\1.\2/g')" MAX_JOBS="${MAX_JOBS}" \
  CAUSAL_CONV1D_FORCE_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
  "${PIP[@]}" --no-build-isolation --no-deps "causal-conv1d==${CAUSAL_CONV1D_VERSION}" "mamba-ssm==${MAMBA_VERSION}"

# 5. This package (editable: /opt/nemo-igrpo is both the code and the configs the launchers point at).
"${PIP[@]}" --no-deps -e "${REPO_DIR}"

# What can be checked without a GPU driver; containers/check_image.sh checks the rest on a GPU node.
python - <<'PY'
import importlib.metadata as md
import torch, megatron.core, nemo_igrpo  # noqa: F401
want = {"torch": "2.13.0", "vllm": "0.33.0", "transformers": "5.17.0", "megatron-core": "0.19.2",
        "megatron-bridge": "0.6.2", "transformer_engine_torch": "2.20.2"}
for name, version in want.items():
    got = md.version(name)
    assert got.split("+")[0] == version, f"{name}: want {version}, got {got}"
print("[install_gpu_stack] versions:", {k: md.version(k) for k in want})
PY
