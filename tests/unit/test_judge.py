"""The generative judge against a real HTTP server process speaking the OpenAI chat API.

This file is also the server: `python test_judge.py --serve` starts a stdlib
ThreadingHTTPServer on a free port and prints "PORT <n>". Its "judge" is a fixed rule
over the graded solution text (markers choose the behaviour, so one server covers all modes):
  [[RIGHT]] -> "SCORE: 1"      [[WRONG]] -> "Score = 0/10"      [[HALF]] -> "**Score:** 0.5"
  [[MALFORMED]] -> prose without a score       [[GARBAGE]] -> a non-JSON body
  [[SLOW]] -> sleeps 5 s before answering      [[FAIL_ONCE]] -> HTTP 503 the first time
A request with an Authorization header other than "Bearer $JUDGE_SERVER_KEY" gets HTTP 401
(the body echoes the header back).
GET /stats returns the number of chat requests per marker and the authorization headers seen.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MARKERS = ("RIGHT", "WRONG", "HALF", "MALFORMED", "GARBAGE", "SLOW", "FAIL_ONCE")


def serve() -> None:
    lock = threading.Lock()
    stats: dict = {"chat": {}, "auth": [], "models": 0}
    failed_once: set[str] = set()
    expected_key = os.environ.get("JUDGE_SERVER_KEY", "")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep the test output clean
            pass

        def _send(self, code: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _authorized(self) -> bool:
            auth = self.headers.get("Authorization")
            with lock:
                stats["auth"].append(auth)
            return auth is None or auth == f"Bearer {expected_key}"

        def do_GET(self):
            if self.path == "/stats":
                with lock:
                    self._send(200, json.dumps(stats).encode())
            elif self.path == "/v1/models":
                with lock:
                    stats["models"] += 1
                self._send(
                    200, json.dumps({"object": "list", "data": [{"id": "tiny-judge", "object": "model"}]}).encode()
                )
            else:
                self._send(404, b'{"error": "not found"}')

        def do_POST(self):
            length = int(self.headers.get("Content-Length", 0))
            request = json.loads(self.rfile.read(length))
            if self.path != "/v1/chat/completions":
                return self._send(404, b'{"error": "not found"}')
            if not self._authorized():
                # Echo the header back, as some real servers do: the client must redact it.
                body = {"error": "invalid api key", "received": self.headers.get("Authorization")}
                return self._send(401, json.dumps(body).encode())
            if request.get("model") != "tiny-judge":
                return self._send(404, json.dumps({"error": f"model {request.get('model')} not served"}).encode())
            text = request["messages"][-1]["content"]
            # The rubric places the solution after "Solution to grade:"; judge only that part.
            solution = text.split("Solution to grade:")[-1]
            marker = next((m for m in MARKERS if f"[[{m}]]" in solution), "NONE")
            with lock:
                stats["chat"][marker] = stats["chat"].get(marker, 0) + 1
                first_failure = marker == "FAIL_ONCE" and solution not in failed_once
                failed_once.add(solution)
            if marker == "SLOW":
                time.sleep(5)
            if marker == "GARBAGE":
                return self._send(200, b"<html>oops</html>", "text/html")
            if first_failure:
                return self._send(503, b'{"error": "overloaded"}')
            content = {
                "RIGHT": "The final answer matches.\nSCORE: 1",
                "WRONG": "Score = 0/10",
                "HALF": "Partly right. **Score:** 0.5",
                "FAIL_ONCE": "SCORE: 0.75",
                "SLOW": "SCORE: 1",
            }.get(marker, "I think this solution is quite nice overall!")
            reply = {
                "id": "x",
                "object": "chat.completion",
                "model": "tiny-judge",
                "choices": [
                    {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}
                ],
            }
            self._send(200, json.dumps(reply).encode())

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):
            # A client that gave up on a [[SLOW]] reply closed its socket: expected, not noise.
            if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                super().handle_error(request, client_address)

    server = Server(("127.0.0.1", 0), Handler)
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__" and "--serve" in sys.argv:
    serve()
    sys.exit(0)


# ------------------------------------------------------------------------------------------------
# Tests

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from nemo_igrpo.rewards.base import RewardSample  # noqa: E402
from nemo_igrpo.rewards.config import JudgeConfig, RewardConfig, RewardTermConfig  # noqa: E402
from nemo_igrpo.rewards.judge import JudgeClient, MalformedJudgeReply, parse_score  # noqa: E402
from nemo_igrpo.rewards.manager import RewardManager  # noqa: E402

SERVER_KEY = "sk-test-judge-4242"


@pytest.fixture(scope="module")
def judge_url():
    env = dict(os.environ, JUDGE_SERVER_KEY=SERVER_KEY)
    proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, env=env, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("PORT "), f"judge server did not start: {line!r}"
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        proc.kill()
        proc.wait(timeout=10)


def stats(url: str) -> dict:
    return httpx.get(f"{url}/stats").json()


def config(url: str, **overrides) -> JudgeConfig:
    cfg = JudgeConfig(url=url, timeout_s=2.0, max_retries=2, retry_backoff_s=0.05, max_concurrent_requests=8)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@pytest.mark.parametrize(
    "reply,score",
    [
        ("SCORE: 1", 1.0),
        ("score: 0.25", 0.25),
        ("Score = 7/10", 0.7),
        ("**Score:** 0.5", 0.5),
        ("Reasoning...\nScore: 0.2\nOn reflection, SCORE: 0.9", 0.9),
        ('{"score": 0.3}', 0.3),
        ("0.6", 0.6),
        ("3/4", 0.75),
        (" 1. ", 1.0),
    ],
)
def test_parse_score_accepts(reply, score):
    assert parse_score(reply) == pytest.approx(score)


@pytest.mark.parametrize(
    "reply", ["", "looks good", "SCORE: 7", "Score: -0.5", "8", "score: 1/0", '{"score": true}', "SCORE: nan"]
)
def test_parse_score_rejects(reply):
    with pytest.raises(MalformedJudgeReply):
        parse_score(reply)


def test_good_replies_concurrent_batch_and_model_discovery(judge_url):
    with JudgeClient(config(judge_url)) as client:
        prompts = [f"problem {i}" for i in range(6)]
        responses = ["[[RIGHT]] a", "[[WRONG]] b", "[[HALF]] c", "[[RIGHT]] d", "[[WRONG]] e", "[[HALF]] f"]
        result = client.score_batch(prompts, responses, ["12"] * 6)
        assert result.scores == [1.0, 0.0, 0.5, 1.0, 0.0, 0.5]
        assert result.statuses == ["ok"] * 6 and result.first_error is None
        assert client.model() == "tiny-judge"


def test_cache_and_deduplication(judge_url):
    with JudgeClient(config(judge_url)) as client:
        before = stats(judge_url)["chat"].get("RIGHT", 0)
        first = client.score_batch(["p", "p", "p2"], ["[[RIGHT]] same", "[[RIGHT]] same", "[[RIGHT]] other"], [1, 1, 1])
        assert first.scores == [1.0, 1.0, 1.0] and first.requests == 2  # the duplicate was sent once
        again = client.score_batch(["p", "p2"], ["[[RIGHT]] same", "[[RIGHT]] other"], [1, 1])
        assert again.statuses == ["cached", "cached"] and again.requests == 0
        assert stats(judge_url)["chat"]["RIGHT"] - before == 2


def test_malformed_and_garbage_replies_are_errors_not_retried(judge_url):
    with JudgeClient(config(judge_url)) as client:
        before = stats(judge_url)["chat"]
        result = client.score_batch(["p", "p", "p"], ["[[MALFORMED]]", "[[GARBAGE]]", "[[RIGHT]] ok"], [1, 1, 1])
        assert math.isnan(result.scores[0]) and math.isnan(result.scores[1]) and result.scores[2] == 1.0
        assert result.statuses == ["error", "error", "ok"]
        assert result.first_error[0] == 0 and "no score" in result.first_error[1]
        after = stats(judge_url)["chat"]
        assert after["MALFORMED"] - before.get("MALFORMED", 0) == 1
        assert after["GARBAGE"] - before.get("GARBAGE", 0) == 1


def test_transient_server_error_is_retried(judge_url):
    with JudgeClient(config(judge_url)) as client:
        result = client.score_batch(["p"], ["[[FAIL_ONCE]] x"], [1])
        assert result.scores == [0.75] and result.requests == 2


def test_slow_server_times_out_within_the_retry_budget(judge_url):
    with JudgeClient(config(judge_url, timeout_s=0.5, max_retries=1)) as client:
        started = time.monotonic()
        result = client.score_batch(["p", "p"], ["[[SLOW]]", "[[RIGHT]] fast"], [1, 1])
        elapsed = time.monotonic() - started
    assert result.statuses == ["timeout", "ok"] and math.isnan(result.scores[0]) and result.scores[1] == 1.0
    assert elapsed < 2.5  # 2 attempts x 0.5 s + 0.05 s backoff, not the server's 5 s


def test_server_down_is_an_error_after_retries():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with JudgeClient(config(f"http://127.0.0.1:{port}", model="m", max_retries=2)) as client:
        started = time.monotonic()
        result = client.score_batch(["p"], ["[[RIGHT]]"], [1])
        assert time.monotonic() - started < 2.0
    assert result.statuses == ["error"] and "unreachable" in result.first_error[1]


def test_api_key_from_env_is_sent_and_never_logged(judge_url, monkeypatch, caplog):
    monkeypatch.setenv("IGRPO_TEST_JUDGE_KEY", SERVER_KEY)
    with caplog.at_level(logging.DEBUG):
        with JudgeClient(config(judge_url, api_key_env="IGRPO_TEST_JUDGE_KEY")) as client:
            assert client.score_batch(["p"], ["[[RIGHT]] keyed"], [1]).scores == [1.0]
            assert SERVER_KEY not in repr(client) and SERVER_KEY not in repr(client.cfg)
        assert f"Bearer {SERVER_KEY}" in stats(judge_url)["auth"]
        monkeypatch.setenv("IGRPO_TEST_JUDGE_KEY", "sk-wrong-key-1111")
        with JudgeClient(config(judge_url, api_key_env="IGRPO_TEST_JUDGE_KEY")) as client:
            result = client.score_batch(["p"], ["[[RIGHT]] wrong key"], [1])
        assert result.statuses == ["error"] and "HTTP 401" in result.first_error[1]
        assert "Bearer <api key>" in result.first_error[1]  # the echoed header, redacted
        assert "sk-wrong-key-1111" not in result.first_error[1]
    assert SERVER_KEY not in caplog.text and "sk-wrong-key-1111" not in caplog.text
    monkeypatch.delenv("IGRPO_TEST_JUDGE_KEY")
    with pytest.raises(ValueError, match="environment variable 'IGRPO_TEST_JUDGE_KEY' is not set"):
        JudgeClient(config(judge_url, api_key_env="IGRPO_TEST_JUDGE_KEY"))


def test_judge_term_in_reward_manager_with_fallback(judge_url, caplog):
    cfg = RewardConfig(
        terms=[RewardTermConfig("math_accuracy", 1.0), RewardTermConfig("judge", 1.0, kwargs={"max_retries": 0})],
        num_workers=1,
        timeout_s=5.0,
        fallback_score=0.0,
        judge=config(judge_url),
    )
    samples = [
        RewardSample("1+1?", "<answer>2</answer> [[RIGHT]]", 2),
        RewardSample("1+1?", "<answer>3</answer> [[WRONG]]", 2),
        RewardSample("1+1?", "<answer>2</answer> [[MALFORMED]]", 2),
    ]
    with caplog.at_level(logging.WARNING, logger="nemo_igrpo.rewards.manager"):
        with RewardManager(cfg) as manager:
            out = manager.score(samples)
    np.testing.assert_array_equal(out.per_term["judge"], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(out.per_term["math_accuracy"], [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(out.scores, [2.0, 0.0, 1.0])
    assert out.metrics["reward/errors"] == 1 and out.metrics["reward/judge_requests"] == 3
    assert any("'judge': error on sample 2" in r.getMessage() for r in caplog.records)
