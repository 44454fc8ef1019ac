"""`judge`: a generative judge behind an OpenAI-compatible chat API scores each solution in [0, 1].

The paper's judge ablation replaced the rule-based reward with GPT-5 scoring each solution in
[0, 1]. Here any server speaking `POST /v1/chat/completions` works (vLLM, TRT-LLM, a hosted
API). The RewardManager runs this term in the trainer process (it is I/O bound), on threads,
concurrently with the worker processes that compute the other terms.

- Rubric: `JudgeConfig.rubric` (None: `DEFAULT_RUBRIC`), a text in which `{prompt}`,
  `{response}` and `{reference}` are replaced (plain replacement, so LaTeX braces are safe).
- Concurrency: up to `max_concurrent_requests` requests in flight; identical (prompt,
  response) pairs in a batch are requested once.
- Retries: connection errors, timeouts, HTTP 429 and 5xx are retried `max_retries` times,
  sleeping `retry_backoff_s * 2**k`. Other HTTP errors and malformed replies are not retried.
- Cache: successful scores are kept per (prompt, response), up to `cache_size` entries.
- API key: read from the environment variable named by `api_key_env` and sent as a bearer
  token. It is never logged, never part of an error message, and not stored in the config.
- Failures: a sample whose request failed or whose reply holds no score in [0, 1] gets NaN
  here, which the manager replaces with `reward.fallback_score` and counts.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from typing import Any, Optional, Sequence

import httpx

from nemo_igrpo.rewards.config import JudgeConfig
from nemo_igrpo.rewards.registry import register_reward
from nemo_igrpo.utils.http import RetryableStatus, call_with_retries, is_retryable_status

DEFAULT_RUBRIC = """You are grading a solution to a problem.

Problem:
{prompt}

Reference answer:
{reference}

Solution to grade:
{response}

Decide whether the solution's final answer is correct (equivalent to the reference answer) and
its reasoning is sound. Reply with exactly one line of the form
SCORE: <number between 0 and 1>
where 1 means fully correct and 0 means wrong."""

_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_SCORE_LINE = re.compile(rf"score\s*\**\s*[:=]?\s*\**\s*({_NUMBER})(?:\s*/\s*({_NUMBER}))?", re.IGNORECASE)
_BARE_NUMBER = re.compile(rf"\s*\**\s*({_NUMBER})(?:\s*/\s*({_NUMBER}))?\s*\**\s*\.?\s*")


class MalformedJudgeReply(ValueError):
    pass


def parse_score(reply: str) -> float:
    """The score in [0, 1] in a judge's reply; raises MalformedJudgeReply if there is none.

    Accepted: a JSON object with "score"; "SCORE: 0.8" / "Score = 7/10" / "**Score:** 1"
    anywhere (the last one wins, as models restate); or a reply that is just a number or a
    fraction ("0.5", "3/4"). A number outside [0, 1] without a denominator is rejected rather
    than guessed at (is "7" out of 10 or out of 100?).
    """
    text = reply.strip()
    candidates: list[tuple[str, Optional[str]]] = []
    if text.startswith("{"):
        try:
            obj = json.loads(text)
            if (
                isinstance(obj, dict)
                and isinstance(obj.get("score"), (int, float))
                and not isinstance(obj["score"], bool)
            ):
                candidates.append((repr(float(obj["score"])), None))
        except json.JSONDecodeError:
            pass
    if not candidates:
        matches = _SCORE_LINE.findall(text)
        if matches:
            candidates.append(matches[-1])
    if not candidates:
        bare = _BARE_NUMBER.fullmatch(text)
        if bare:
            candidates.append((bare.group(1), bare.group(2)))
    if not candidates:
        raise MalformedJudgeReply(f"no score in the judge's reply {text[:120]!r}")
    numerator, denominator = candidates[0]
    value = float(numerator)
    if denominator:
        den = float(denominator)
        if den <= 0:
            raise MalformedJudgeReply(f"score with a zero/negative denominator in {text[:120]!r}")
        value /= den
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise MalformedJudgeReply(f"score {value} outside [0, 1] in the judge's reply {text[:120]!r}")
    return value


@dataclass
class JudgeResult:
    scores: list[float]  # NaN where the judge gave no usable score
    statuses: list[str]  # "ok", "cached", "timeout", "error"
    first_error: Optional[tuple[int, str]]  # (sample index, message)
    requests: int  # chat-completion requests sent, retries included (model discovery not counted)


class JudgeClient:
    """Thread-safe client; create one per run and `close()` it (or use it as a context manager)."""

    def __init__(self, cfg: JudgeConfig):
        self.cfg = cfg
        api_key = None
        if cfg.api_key_env:
            api_key = os.environ.get(cfg.api_key_env)
            if not api_key:
                raise ValueError(
                    f"reward.judge.api_key_env: environment variable '{cfg.api_key_env}' is not set or empty"
                )
        base = cfg.url.rstrip("/")
        api_root = base if base.endswith("/v1") else base + "/v1"
        self._chat_url, self._models_url = api_root + "/chat/completions", api_root + "/models"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # Server-provided text (an error body, a reply) goes into error messages and logs; a
        # server that echoes request headers must not leak the key through them.
        self._redact = (lambda text: text.replace(api_key, "<api key>")) if api_key else (lambda text: text)
        # The key lives only inside the httpx client's headers; it is not kept on self.
        self._http = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(cfg.timeout_s),
            limits=httpx.Limits(max_connections=cfg.max_concurrent_requests),
        )
        self._pool = ThreadPoolExecutor(max_workers=cfg.max_concurrent_requests, thread_name_prefix="reward-judge")
        self._cache: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._model: Optional[str] = cfg.model
        self._requests = 0

    def __repr__(self) -> str:
        return f"JudgeClient(url={self.cfg.url!r}, model={self._model!r})"

    def __enter__(self) -> "JudgeClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    # --- HTTP with retries ---------------------------------------------------------------
    def _send(self, method: str, url: str, payload: Optional[dict] = None) -> dict:
        def once() -> httpx.Response:
            if url == self._chat_url:
                with self._lock:
                    self._requests += 1
            try:
                reply = self._http.request(method, url, json=payload)
            except httpx.TimeoutException as e:
                raise TimeoutError(
                    f"judge request timed out after {self.cfg.timeout_s}s ({type(e).__name__})"
                ) from None
            except httpx.TransportError as e:
                raise ConnectionError(f"judge server {self.cfg.url} unreachable ({type(e).__name__}: {e})") from None
            if is_retryable_status(reply.status_code):
                raise RetryableStatus(reply.status_code, f"judge server answered HTTP {reply.status_code}")
            return reply

        reply = call_with_retries(
            once,
            retries=self.cfg.max_retries,
            backoff_s=self.cfg.retry_backoff_s,
            transient=(TimeoutError, ConnectionError, RetryableStatus),
            what=f"judge {method} {url}",
        )
        if reply.status_code != 200:
            raise RuntimeError(f"judge server answered HTTP {reply.status_code}: {self._redact(reply.text)[:200]}")
        try:
            return reply.json()
        except ValueError:
            raise MalformedJudgeReply(f"judge server sent non-JSON body {self._redact(reply.text)[:120]!r}") from None

    def model(self) -> str:
        """The configured model, or the first one the server lists (asked once)."""
        with self._model_lock:
            if self._model is None:
                self._model = self._discover_model()
        return self._model

    def _discover_model(self) -> str:
        listing = self._send("GET", self._models_url)
        try:
            return str(listing["data"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise MalformedJudgeReply("judge server's /v1/models lists no model; set reward.judge.model") from None

    def _rubric_text(self, prompt: str, response: str, reference: Any) -> str:
        template = self.cfg.rubric or DEFAULT_RUBRIC
        # Sequential replacement would let a response containing "{reference}" pull the
        # reference into itself; one pass over the template avoids that.
        values = {
            "{prompt}": prompt,
            "{response}": response,
            "{reference}": "" if reference is None else str(reference),
        }
        return re.sub(r"\{prompt\}|\{response\}|\{reference\}", lambda m: values[m.group(0)], template)

    def score_one(self, prompt: str, response: str, reference: Any) -> float:
        """The judge's score; raises on failure (TimeoutError, ConnectionError, MalformedJudgeReply...)."""
        key = (prompt, response)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        body = self._send(
            "POST",
            self._chat_url,
            {
                "model": self.model(),
                "messages": [{"role": "user", "content": self._rubric_text(prompt, response, reference)}],
                "max_tokens": self.cfg.max_tokens,
                "temperature": self.cfg.temperature,
            },
        )
        try:
            reply = body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise MalformedJudgeReply(
                f"judge reply has no choices[0].message.content: {self._redact(json.dumps(body))[:200]}"
            ) from None
        if not isinstance(reply, str):
            raise MalformedJudgeReply(f"judge reply content is {type(reply).__name__}, not text")
        score = parse_score(self._redact(reply))
        with self._lock:
            self._cache[key] = score
            while len(self._cache) > self.cfg.cache_size:
                self._cache.popitem(last=False)
        return score

    def score_batch(self, prompts: Sequence[str], responses: Sequence[str], references: Sequence[Any]) -> JudgeResult:
        """Scores for a batch, concurrently; never raises for a per-sample failure."""
        n = len(prompts)
        scores, statuses = [math.nan] * n, ["error"] * n
        first_error: Optional[tuple[int, str]] = None
        requests_before = self._requests
        unique: dict[tuple[str, str], list[int]] = {}
        for i in range(n):
            unique.setdefault((prompts[i], responses[i]), []).append(i)
        with self._lock:
            cached = {key: self._cache[key] for key in unique if key in self._cache}
        futures = {
            key: self._pool.submit(self.score_one, key[0], key[1], references[idx[0]])
            for key, idx in unique.items()
            if key not in cached
        }
        for key, indices in unique.items():
            status, value, message = "cached", cached.get(key), None
            if key in futures:
                try:
                    value, status = futures[key].result(), "ok"
                except TimeoutError as e:
                    status, message = "timeout", str(e)
                except Exception as e:  # noqa: BLE001 - any failure becomes this sample's fallback
                    status, message = "error", f"{type(e).__name__}: {e}"
            for i in indices:
                statuses[i] = status
                if value is not None:
                    scores[i] = value
                if message is not None and (first_error is None or i < first_error[0]):
                    first_error = (i, message)
        return JudgeResult(scores, statuses, first_error, self._requests - requests_before)


def judge_config_with(base: JudgeConfig, overrides: dict[str, Any]) -> JudgeConfig:
    """`base` with a judge term's kwargs applied; unknown keys are an error naming them."""
    known = {f.name for f in fields(JudgeConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"judge term kwargs {unknown} are not JudgeConfig fields ({', '.join(sorted(known))})")
    return replace(base, **overrides)


_clients: dict[str, JudgeClient] = {}
_clients_lock = threading.Lock()


@register_reward("judge")
def judge(prompt: str, response: str, reference: Any, **kwargs: Any) -> float:
    """Per-sample form, for use outside the RewardManager (which batches through JudgeClient).

    kwargs are JudgeConfig fields. Raises when the judge gives no usable score.
    """
    cfg = judge_config_with(JudgeConfig(), kwargs)
    key = repr(cfg)
    with _clients_lock:
        if key not in _clients:
            _clients[key] = JudgeClient(cfg)
        client = _clients[key]
    return client.score_one(prompt, response, reference)
