"""Configuration of the generation backends (drafts, refinements, evaluation samples)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, get_args

# Enumerated settings: the loader (OmegaConf) rejects any other value with the key's full path,
# and code that needs the list reads it from here (get_args), never from a copy.
Backend = Literal["vllm", "vllm_server", "megatron", "trtllm_server"]
LogprobsMode = Literal["raw_logprobs", "processed_logprobs"]
WeightTransport = Literal["shm", "rpc"]
WeightSync = Literal["reload_from_dir", "nccl", "cuda_ipc", "none"]
# vLLM's online quantization schemes (bf16 weights in, quantized in the engine on every load).
Quantization = Literal["fp8_per_tensor", "fp8_per_channel", "fp8_per_block", "mxfp8"]
SleepLevel = Literal[1, 2]

BACKENDS: tuple[str, ...] = get_args(Backend)


@dataclass
class VLLMConfig:
    gpu_memory_utilization: float = 0.5
    # CPU build of vLLM: KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE).
    cpu_kvcache_space_gb: int = 1
    # CPU build of vLLM: which cores the worker's OpenMP threads are pinned to
    # (VLLM_CPU_OMP_THREADS_BIND). "auto": vLLM pins one thread per physical core and keeps one
    # core for its scheduler; "nobind": no pinning, torch's default thread count (use this when
    # the trainer shares the cores); or an explicit list such as "0-3".
    cpu_omp_threads_bind: str = "auto"
    # CPU build of vLLM: cores kept free of OpenMP threads (VLLM_CPU_NUM_OF_RESERVED_CPU);
    # None: vLLM's default (one per worker).
    cpu_reserved_cpus: Optional[int] = None
    enable_prefix_caching: bool = True  # the G refinements share the prompt + draft prefix
    enable_sleep_mode: bool = False  # release generator memory during training (GPU only)
    # Sleep level used by `sleep()`: 1 offloads weights to host memory, 2 discards them (the
    # trainer pushes fresh weights after every step anyway, so 2 saves the host copy).
    sleep_level: SleepLevel = 2
    enforce_eager: bool = True
    max_model_len: Optional[int] = None
    tensor_parallel_size: int = 1
    dtype: str = "auto"  # "auto" takes the checkpoint's dtype; "bfloat16"/"float32" force one
    max_num_seqs: Optional[int] = None  # None: vLLM's default
    # FP8 generation: vLLM quantizes the weights it receives, layer by layer, at start-up and on
    # every weight sync (its online quantization runs inside the layerwise reload the sync
    # uses), so the trainer streams its usual bf16 weights. None: generate in `dtype`.
    # fp8_per_tensor | fp8_per_channel | fp8_per_block (128x128 weight blocks, DeepSeek-style)
    # | mxfp8 (Blackwell). Needs FP8 kernels: Hopper/Blackwell GPUs, or AMX-FP8 CPUs.
    # FP8 log-probs differ from the bf16 trainer's: watch generation/logprob_mismatch and set
    # algorithm.tis_cap (truncated importance sampling) to correct for it.
    quantization: Optional[Quantization] = None
    # How a weight-sync bucket reaches the engine's workers (same host): "shm" writes it as a
    # safetensors file in /dev/shm and sends the path (the workers memory-map it); "rpc" sends
    # the bytes inside vLLM's RPC message. "shm" falls back to "rpc" when /dev/shm is missing or
    # too small for a bucket (containers default to 64 MB: run them with --ipc=host or a larger
    # --shm-size).
    weight_transport: WeightTransport = "shm"


@dataclass
class ServerConfig:
    """A generation server speaking the OpenAI-compatible API (vllm serve, trtllm-serve)."""

    url: str = "http://127.0.0.1:8000"
    model_name: Optional[str] = None  # checked against the server's /v1/models
    api_key_env: Optional[str] = None  # name of an environment variable; never the key itself
    timeout_s: float = 300.0
    max_retries: int = 5
    backoff_s: float = 1.0
    max_concurrent_requests: int = 64
    # How trainer weights reach the server after each step: "reload_from_dir" (a safetensors
    # directory the server can read; works on CPU), "nccl" (GPU broadcast), "cuda_ipc"
    # (trtllm-serve on the same node), or "none".
    weight_sync: WeightSync = "reload_from_dir"
    # Where "reload_from_dir" writes the safetensors shards; the server must be able to read it
    # (same machine or a shared file system). None: a temporary directory on this machine.
    weight_sync_dir: Optional[str] = None
    # "nccl" only: the rendezvous address/port the trainer's rank 0 opens for the vLLM workers.
    nccl_master_address: str = "127.0.0.1"
    nccl_master_port: int = 29650
    # Seconds to wait for a TCP connection (separate from timeout_s, the whole-request limit),
    # so a dead host fails fast instead of after a generation-sized timeout.
    connect_timeout_s: float = 10.0
    # trtllm-serve only: name of the environment variable holding the key that signs its RL
    # control requests (/update_weights, /release_memory, /resume_memory).
    trtllm_rl_control_key_env: Optional[str] = None


@dataclass
class GenerationConfig:
    backend: Backend = "vllm"
    # Colocated backends (vllm, megatron) under torchrun: every generation group (a rank with its
    # own vLLM engine; a model-parallel replica for megatron) generates its share of every call,
    # so all GPUs generate. false: global rank 0 generates everything while the others wait.
    data_parallel: bool = True
    temperature: float = 0.7  # paper's training temperature
    top_p: float = 1.0
    max_new_tokens: int = 256
    max_prompt_tokens: int = 1024
    stop_strings: list[str] = field(default_factory=list)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    weight_sync_bucket_mb: int = 512
    # What the generator reports as the log-prob of a sampled token. "raw_logprobs": log-softmax
    # of the model's raw logits (temperature 1, before top-p), which is exactly what the trainer
    # recomputes for the importance ratio. "processed_logprobs" would report the
    # temperature-scaled, top-p-truncated distribution the token was drawn from; the trainer
    # would then have to apply the same temperature and truncation to its logits.
    logprobs_mode: LogprobsMode = "raw_logprobs"
    # Mean exp(|logp_train - logp_gen|) above this logs a warning (NeMo-RL uses 1.05).
    logprob_mismatch_warn: float = 1.05
