#!/usr/bin/env bash
# One Slurm task per node runs this inside the container; it becomes either a trainer node (torchrun)
# or the vLLM server node, then `exec`s so Slurm's signals (SIGTERM on pre-emption or before the
# time limit) reach torchrun / vllm directly.
#
#   node_entry.sh auto  ARGS...   role from SLURM_NODEID: the first IGRPO_TRAIN_NODES nodes train
#   node_entry.sh train ARGS...   (heterogeneous jobs name the role of each component)
#   node_entry.sh generate
# ARGS are `python -m nemo_igrpo` arguments: train CONFIG [overrides].
#
# Read from the environment (set by the generated sbatch script):
#   IGRPO_TRAIN_NODES, IGRPO_GPUS_PER_NODE, IGRPO_RDZV_PORT, IGRPO_TRAIN_MASTER (first training host)
#   IGRPO_VLLM_HOST, IGRPO_VLLM_PORT, IGRPO_VLLM_ARGS   (only with a generation node)
#   IGRPO_SERVER_WAIT_S   how long trainers wait for the server to load (default 1800 s)
set -euo pipefail
role=${1:?usage: node_entry.sh auto|train|generate [nemo_igrpo args...]}
shift
node_id=${SLURM_NODEID:-0}
if [ "$role" = auto ]; then
  if [ "$node_id" -ge "${IGRPO_TRAIN_NODES:?}" ]; then role=generate; else role=train; fi
fi

case "$role" in
generate)
  echo "[node_entry] $(hostname): vLLM server on port ${IGRPO_VLLM_PORT}"
  # IGRPO_VLLM_ARGS is shell-quoted by the launcher (shlex.join).
  eval "exec vllm serve ${IGRPO_VLLM_ARGS:?}"
  ;;
train)
  extra=()
  if [ -n "${IGRPO_VLLM_HOST:-}" ]; then
    url="http://${IGRPO_VLLM_HOST}:${IGRPO_VLLM_PORT}"
    extra+=("generation.server.url=${url}")
    deadline=$(( $(date +%s) + ${IGRPO_SERVER_WAIT_S:-1800} ))
    # Loading a 14B checkpoint and capturing CUDA graphs takes minutes; do not start training
    # (and its NCCL timeouts) before the server answers.
    until python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" "${url}/health" 2>/dev/null; do
      if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "[node_entry] vLLM server at ${url} not healthy after ${IGRPO_SERVER_WAIT_S:-1800} s" >&2
        exit 1
      fi
      sleep 10
    done
    echo "[node_entry] vLLM server at ${url} is up"
  fi
  # With the repository snapshot mounted (nemo-run's git packager), its code wins over the image's.
  export PYTHONPATH="${PWD}${PYTHONPATH:+:${PYTHONPATH}}"
  # Static rendezvous: global rank = node rank x GPUs + local rank, so rank 0 (the one that pushes
  # weights and, for generation.server.weight_sync=nccl, binds the NCCL rendezvous at
  # IGRPO_TRAIN_MASTER) is on the first training node. c10d ignores --node-rank and orders nodes
  # by hostname, which need not put rank 0 there (node10 sorts before node9).
  exec torchrun \
    --nnodes "${IGRPO_TRAIN_NODES:?}" --nproc-per-node "${IGRPO_GPUS_PER_NODE:?}" --node-rank "${node_id}" \
    --rdzv-backend static --rdzv-endpoint "${IGRPO_TRAIN_MASTER:?}:${IGRPO_RDZV_PORT:-29500}" \
    -m nemo_igrpo "$@" "${extra[@]}"
  ;;
*)
  echo "node_entry.sh: unknown role '$role' (auto, train or generate)" >&2
  exit 2
  ;;
esac
