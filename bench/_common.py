"""Shared pieces of the benchmarks: the machine description, tiny model / data assets, a child
process runner that measures the peak memory of the whole process tree, robust statistics,
and table / JSON output.

Why a child process per measured run: vLLM's engine core, the reward workers and torch's
allocator all keep memory and threads alive; a fresh process per run makes runs independent
(run B never inherits run A's caches) and lets us measure the peak memory of one run's whole
process tree, which is what a user has to provision.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "bench"
RESULTS_DIR = BENCH_DIR / "results"
# Generated assets and run directories: gitignored (.cache/), reused between benchmark runs.
CACHE_DIR = REPO / ".cache" / "bench"
PYTHON = sys.executable

# Measured bf16 dense-matmul peak of one H100 (reference/environment.md), for MFU.
H100_BF16_PEAK_TFLOPS = 790.0


# --------------------------------------------------------------------------------------------
# Machine and context


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def other_load() -> dict:
    """How busy the machine was: 1-minute load average vs cores, and the number of other
    processes using more than 5% CPU right now (the machine may be shared)."""
    info: dict = {"cores": os.cpu_count()}
    try:
        info["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    try:
        import psutil

        me = os.getpid()
        procs = list(psutil.process_iter(["pid", "name"]))
        for p in procs:
            try:
                p.cpu_percent(None)
            except psutil.Error:
                pass
        time.sleep(0.5)
        busy = []
        for p in procs:
            try:
                if p.pid != me and p.cpu_percent(None) > 5.0:
                    busy.append(p.info["name"])
            except psutil.Error:
                pass
        info["other_busy_processes"] = len(busy)
    except ImportError:
        pass
    return info


def machine_info(device: str = "cpu") -> dict:
    info = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host_cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "device": device,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if device == "cuda" and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        pass
    info["load_at_start"] = other_load()
    return info


# --------------------------------------------------------------------------------------------
# Assets


def tiny_model(
    hidden: int = 128,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int = 1,
    ffn: Optional[int] = None,
    seed: int = 0,
    max_pos: int = 1024,
) -> Path:
    """A random tiny Llama (char tokenizer) under .cache/bench, made once per shape.
    head_dim = hidden / heads must be 64 for vLLM's CPU attention."""
    from nemo_igrpo.utils.tiny_model import make_tiny_hf_model

    ffn = ffn or 2 * hidden
    out = CACHE_DIR / "models" / f"llama-h{hidden}-l{layers}-a{heads}-kv{kv_heads}-f{ffn}-s{seed}"
    if not (out / "config.json").exists():
        tmp = out.with_name(out.name + ".tmp")
        make_tiny_hf_model(
            tmp,
            arch="llama",
            num_layers=layers,
            hidden_size=hidden,
            intermediate_size=ffn,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            seed=seed,
            max_position_embeddings=max_pos,
        )
        os.replace(tmp, out)
    return out


def demo_data(seed: int = 0) -> tuple[Path, Path]:
    from nemo_igrpo.demo.task import write_demo_data

    return write_demo_data(CACHE_DIR / f"data-seed{seed}", seed=seed, num_eval=64)


def param_count(hf_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                total += _prod(st.get_slice(k).get_shape())
    return total


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# --------------------------------------------------------------------------------------------
# Running a child process and measuring its memory


@dataclass
class ChildRun:
    returncode: int
    wall_s: float
    peak_tree_rss_mb: float  # max over time of the summed RSS of the process and its descendants
    peak_single_rss_mb: float  # max over time of the largest RSS of any one process of the tree
    peak_root_rss_mb: float  # max over time of the RSS of the launched process itself (the trainer)
    log_path: Path
    samples: int = 0  # memory polls taken


class _TreeRssPoller(threading.Thread):
    """Polls the RSS of a process tree every `interval` seconds (a peak shorter than that can
    be missed; resource.getrusage(RUSAGE_CHILDREN) cannot be used per run: its max-RSS is a
    running maximum over every child this process ever waited for).

    The summed RSS counts shared pages (torch libraries mapped by the trainer and by vLLM's
    engine core) once per process, so it over-counts what the kernel really holds; it is still
    the right quantity to compare two runs with the same processes, and what `top`-style
    accounting sees."""

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak_total = 0
        self.peak_single = 0
        self.peak_root = 0
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._halt.is_set():
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.Error:
                break
            total = 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                self.peak_single = max(self.peak_single, rss)
                if p.pid == self.pid:
                    self.peak_root = max(self.peak_root, rss)
            self.peak_total = max(self.peak_total, total)
            self.samples += 1
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    for sig, wait_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; its engine processes may linger a moment: one more sweep.
        time.sleep(1.0)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _sigterm_to_exit() -> None:
    """Let SIGTERM (e.g. `timeout`) unwind through run_child, which then ends its child group."""
    import signal

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))


def run_child(cmd: Sequence[str], log_path: Path, env: Optional[dict] = None, timeout: float = 900.0) -> ChildRun:
    """Run `cmd` (stdout+stderr to log_path) and measure wall time and peak memory."""
    _sigterm_to_exit()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")  # the log shows progress as it happens
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            list(cmd), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )
        poller = _TreeRssPoller(proc.pid)
        poller.start()
        try:
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                rc = 124
        except BaseException:
            # Timeout, Ctrl-C or SIGTERM of this driver: end the child's own process group
            # (start_new_session: vLLM's engine core and workers are in it, nobody else is).
            _kill_group(proc)
            raise
        finally:
            poller.stop()
            poller.join()
    return ChildRun(
        returncode=rc,
        wall_s=time.perf_counter() - start,
        peak_tree_rss_mb=poller.peak_total / 2**20,
        peak_single_rss_mb=poller.peak_single / 2**20,
        peak_root_rss_mb=poller.peak_root / 2**20,
        log_path=log_path,
        samples=poller.samples,
    )


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------
# Statistics and output


def median(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None]
    return float(statistics.median(xs)) if xs else float("nan")


def spread(xs: Sequence[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None]
    return (min(xs), max(xs)) if xs else (float("nan"), float("nan"))


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != x:
            return "nan"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.{max(digits - 1, 1)}f}"
    return str(x)


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence]) -> str:
    cells = [[str(h) for h in header]] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(cells[0], widths)), "  ".join("-" * w for w in widths)]
    lines += [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells[1:]
    ]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(name: str, payload: dict, out: Optional[str] = None) -> Path:
    path = Path(out) if out else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}", flush=True)
    return path


def read_jsonl(path: Path) -> list[dict]:
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


# --------------------------------------------------------------------------------------------
# One training run (`python -m nemo_igrpo train`) as a measured child process

# Phases as the trainer (timing/<name>_s) and the rollout (its own _timing) report them.
ROLLOUT_PHASES = ["draft_generation", "draft_reward", "refine_generation", "refine_reward"]
TRAIN_PHASES = ["logprobs", "ref_logprobs", "update", "weight_sync"]
PHASE_LABELS = {
    "draft_generation": "draft generation",
    "draft_reward": "draft rewards",
    "refine_generation": "refinement generation",
    "refine_reward": "refinement rewards",
    "rollout_other": "rollout other (prompts, selection, advantages)",
    "logprobs": "log-probs (old policy)",
    "ref_logprobs": "log-probs (reference)",
    "update": "update (fwd+bwd+AdamW)",
    "weight_sync": "weight sync",
    "step_other": "other (broadcast, metrics)",
}


def step_phases(rec: dict) -> dict[str, float]:
    """Per-phase seconds of one metrics.jsonl record, with the remainders made explicit so the
    phases add up to the step time."""
    t = {k[len("timing/") : -2]: float(v) for k, v in rec.items() if k.startswith("timing/") and k.endswith("_s")}
    out = {p: t.get(p, 0.0) for p in ROLLOUT_PHASES}
    out["rollout_other"] = max(t.get("rollout", 0.0) - sum(out.values()), 0.0)
    for p in TRAIN_PHASES:
        out[p] = t.get(p, 0.0)
    accounted = t.get("rollout", 0.0) + sum(t.get(p, 0.0) for p in TRAIN_PHASES)
    out["step_other"] = max(t.get("step", 0.0) - accounted, 0.0)
    out["step"] = t.get("step", 0.0)
    return out


def train_run(
    name: str, config: str, overrides: list[str], *, steps: int, warmup_steps: int = 1, timeout: float = 900.0
) -> dict:
    """Train `steps` steps in a fresh run dir (no eval, no periodic checkpoints, no HF export)
    and return the per-step phases of the steps after the warm-up plus the process's memory."""
    import shutil

    run_dir = CACHE_DIR / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resume of an older one
    overrides = [
        "data.eval_path=null",
        f"run.dir={run_dir}",
        f"trainer.max_steps={steps}",
        "trainer.eval_every=0",
        "trainer.save_every=0",
        "trainer.export_hf=false",
        "trainer.progress_bars=false",
        "logging.tensorboard=false",
    ] + list(overrides)
    cmd = [PYTHON, "-m", "nemo_igrpo", "train", config] + overrides
    child = run_child(cmd, run_dir.with_suffix(".log"), env={"IGRPO_LOG_LEVEL": "WARNING"}, timeout=timeout)
    records = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "timing/step_s" in r]
    if child.returncode != 0 or len(records) < steps:
        raise SystemExit(
            f"run {name} failed (rc={child.returncode}, {len(records)} of {steps} steps); log "
            f"{child.log_path}:\n{tail(child.log_path)}"
        )
    kept = [r for r in records if r["step"] > warmup_steps]
    return {
        "command": "python -m nemo_igrpo train " + " ".join([config] + overrides),
        "wall_s": child.wall_s,
        "peak_tree_rss_mb": child.peak_tree_rss_mb,
        "peak_single_rss_mb": child.peak_single_rss_mb,
        "peak_trainer_rss_mb": child.peak_root_rss_mb,
        "steps": [step_phases(r) for r in kept],
        "trained_samples": [float(r.get("samples/trained", 0.0)) for r in kept],
        "trained_tokens": [float(r.get("num_tokens", 0.0)) for r in kept],
        "response_length_refine": [float(r.get("response_length/refine_mean", 0.0)) for r in kept],
        "response_length_draft": [
            float(r["response_length/draft_mean"]) for r in kept if "response_length/draft_mean" in r
        ],
    }
