"""Generation through a separate OpenAI-compatible server process (`vllm serve`), over HTTP.

The server runs on its own host (or venv/container); the trainer sends token-id prompts to
/v1/completions and pushes new weights after each optimizer step.

Requests: one POST per prompt (`n` samples each, so vLLM's parallel sampling shares the prompt's
prefill), at most `generation.server.max_concurrent_requests` in flight, results returned in
prompt order. `open_stream()` posts prompts one at a time as a caller submits them (same pool,
same bound) and hands each answer back when it arrives: the rollout uses it to post a prompt's
refinements while other prompts' drafts are still decoding. Token ids come back in `choices[i].token_ids` (vLLM: `return_token_ids`); a
server without that field is handled by reading the ids from the log-prob entries
(`return_tokens_as_token_ids` gives "token_id:N") or, last, by mapping token strings through
the tokenizer. Each sampled token's log-prob comes from `logprobs.token_logprobs`.

Failures: connection errors, timeouts, HTTP 429 and 5xx are retried with exponential backoff
(`backoff_s * 2**attempt`, `max_retries` times); anything else, or running out of retries,
raises GenerationServerError naming the URL. A failed call changes no trainer state, so the
trainer can save a checkpoint and stop (or retry) without losing the run. At start the backend
reads /v1/models and refuses a server that serves another model than
`generation.server.model_name`.

Weight sync after each step (`generation.server.weight_sync`):
- "reload_from_dir" (CPU and GPU; what the tests run): the exported tensors are streamed,
  bucket by bucket, into safetensors shards in a fresh version directory under
  `server.weight_sync_dir`, then the server reloads them in place with
  POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": <dir>}}
  (the worker's layerwise in-place reload, same as the colocated backend) and
  POST /reset_prefix_cache. Both endpoints exist only with VLLM_SERVER_DEV_MODE=1 on the server.
  The directory must be readable by the server (same host or a shared file system).
- "nccl" (GPU only, NOT run in this repository's tests): vLLM's weight-transfer API
  (server started with `--weight-transfer-config '{"backend": "nccl"}'` and
  VLLM_SERVER_DEV_MODE=1). The trainer's rank 0 joins an NCCL group with the server's workers
  (/init_weight_transfer_engine), then per update: /start_weight_update, per bucket
  /update_weights with the bucket's names/dtypes/shapes while broadcasting its tensors,
  /finish_weight_update, /reset_prefix_cache.
- "none": weights are not pushed (evaluation against a fixed server).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from nemo_igrpo.generation.common import (
    check_generation_config,
    check_request,
    host_bucket,
    iter_weight_buckets,
    normalise_finish_reason,
)
from nemo_igrpo.generation.config import GenerationConfig
from nemo_igrpo.generation.interface import GenerationBackend, GenerationResult, GenerationStream, SamplingParams
from nemo_igrpo.utils.errors import GenerationServerError
from nemo_igrpo.utils.http import RetryableStatus, call_with_retries, is_retryable_status

logger = logging.getLogger(__name__)


def _error_message(response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message", err))[:500]
        return str(err)[:500]
    return str(body)[:500]


class OpenAIServerBackend(GenerationBackend):
    """Client for `vllm serve` (and, through a subclass, other OpenAI-compatible servers)."""

    server_kind = "vllm serve"

    def __init__(self, cfg: GenerationConfig, hf_path: Optional[str] = None, *, seed: int = 0):
        check_generation_config(cfg)
        self.cfg = cfg
        self.server = cfg.server
        self.base_url = cfg.server.url.rstrip("/")
        self.hf_path = hf_path
        self.seed = seed
        self._headers = {"Content-Type": "application/json"}
        if cfg.server.api_key_env:
            key = os.environ.get(cfg.server.api_key_env)
            if not key:
                raise ValueError(
                    f"generation.server.api_key_env: environment variable {cfg.server.api_key_env!r} is not set"
                )
            self._headers["Authorization"] = f"Bearer {key}"
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=cfg.server.max_concurrent_requests, thread_name_prefix="gen-http")
        self._tokenizer = None
        self._decoded_index: Optional[dict[str, Optional[int]]] = None
        self._own_sync_dir: Optional[str] = None
        self._last_version_dir: Optional[Path] = None
        self._nccl_group = None
        self.weight_version = 0
        self.last_weight_sync_s: Optional[float] = None
        self.model_name = self._check_served_model()

    # -- HTTP ------------------------------------------------------------------------------

    def _session(self):
        import requests

        session = getattr(self._local, "session", None)
        if session is None:  # requests.Session is not thread-safe: one per worker thread
            session = requests.Session()
            self._local.session = session
        return session

    def _call(
        self,
        method: str,
        path: str,
        body: Optional[dict] = None,
        *,
        params: Optional[dict] = None,
        retry: bool = True,
        timeout_s: Optional[float] = None,
        raw_body: Optional[bytes] = None,
        extra_headers: Optional[dict] = None,
    ) -> Any:
        """One JSON request with retries; returns the decoded body (None for an empty one)."""
        import requests

        url = f"{self.base_url}{path}"
        retries = self.server.max_retries if retry else 0
        timeout = (self.server.connect_timeout_s, timeout_s or self.server.timeout_s)
        headers = dict(self._headers, **(extra_headers or {}))
        data = raw_body if raw_body is not None else (json.dumps(body).encode() if body is not None else None)

        def once():
            response = self._session().request(method, url, data=data, params=params, headers=headers, timeout=timeout)
            if is_retryable_status(response.status_code):
                raise RetryableStatus(response.status_code, f"HTTP {response.status_code}: {_error_message(response)}")
            return response

        try:
            response = call_with_retries(
                once,
                retries=retries,
                backoff_s=self.server.backoff_s,
                transient=(requests.ConnectionError, requests.Timeout, RetryableStatus),
                what=f"{method} {url}",
            )
        except (requests.ConnectionError, requests.Timeout, RetryableStatus) as last_error:
            raise GenerationServerError(
                f"{self.server_kind} at {self.base_url} is unreachable or failing: {method} {path} gave up after "
                f"{retries + 1} attempt(s): {last_error}"
            ) from last_error
        if response.status_code >= 400:
            raise GenerationServerError(
                f"{self.server_kind} at {self.base_url}: {method} {path} answered "
                f"HTTP {response.status_code}: {_error_message(response)}"
            )
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError as err:
            raise GenerationServerError(
                f"{self.server_kind} at {self.base_url}: {method} {path} returned non-JSON: {response.text[:200]!r}"
            ) from err

    def _check_served_model(self) -> str:
        listing = self._call("GET", "/v1/models")
        try:
            served = [entry["id"] for entry in listing["data"]]
        except (TypeError, KeyError) as err:
            raise GenerationServerError(
                f"{self.server_kind} at {self.base_url}: unexpected /v1/models answer {listing!r}"
            ) from err
        wanted = self.server.model_name
        if wanted is None:
            if len(served) != 1:
                raise GenerationServerError(
                    f"{self.server_kind} at {self.base_url} serves {served}; set generation.server.model_name to pick one"
                )
            return served[0]
        if wanted not in served:
            raise GenerationServerError(
                f"{self.server_kind} at {self.base_url} serves {served}, not the configured "
                f"generation.server.model_name {wanted!r}: is the URL pointing at the right server?"
            )
        return wanted

    # -- generation ------------------------------------------------------------------------

    def _request_fields(self) -> dict:
        """Server-specific fields added to every completion request (vLLM's extensions)."""
        return {"return_token_ids": True, "return_tokens_as_token_ids": True}

    def _completion_body(self, prompt: list[int], params: SamplingParams, n: int) -> dict:
        stop = list(params.stop_strings) + [s for s in self.cfg.stop_strings if s not in params.stop_strings]
        body = {
            "model": self.model_name,
            "prompt": list(prompt),
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "n": n,
            "logprobs": 0,  # the sampled token's log-prob only
            "stop_token_ids": list(params.stop_token_ids),
            "include_stop_str_in_output": True,  # the text matches the returned token ids
            "stream": False,
        }
        if stop:
            body["stop"] = stop
        if params.seed is not None:
            body["seed"] = params.seed
        body.update(self._request_fields())
        return body

    def _tokenizer_for_fallback(self):
        if self._tokenizer is None:
            if self.hf_path is None:
                raise GenerationServerError(
                    f"{self.server_kind} at {self.base_url} returned no token ids and no hf_path was given to map "
                    "token strings back"
                )
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.hf_path)
        return self._tokenizer

    def _decoded_token_index(self) -> dict[str, Optional[int]]:
        """Decoded single-token string -> id (None where two ids decode alike), built once."""
        if self._decoded_index is None:
            tokenizer = self._tokenizer_for_fallback()
            index: dict[str, Optional[int]] = {}
            for token_id in range(len(tokenizer)):
                piece = tokenizer.decode([token_id], skip_special_tokens=False)
                index[piece] = None if piece in index else token_id
            self._decoded_index = index
        return self._decoded_index

    def _token_ids_of(self, choice: dict, where: str) -> list[int]:
        if choice.get("token_ids") is not None:
            return [int(t) for t in choice["token_ids"]]
        # A server without token ids in its answer: read them back from the log-prob entries,
        # either "token_id:N" (vLLM's return_tokens_as_token_ids) or the decoded token strings.
        tokens = (choice.get("logprobs") or {}).get("tokens") or []
        if all(isinstance(t, str) and t.startswith("token_id:") for t in tokens):
            return [int(t.split(":", 1)[1]) for t in tokens]
        index = self._decoded_token_index()
        ids = []
        for tok in tokens:
            token_id = index.get(tok)
            if token_id is None:
                raise GenerationServerError(
                    f"{where}: cannot map token {tok!r} from {self.base_url} back to a unique id; use a server that "
                    "returns token ids (vLLM: return_token_ids; trtllm-serve: choices[].token_ids)"
                )
            ids.append(token_id)
        return ids

    def _parse_choice(self, choice: dict, prompt: list[int], where: str) -> GenerationResult:
        token_ids = self._token_ids_of(choice, where)
        logprob_block = choice.get("logprobs") or {}
        logprobs = logprob_block.get("token_logprobs")
        if logprobs is None or len(logprobs) != len(token_ids) or any(lp is None for lp in logprobs):
            raise GenerationServerError(
                f"{where}: {self.base_url} returned {0 if logprobs is None else len(logprobs)} log-probs for "
                f"{len(token_ids)} tokens"
            )
        return GenerationResult(
            prompt_token_ids=list(prompt),
            token_ids=token_ids,
            text=choice.get("text", ""),
            logprobs=[float(lp) for lp in logprobs],
            finish_reason=normalise_finish_reason(choice.get("finish_reason"), where),
        )

    def _complete_one(self, index: int, prompt: list[int], params: SamplingParams) -> list[GenerationResult]:
        # Greedy sampling gives n identical samples; servers reject n > 1 with temperature 0.
        n = 1 if params.temperature == 0 else params.n
        answer = self._call("POST", "/v1/completions", self._completion_body(prompt, params, n))
        choices = sorted(answer.get("choices", []), key=lambda c: c.get("index", 0))
        if len(choices) != n:
            raise GenerationServerError(
                f"prompt {index}: {self.base_url} returned {len(choices)} choices, expected {n}"
            )
        results = [self._parse_choice(c, prompt, f"prompt {index} sample {c.get('index', 0)}") for c in choices]
        if n != params.n:
            only = results[0]
            results = [
                replace(only, token_ids=list(only.token_ids), logprobs=list(only.logprobs)) for _ in range(params.n)
            ]
        return results

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[GenerationResult]]:
        check_request(prompts, params)
        futures = [self._pool.submit(self._complete_one, i, list(p), params) for i, p in enumerate(prompts)]
        return [f.result() for f in futures]

    def open_stream(self) -> GenerationStream:
        """Each submitted prompt is posted at once as its own /v1/completions request on the
        same pool as generate() (so at most `server.max_concurrent_requests` are in flight) and
        comes back as soon as its answer does; the server batches whatever is in flight, so a
        refinement posted while other prompts' drafts decode joins their batch. Same body,
        seeds and parsing as generate()."""
        from nemo_igrpo.generation.streaming import FutureStream

        return FutureStream(lambda index, prompt, params: self._pool.submit(self._complete_one, index, prompt, params))

    # -- weights ---------------------------------------------------------------------------

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        mode = self.server.weight_sync
        started = time.perf_counter()
        if mode == "none":
            logger.info("generation.server.weight_sync is 'none': weights not pushed to %s", self.base_url)
            return
        if mode == "reload_from_dir":
            self._push_via_directory(named_tensors)
        elif mode == "nccl":
            self._push_via_nccl(named_tensors)
        else:
            self._push_other(mode, named_tensors)
        self.weight_version += 1
        self.last_weight_sync_s = time.perf_counter() - started
        logger.info(
            "weights v%d pushed to %s via %s in %.2f s",
            self.weight_version,
            self.base_url,
            mode,
            self.last_weight_sync_s,
        )

    def _push_other(self, mode: str, named_tensors) -> None:
        raise ValueError(f"generation.server.weight_sync: {mode!r} is not supported by the {self.server_kind} backend")

    def _sync_root(self) -> Path:
        if self.server.weight_sync_dir:
            root = Path(self.server.weight_sync_dir)
            root.mkdir(parents=True, exist_ok=True)
            return root
        if self._own_sync_dir is None:
            self._own_sync_dir = tempfile.mkdtemp(prefix="nemo_igrpo_weights_")
        return Path(self._own_sync_dir)

    def _reset_prefix_cache(self) -> None:
        # The reset is refused while requests hold blocks; none should be running after a step,
        # but a straggler from an aborted call can, so try a few times.
        for _ in range(10):
            answer = self._call("POST", "/reset_prefix_cache")
            if answer is None or answer.get("success", True):
                return
            time.sleep(0.5)
        raise GenerationServerError(f"{self.base_url} refused to reset its prefix cache after a weight update")

    def _dev_endpoint_hint(self, err: GenerationServerError) -> GenerationServerError:
        if "HTTP 404" in str(err):
            return GenerationServerError(
                f"{err}\n{self.base_url} does not expose vLLM's development endpoints: start `vllm serve` with "
                "VLLM_SERVER_DEV_MODE=1 for generation.server.weight_sync='reload_from_dir' or 'nccl'"
            )
        return err

    def _push_via_directory(self, named_tensors) -> None:
        from safetensors.torch import save_file

        root = self._sync_root()
        version_dir = root / f"weights_v{self.weight_version + 1:06d}"
        if version_dir.exists():
            shutil.rmtree(version_dir)  # a leftover from an interrupted push: never mix shards
        version_dir.mkdir(parents=True)
        bucket_bytes = self.cfg.weight_sync_bucket_mb * 1024 * 1024
        num_shards = 0
        for num_shards, bucket in enumerate(iter_weight_buckets(named_tensors, bucket_bytes), start=1):
            save_file(host_bucket(bucket), str(version_dir / f"model-{num_shards:05d}.safetensors"))
        if num_shards == 0:
            shutil.rmtree(version_dir)
            raise ValueError("update_weights() got no tensors")
        try:
            self._call(
                "POST",
                "/collective_rpc",
                {"method": "reload_weights", "kwargs": {"weights_path": str(version_dir)}},
            )
            self._reset_prefix_cache()
        except GenerationServerError as err:
            raise self._dev_endpoint_hint(err) from err
        # The server now points its model path at version_dir; older versions can go.
        if self._last_version_dir is not None and self._last_version_dir != version_dir:
            shutil.rmtree(self._last_version_dir, ignore_errors=True)
        self._last_version_dir = version_dir

    def _push_via_nccl(self, named_tensors) -> None:  # GPU only; not exercised by the CPU tests
        if not torch.cuda.is_available():
            raise RuntimeError("generation.server.weight_sync='nccl' needs a CUDA device on the trainer")
        try:
            if self._nccl_group is None:
                self._init_nccl()
            self._call("POST", "/start_weight_update", retry=False)
            bucket_bytes = self.cfg.weight_sync_bucket_mb * 1024 * 1024
            with ThreadPoolExecutor(max_workers=1) as side:
                for bucket in iter_weight_buckets(named_tensors, bucket_bytes):
                    tensors = [(name, t.detach().to("cuda").contiguous()) for name, t in bucket]
                    update_info = {
                        "names": [name for name, _ in tensors],
                        "dtype_names": [str(t.dtype).split(".")[-1] for _, t in tensors],
                        "shapes": [list(t.shape) for _, t in tensors],
                    }
                    # The workers block inside /update_weights in the matching broadcasts, so the
                    # HTTP call runs beside them.
                    pending = side.submit(
                        self._call, "POST", "/update_weights", {"update_info": update_info}, retry=False
                    )
                    stream = torch.cuda.current_stream()
                    for _, tensor in tensors:
                        self._nccl_group.broadcast(tensor, src=0, stream=stream)
                    stream.synchronize()
                    pending.result()
            self._call("POST", "/finish_weight_update", {"weight_version": str(self.weight_version + 1)}, retry=False)
            self._reset_prefix_cache()
        except GenerationServerError as err:
            raise self._dev_endpoint_hint(err) from err

    def _init_nccl(self) -> None:
        from vllm.distributed.weight_transfer.nccl_common import (
            NCCLWeightTransferInitInfo,
            trainer_init,
            worker_init_payload,
        )

        workers = int(self._call("GET", "/get_world_size")["world_size"])
        world_size = workers + 1  # the trainer's sender is rank 0, the server's workers follow
        init_info = NCCLWeightTransferInitInfo(
            master_address=self.server.nccl_master_address,
            master_port=self.server.nccl_master_port,
            rank_offset=1,
            world_size=world_size,
            packed=False,  # one broadcast per tensor, matching _push_via_nccl
        )
        with ThreadPoolExecutor(max_workers=1) as side:
            pending = side.submit(
                self._call,
                "POST",
                "/init_weight_transfer_engine",
                {"init_info": worker_init_payload(init_info)},
                retry=False,
            )
            self._nccl_group = trainer_init(
                {
                    "master_address": init_info.master_address,
                    "master_port": init_info.master_port,
                    "world_size": world_size,
                }
            )
            pending.result()

    # -- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._nccl_group is not None:
            try:
                self._call("POST", "/shutdown_weight_transfer_engine", retry=False)
            except GenerationServerError as err:
                logger.warning("could not shut down the server's weight-transfer engine: %s", err)
            self._nccl_group.destroy()
            self._nccl_group = None
        if self._own_sync_dir is not None:
            shutil.rmtree(self._own_sync_dir, ignore_errors=True)
            self._own_sync_dir = None
