"""Methods mixed into every vLLM worker (vLLM's `worker_extension_cls`) for bucketed weight sync.

Why an extension class and not pickled functions passed to `collective_rpc`: the extension is
imported by name inside the worker, so the engine needs no VLLM_ALLOW_INSECURE_SERIALIZATION
(which would let pickle through every RPC), and the trainer only ships bytes.

One update is one vLLM "layerwise reload" session, the lifecycle vLLM's own weight-transfer
engines use (`initialize_layerwise_reload` ... `model.load_weights` ... `finalize_layerwise_reload`):

1. begin: every layer's parameters are swapped for placeholders whose weight loaders buffer what
   arrives,
2. one RPC per bucket: `model.load_weights(bucket)`. A layer is re-processed (e.g. the CPU GEMM
   repacking of its weights) as soon as all of its tensors have arrived, so a bucket boundary may
   fall anywhere, even between q_proj and k_proj of one attention layer,
3. finish: layers that received nothing keep their old weights (reported back to the trainer).

Calling `model.load_weights` outside such a session is wrong on CPU: vLLM repacks linear weights
after loading and drops the original tensor, so new values would land in a tensor the kernels no
longer read.

A bucket travels as a safetensors file in /dev/shm whose path is the RPC argument (the default,
`generation.vllm.weight_transport: shm`), or as safetensors bytes inside the RPC message
(`rpc`): msgpack (vLLM's RPC encoding) turns tensors nested in arguments into plain lists,
while bytes pass through untouched. Measured on CPU (bench/RESULTS.md, section 3), the bytes
path moved ~60 MB/s for a 135M model; a memory file is written and mapped at memory speed.
"""

from __future__ import annotations

# The dotted name vLLM resolves inside the worker process.
WORKER_EXTENSION_QUALNAME = "nemo_igrpo.generation.vllm_worker_extension.WeightSyncWorkerExtension"


class WeightSyncWorkerExtension:
    """`self` is the vLLM worker (this class becomes one of its bases)."""

    def nemo_igrpo_begin_weight_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.get_model())
        self._nemo_igrpo_loaded = set()

    def nemo_igrpo_load_bucket(self, payload: bytes) -> int:
        from safetensors.torch import load as load_safetensors

        return self._nemo_igrpo_load(load_safetensors(payload))

    def nemo_igrpo_load_bucket_file(self, path: str) -> int:
        """The same, from a safetensors file the trainer wrote on this host (memory-mapped)."""
        from safetensors.torch import load_file

        return self._nemo_igrpo_load(load_file(path))

    def _nemo_igrpo_load(self, tensors: dict) -> int:
        from vllm.config import set_current_vllm_config

        device = self.model_runner.device
        pairs = [(name, tensor.to(device)) for name, tensor in tensors.items()]
        with set_current_vllm_config(self.vllm_config):
            loaded = self.model_runner.get_model().load_weights(pairs)
        if loaded:
            self._nemo_igrpo_loaded.update(loaded)
        return len(pairs)

    def nemo_igrpo_finish_weight_update(self) -> list[str]:
        """Close the session; return the engine parameters that received no new value."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        runner = self.model_runner
        model = runner.get_model()
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(model, self.vllm_config.model_config)
        # Same invalidation vLLM's own reload_weights does after loading.
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            if hasattr(runner, reset):
                getattr(runner, reset)()
        expected = {name for name, _ in model.named_parameters()}
        loaded = getattr(self, "_nemo_igrpo_loaded", set())
        self._nemo_igrpo_loaded = set()
        return sorted(expected - loaded)
