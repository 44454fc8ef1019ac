"""RewardManager: the weighted sum of the configured reward terms, isolated and time-bounded.

    with RewardManager(cfg.reward) as rewards:
        out = rewards.score([RewardSample(prompt, response, reference), ...])
        out.scores, out.correct, out.per_term["math_accuracy"], out.metrics

Why it is built this way:
- Model outputs are untrusted and reward code is fragile (sympy on a power tower, a user
  function with a bug). One bad sample must cost that sample, never the run. So each
  (sample, term) runs in a worker process with a deadline of `reward.timeout_s`; a worker past
  its deadline is killed and replaced, and the sample gets `reward.fallback_score`. A raised
  exception, a non-number, NaN/inf or a score outside the term's [min_score, max_score] gets
  the fallback too. Every such event is counted in metrics (reward/errors, reward/timeouts,
  reward/nonfinite, reward/out_of_range), and the first one of each kind per term is logged
  with the sample index and the start of the response.
- A term that fails on *every* sample is a broken term, not a bad sample: `end_step()` (called
  by the rollout once per training step) reports `reward/<term>/errors` for the step, warns on
  each step a term failed throughout, and after `reward.max_failing_steps` such steps in a row
  raises `RewardTermFailing` naming the term and its last error, instead of training on nothing
  but fallback scores.
- Workers are started with "forkserver" (default) or "spawn", never "fork": the trainer holds
  torch/gloo threads, and a forked child can inherit a lock held by one of them.
- Samples go to workers in chunks to keep the IPC cost per sample small; the deadline is
  rolling (it restarts at every reported result), so each sample still gets `timeout_s`.
- The judge term is I/O bound: it runs in this process on threads, concurrently with the pool.
- `score_async` returns a Future so the trainer can overlap scoring with generation.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
import multiprocessing as mp
import multiprocessing.connection
import numbers
import pickle
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from nemo_igrpo.rewards.base import RewardOutput, RewardSample
from nemo_igrpo.rewards.config import RewardConfig
from nemo_igrpo.rewards.registry import REWARD_FUNCTIONS, RewardResolutionError, resolve_reward
from nemo_igrpo.utils.errors import RewardConfigError, RewardTermFailing

logger = logging.getLogger(__name__)

JUDGE_TERM = "judge"
# Modules every worker needs; with forkserver they are imported once, in the server, so a
# replacement worker (after a kill) is ready in milliseconds instead of re-importing sympy.
# "__main__" is deliberately not preloaded: re-running the trainer's main script in the server
# would be a hazard if it lacks a __name__ guard; user rewards live in importable modules.
_PRELOAD = ["nemo_igrpo.rewards._worker_preload"]
_BOOT_TIMEOUT_S = 180.0  # a worker that is not ready by then is broken (an import hangs)
_MAX_CONSECUTIVE_BOOT_FAILURES = 3
_MAX_CHUNK = 16
_RESPONSE_PREVIEW_CHARS = 200


@dataclass
class _Term:
    name: str
    weight: float
    fn: Callable[..., float]
    kwargs: dict
    min_score: float
    max_score: float


# ---------------------------------------------------------------------------------------------
# Worker process side


def _worker_main(conn: multiprocessing.connection.Connection, pickled_terms: bytes) -> None:
    import signal

    # Ctrl-C goes to the whole process group; the trainer decides how to stop, the workers
    # should not each print a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        terms: list[tuple[Callable[..., float], dict]] = pickle.loads(pickled_terms)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("boot_error", f"{type(e).__name__}: {e}"))
        return
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    # Optional `fn.warm_up()`: one-time set-up paid before "ready", so not against any timeout.
    for fn, _ in terms:
        warm_up = getattr(fn, "warm_up", None)
        if callable(warm_up):
            try:
                warm_up()
            except Exception:  # noqa: BLE001 - a failed warm-up only costs time later
                pass
    conn.send(("ready", None))
    while True:
        try:
            chunk = conn.recv()
        except EOFError:
            return
        if chunk is None:
            return
        for task_id, term_index, prompt, response, reference in chunk:
            fn, kwargs = terms[term_index]
            try:
                value = fn(prompt, response, reference, **kwargs)
                if isinstance(value, numbers.Real):
                    conn.send(("ok", task_id, float(value)))
                else:
                    conn.send(("error", task_id, f"returned a {type(value).__name__}, not a number"))
            except BaseException as e:  # noqa: BLE001 - any failure is this sample's fallback
                conn.send(("error", task_id, f"{type(e).__name__}: {str(e)[:500]}"))


# ---------------------------------------------------------------------------------------------
# Pool, parent side


class _Worker:
    def __init__(self, ctx: Any, pickled_terms: bytes):
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(
            target=_worker_main, args=(child_conn, pickled_terms), daemon=True, name="reward-worker"
        )
        self.process.start()
        child_conn.close()
        self.started_at = time.monotonic()
        self.ready = False
        self.in_flight: deque = deque()  # tasks sent, in order; results come back in this order
        self.deadline = math.inf

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class _WorkerPool:
    def __init__(self, start_method: str, num_workers: int, terms: list[tuple[Callable[..., float], dict]]):
        self._ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            # Only takes effect if the forkserver is not running yet (it is per interpreter).
            self._ctx.set_forkserver_preload(_PRELOAD)
        self._pickled_terms = pickle.dumps(terms)
        self._workers = [_Worker(self._ctx, self._pickled_terms) for _ in range(num_workers)]
        self._boot_failures = 0
        self.replacements = 0

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker(self._ctx, self._pickled_terms)
        self.replacements += 1

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
        for w in self._workers:
            w.process.join(timeout=1)
            w.kill()
        self._workers = []

    def run(self, tasks: list[tuple], timeout_s: float) -> dict[int, tuple[str, Any]]:
        """Run (task_id, term_index, prompt, response, reference) tasks.

        Returns task_id -> ("ok", float) | ("error", message) | ("timeout", message).
        """
        pending = deque(tasks)
        results: dict[int, tuple[str, Any]] = {}
        chunk_size = max(1, min(_MAX_CHUNK, len(tasks) // (4 * max(1, len(self._workers)))))
        while pending or any(w.in_flight for w in self._workers):
            now = time.monotonic()
            for w in list(self._workers):
                if w.ready and not w.in_flight and pending:
                    chunk = [pending.popleft() for _ in range(min(chunk_size, len(pending)))]
                    try:
                        w.conn.send(chunk)
                    except OSError:
                        pending.extendleft(reversed(chunk))
                        self._replace(w)
                        continue
                    w.in_flight.extend(chunk)
                    w.deadline = now + timeout_s
            waiting = [w for w in self._workers if w.in_flight or not w.ready]
            next_deadline = min((w.deadline for w in waiting if w.in_flight), default=math.inf)
            boot_deadline = min((w.started_at + _BOOT_TIMEOUT_S for w in waiting if not w.ready), default=math.inf)
            wait_s = max(0.0, min(next_deadline, boot_deadline) - now)
            ready_conns = mp.connection.wait([w.conn for w in waiting], timeout=None if wait_s == math.inf else wait_s)
            by_conn = {w.conn: w for w in waiting}
            for conn in ready_conns:
                self._receive(by_conn[conn], pending, results, timeout_s)
            now = time.monotonic()
            for w in list(self._workers):
                if w.in_flight and now >= w.deadline:
                    task = w.in_flight.popleft()
                    results[task[0]] = ("timeout", f"no result within reward.timeout_s={timeout_s}s; worker killed")
                    pending.extendleft(reversed(w.in_flight))
                    w.in_flight.clear()
                    self._replace(w)
                elif not w.ready and now >= w.started_at + _BOOT_TIMEOUT_S:
                    raise RuntimeError(f"reward worker did not start within {_BOOT_TIMEOUT_S:.0f}s")
        return results

    def _receive(self, w: _Worker, pending: deque, results: dict, timeout_s: float) -> None:
        try:
            # Drain everything already there: one wakeup, many results.
            while True:
                kind, task_id, payload = self._unpack(w.conn.recv())
                if kind == "ready":
                    w.ready = True
                    self._boot_failures = 0
                elif kind == "boot_error":
                    raise RewardConfigError(f"reward worker could not load the reward functions: {payload}")
                else:
                    task = w.in_flight.popleft()
                    assert task[0] == task_id, "reward worker answered out of order"
                    results[task_id] = (kind, payload)
                    w.deadline = time.monotonic() + timeout_s
                if not w.conn.poll():
                    return
        except (EOFError, OSError):
            exit_code = w.process.exitcode if not w.process.is_alive() else None
            if w.in_flight:
                task = w.in_flight.popleft()
                results[task[0]] = ("error", f"reward worker process died (exit code {exit_code})")
                pending.extendleft(reversed(w.in_flight))
                w.in_flight.clear()
            elif not w.ready:
                self._boot_failures += 1
                if self._boot_failures >= _MAX_CONSECUTIVE_BOOT_FAILURES:
                    raise RuntimeError(f"reward workers keep dying while starting (exit code {exit_code})") from None
            self._replace(w)

    @staticmethod
    def _unpack(message: tuple) -> tuple[str, Optional[int], Any]:
        if message[0] in ("ready", "boot_error"):
            return message[0], None, message[1]
        return message[0], message[1], message[2]


# ---------------------------------------------------------------------------------------------
# Manager


def check_reward_config(cfg: RewardConfig, import_paths: bool = True) -> None:
    """Every check of `reward.*` that needs no worker process, at config load time.

    Resolves each term (importing `module:function` terms), checks its kwargs against its
    signature and that it can reach the workers, so a misspelt term fails before any model is
    built. Raises RewardConfigError whose message starts with the key ("reward.terms[1].name: ...").
    import_paths=False leaves `module:function` terms unresolved, for a machine that only renders
    a job (a Slurm login node) and may lack the user's package.
    """
    RewardManager._check(cfg, import_paths)


class RewardManager:
    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        self._terms = self._check(cfg)
        # A term that needs something of the host (the code sandbox: bubblewrap and user
        # namespaces) says so now, once, before any model is trained; never per sample.
        for i, term in enumerate(self._terms):
            check_host = getattr(term.fn, "check_host", None)
            if callable(check_host):
                check_host(**term.kwargs)
        self._pool_terms = [i for i, t in enumerate(self._terms) if t.name != JUDGE_TERM]
        self._judge_index = next((i for i, t in enumerate(self._terms) if t.name == JUDGE_TERM), None)
        self._judge = None
        if self._judge_index is not None:
            from nemo_igrpo.rewards.judge import JudgeClient, judge_config_with

            try:
                judge_cfg = judge_config_with(cfg.judge, self._terms[self._judge_index].kwargs)
            except ValueError as e:
                raise RewardConfigError(f"reward.terms[{self._judge_index}].kwargs: {e}") from None
            self._judge = JudgeClient(judge_cfg)
        self._pool: Optional[_WorkerPool] = None
        if self._pool_terms and cfg.num_workers > 0:
            pool_specs = [(self._terms[i].fn, self._terms[i].kwargs) for i in self._pool_terms]
            self._pool = _WorkerPool(cfg.start_method, cfg.num_workers, pool_specs)
        self._lock = threading.Lock()
        self._async: Optional[ThreadPoolExecutor] = None
        self._logged: set[tuple[str, str]] = set()
        # Per training step (see end_step): term -> [samples that fell back, samples scored].
        self._window: dict[str, list[int]] = {}
        self._last_error: dict[str, str] = {}  # term -> its latest failure message
        self._failing_steps: dict[str, int] = {t.name: 0 for t in self._terms}
        self._closed = False

    @staticmethod
    def _check(cfg: RewardConfig, import_paths: bool = True) -> list[_Term]:
        terms = RewardManager._build_terms(cfg, import_paths)
        names = [t.name for t in terms]
        if cfg.correctness_term not in names:
            raise RewardConfigError(
                f"reward.correctness_term: {cfg.correctness_term!r} is not one of the configured terms {names}"
            )
        if cfg.num_workers < 0:
            raise RewardConfigError("reward.num_workers: must be >= 0 (0 runs terms inline, without isolation)")
        if cfg.start_method not in ("forkserver", "spawn"):
            raise RewardConfigError(
                f"reward.start_method: {cfg.start_method!r} is not 'forkserver' or 'spawn' "
                "('fork' is unsafe in a process with torch/gloo threads)"
            )
        if not (cfg.timeout_s > 0):
            raise RewardConfigError("reward.timeout_s: must be > 0")
        if cfg.max_failing_steps < 0:
            raise RewardConfigError("reward.max_failing_steps: must be >= 0 (0 never stops the run)")
        for i, term in enumerate(terms):
            if term.name == JUDGE_TERM:
                from nemo_igrpo.rewards.judge import judge_config_with

                try:
                    judge_config_with(cfg.judge, term.kwargs)
                except ValueError as e:
                    raise RewardConfigError(f"reward.terms[{i}].kwargs: {e}") from None
        return terms

    @staticmethod
    def _build_terms(cfg: RewardConfig, import_paths: bool = True) -> list[_Term]:
        if not cfg.terms:
            raise RewardConfigError("reward.terms: at least one reward term is needed")
        terms: list[_Term] = []
        for i, term in enumerate(cfg.terms):
            key = f"reward.terms[{i}]"
            if any(t.name == term.name for t in terms):
                raise RewardConfigError(f"{key}.name: {term.name!r} appears twice; combine them into one term")
            if not import_paths and ":" in term.name:
                # Not resolved here (see check_reward_config); only its name is used by the checks.
                terms.append(
                    _Term(
                        term.name,
                        float(term.weight),
                        None,
                        dict(term.kwargs or {}),  # type: ignore[arg-type]
                        float(term.min_score),
                        float(term.max_score),
                    )
                )
                continue
            try:
                fn = resolve_reward(term.name)
            except RewardResolutionError as e:
                hint = ""
                if ":" not in term.name:  # a registered name, misspelt: suggest the closest one
                    close = difflib.get_close_matches(term.name, sorted(REWARD_FUNCTIONS), n=1)
                    hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise RewardConfigError(f"{key}.name: {e}{hint}") from None
            if not math.isfinite(term.weight):
                raise RewardConfigError(f"{key}.weight: must be a finite number, got {term.weight}")
            if not term.min_score <= term.max_score:
                raise RewardConfigError(f"{key}: min_score {term.min_score} > max_score {term.max_score}")
            kwargs = dict(term.kwargs or {})
            if term.name != JUDGE_TERM:
                # A misspelt kwarg would otherwise fail every sample, one fallback at a time.
                try:
                    inspect.signature(fn).bind("prompt", "response", None, **kwargs)
                except TypeError as e:
                    raise RewardConfigError(
                        f"{key}.kwargs: {term.name} does not accept {sorted(kwargs)}: {e}"
                    ) from None
                except ValueError:
                    pass  # no signature available (a builtin): checked at call time
                try:
                    # Inline mode (num_workers=0) never pickles; the worker pool does.
                    if cfg.num_workers > 0:
                        pickle.dumps((fn, kwargs))
                except Exception as e:  # noqa: BLE001
                    raise RewardConfigError(
                        f"{key}: the function and kwargs must be picklable to reach the worker processes "
                        f"(define the function at module level of an importable module): {e}"
                    ) from None
            terms.append(_Term(term.name, float(term.weight), fn, kwargs, float(term.min_score), float(term.max_score)))
        return terms

    @property
    def term_names(self) -> list[str]:
        return [t.name for t in self._terms]

    # --- context manager / lifecycle ------------------------------------------------------
    def __enter__(self) -> "RewardManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._async is not None:
            self._async.shutdown(wait=True)
        if self._pool is not None:
            self._pool.close()
        if self._judge is not None:
            self._judge.close()

    # --- scoring --------------------------------------------------------------------------
    def score_async(self, samples: Sequence[RewardSample]) -> "Future[RewardOutput]":
        """`score` on a background thread; calls are served one after another, in order."""
        if self._async is None:
            self._async = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-manager")
        return self._async.submit(self.score, list(samples))

    def score(self, samples: Sequence[RewardSample]) -> RewardOutput:
        if self._closed:
            raise RuntimeError("RewardManager.score called after close()")
        for i, s in enumerate(samples):
            if not isinstance(s.response, str) or not isinstance(s.prompt, str):
                raise TypeError(
                    f"reward sample {i}: prompt and response must be str, got "
                    f"{type(s.prompt).__name__} and {type(s.response).__name__}"
                )
        with self._lock:
            return self._score(list(samples))

    def _score(self, samples: list[RewardSample]) -> RewardOutput:
        started = time.monotonic()
        n, num_terms = len(samples), len(self._terms)
        raw = np.full((num_terms, n), np.nan)
        status = np.full((num_terms, n), "ok", dtype=object)
        messages: dict[tuple[int, int], str] = {}

        judge_future: Optional[Future] = None
        if self._judge is not None and n:
            judge_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-judge-batch")
            judge_future = judge_thread.submit(
                self._judge.score_batch,
                [s.prompt for s in samples],
                [s.response for s in samples],
                [s.reference for s in samples],
            )
            judge_thread.shutdown(wait=False)

        tasks = [
            (sample * num_terms + t, t, s.prompt, s.response, s.reference)
            for sample, s in enumerate(samples)
            for t in self._pool_terms
        ]
        if self._pool is not None:
            results = self._pool.run(tasks, self.cfg.timeout_s)
        else:
            results = self._run_inline(tasks)
        for task_id, (kind, payload) in results.items():
            sample, t = divmod(task_id, num_terms)
            if kind == "ok":
                raw[t, sample] = payload
            else:
                status[t, sample] = kind
                messages[(t, sample)] = payload

        judge_requests = judge_cache_hits = 0
        if judge_future is not None:
            judge_result = judge_future.result()
            t = self._judge_index
            raw[t] = judge_result.scores
            for i, st in enumerate(judge_result.statuses):
                if st not in ("ok", "cached"):
                    status[t, i] = st
            if judge_result.first_error is not None:
                messages[(t, judge_result.first_error[0])] = judge_result.first_error[1]
            judge_requests = judge_result.requests
            judge_cache_hits = sum(st == "cached" for st in judge_result.statuses)

        per_term: dict[str, np.ndarray] = {}
        counts = {"errors": 0, "timeouts": 0, "nonfinite": 0, "out_of_range": 0}
        term_failures: dict[str, int] = {}
        for t, term in enumerate(self._terms):
            values = raw[t]
            failed = 0
            for i in range(n):
                kind = status[t, i]
                if kind == "ok":
                    if not math.isfinite(values[i]):
                        kind, messages[(t, i)] = "nonfinite", f"returned {values[i]}"
                    elif not term.min_score <= values[i] <= term.max_score:
                        kind, messages[(t, i)] = (
                            "out_of_range",
                            (f"returned {values[i]}, outside [{term.min_score}, {term.max_score}]"),
                        )
                if kind == "ok":
                    continue
                counts["timeouts" if kind == "timeout" else "errors" if kind == "error" else kind] += 1
                failed += 1
                values[i] = self.cfg.fallback_score
                message = messages.get((t, i), "no score")
                # The judge reports one message per batch: keep a real message over "no score".
                if (t, i) in messages or term.name not in self._last_error:
                    self._last_error[term.name] = f"{kind} on sample {i}: {message}"
                self._log_first(term.name, kind, i, message, samples[i].response)
            per_term[term.name] = values.astype(np.float64)
            term_failures[term.name] = failed
            window = self._window.setdefault(term.name, [0, 0])
            window[0] += failed
            window[1] += n

        weights = np.array([t.weight for t in self._terms], dtype=np.float64)
        stacked = np.stack([per_term[t.name] for t in self._terms]) if n else np.zeros((num_terms, 0))
        scores = (weights[:, None] * stacked).sum(axis=0) if n else np.zeros(0)
        correct = per_term[self.cfg.correctness_term] > 0.5
        metrics: dict[str, float] = {
            "reward/mean": float(scores.mean()) if n else 0.0,
            "reward/correct_frac": float(correct.mean()) if n else 0.0,
            "reward/errors": float(counts["errors"]),
            "reward/timeouts": float(counts["timeouts"]),
            "reward/nonfinite": float(counts["nonfinite"]),
            "reward/out_of_range": float(counts["out_of_range"]),
            "reward/seconds": time.monotonic() - started,
        }
        for term in self._terms:
            metrics[f"reward/{term.name}/mean"] = float(per_term[term.name].mean()) if n else 0.0
            # Every kind of failure of this term (error, timeout, non-finite, out of range).
            metrics[f"reward/{term.name}/errors"] = float(term_failures[term.name])
        if self._judge is not None:
            metrics["reward/judge_requests"] = float(judge_requests)
            metrics["reward/judge_cache_hits"] = float(judge_cache_hits)
        if self._pool is not None:
            metrics["reward/worker_restarts_total"] = float(self._pool.replacements)
        return RewardOutput(scores=scores, correct=correct, per_term=per_term, metrics=metrics)

    def _run_inline(self, tasks: list[tuple]) -> dict[int, tuple[str, Any]]:
        # num_workers == 0: debugging mode, no isolation and no timeout.
        results: dict[int, tuple[str, Any]] = {}
        for task_id, t, prompt, response, reference in tasks:
            term = self._terms[t]
            try:
                value = term.fn(prompt, response, reference, **term.kwargs)
                results[task_id] = (
                    ("ok", float(value))
                    if isinstance(value, numbers.Real)
                    else ("error", f"returned a {type(value).__name__}, not a number")
                )
            except (Exception, SystemExit) as e:  # noqa: BLE001
                # SystemExit too (a reward calling sys.exit() or exit()): in a worker it is one
                # sample's error, and inline it must not end the trainer with exit code 0.
                # KeyboardInterrupt still propagates: Ctrl-C is the user's, not the reward's.
                results[task_id] = ("error", f"{type(e).__name__}: {str(e)[:500]}")
        return results

    # --- per training step ----------------------------------------------------------------------
    def end_step(self) -> dict[str, float]:
        """Close one training step: per-term failure counts of the step's scoring calls.

        Returns `reward/<term>/errors` (samples of this step that term failed on, summed over the
        step's calls) and `reward/<term>/failing_steps` (consecutive steps on which it failed on
        every sample). Raises RewardTermFailing once a term reaches reward.max_failing_steps.
        A step on which a term scored nothing (no samples) neither breaks nor extends its run.
        """
        with self._lock:
            window, self._window = self._window, {}
        metrics: dict[str, float] = {}
        limit = self.cfg.max_failing_steps
        broken: Optional[tuple[str, int]] = None
        for term in self._terms:
            failed, total = window.get(term.name, (0, 0))
            metrics[f"reward/{term.name}/errors"] = float(failed)
            if total > 0:
                if failed == total:
                    self._failing_steps[term.name] += 1
                    streak = self._failing_steps[term.name]
                    logger.warning(
                        "reward term %r failed on all %d samples of this step (%d step(s) in a row%s); "
                        "they were scored reward.fallback_score=%s. Last error: %s",
                        term.name,
                        total,
                        streak,
                        f"; the run stops at reward.max_failing_steps={limit}" if limit > 0 else "",
                        self.cfg.fallback_score,
                        self._last_error.get(term.name, "?"),
                    )
                else:
                    self._failing_steps[term.name] = 0
            streak = self._failing_steps[term.name]
            metrics[f"reward/{term.name}/failing_steps"] = float(streak)
            if limit > 0 and streak >= limit and broken is None:
                broken = (term.name, streak)
        if broken is not None:
            name, streak = broken
            last = self._last_error.get(name, "?")
            raise RewardTermFailing(
                f"reward term {name!r} failed on every sample for {streak} consecutive steps "
                f"(reward.max_failing_steps={limit}); last error: {last}. Fix the reward function or its "
                f"kwargs, or remove it from reward.terms (reward.max_failing_steps=0 never stops)",
                term=name,
                steps=streak,
                last_error=last,
            )
        return metrics

    def _log_first(self, term: str, kind: str, index: int, message: str, response: str) -> None:
        if (term, kind) in self._logged:
            return
        self._logged.add((term, kind))
        preview = response[:_RESPONSE_PREVIEW_CHARS] + ("..." if len(response) > _RESPONSE_PREVIEW_CHARS else "")
        logger.warning(
            "reward term %r: %s on sample %d (%s); scored reward.fallback_score=%s. Response starts: %r. "
            "Further %s events of this term are only counted (reward/* metrics).",
            term,
            kind,
            index,
            message,
            self.cfg.fallback_score,
            preview,
            kind,
        )
