"""code_tests: real sandboxed runs of untrusted solutions (bubblewrap, parent-side judging).

The escape table at the end: each attack's `add` is correct only if its escape worked, so a
score of 0 says the escape failed and the judging held; side effects are checked on the host.
Limits are generous for a loaded 2-core machine (a sandbox start is ~60 ms idle).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest

from nemo_igrpo.rewards import sandbox
from nemo_igrpo.rewards.code import code_tests, extract_code, parse_reference, parse_tests, run_tests

TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(-1, 1) == 0", "assert add(0, 5) == 5"]
CORRECT = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return a - b\n"

# Wall-clock limits generous for a loaded 2-core machine; CPU time (cpu_s) is what stops busy loops.
LIMITS = dict(timeout_s=12.0, cpu_s=3, memory_mb=256, per_test_timeout_s=3.0)


def fenced(code: str) -> str:
    return f"<think>easy</think>\nHere is my solution:\n```python\n{code}```\n<answer>see above</answer>"


def score(code: str, reference=TESTS, **overrides) -> float:
    return code_tests("q", fenced(code), reference, **{**LIMITS, **overrides})


# ---------------------------------------------------------------------------------------------
# Scores of honest solutions and the reference formats


def test_correct_solution_scores_one_and_wrong_zero():
    assert score(CORRECT) == 1.0
    assert score(WRONG) == 0.0
    assert score("def add(a, b):\n    return a + b if a > 0 else 99\n") == 0.5


def test_reference_as_snippet_and_dict():
    snippet = (
        "import math\nBASE = 2\nassert add(BASE, 1) == 3\nassert add(1, 1) == math.floor(2.5)\nassert add(1, 1) == 3\n"
    )
    assert [kind for kind, _ in parse_tests(snippet)] == ["setup", "setup", "test", "test", "test"]
    assert run_tests(CORRECT, snippet, **LIMITS)[:2] == (2, 3)
    assert run_tests(CORRECT, {"setup": "K = 10", "tests": ["assert add(K, 1) == 11"]}, **LIMITS)[:2] == (1, 1)
    assert run_tests(CORRECT, '["assert add(1, 1) == 2"]', **LIMITS)[:2] == (1, 1)  # JSON string column


def test_assert_shapes_judged_in_the_parent_or_the_reference_sandbox():
    reference = {
        "setup": "import math\nexpected = 11\ns = Stack()\ns.push(3)\ndef helper(x):\n    return add(x, 1)\n",
        "tests": [
            "assert add(10, 1) == expected",
            "assert not is_prime(8)",
            "assert is_prime(7)",
            "assert all(add(x, x) == 2 * x for x in range(3))",
            "assert isinstance(add(1, 1), int)",
            "assert math.isclose(add(0.1, 0.2), 0.3)",
            "assert s.pop() == 3",
            "assert helper(1) == 2",
            "x = add(1, 2)\nassert x == 3\nassert x > 2",
            "add(1, 2)",
            "assert add((1,), (2,)) == (1, 2)",
            "assert add(1, 2) == 4",
            "assert (",
            "assert sorted(add([3], [1])) == [1, 3]",
        ],
    }
    solution = CORRECT + textwrap.dedent("""
        def is_prime(n):
            return n > 1 and all(n % d for d in range(2, n))
        class Stack(list):
            push = list.append
        """)
    passed, total, lines = run_tests(solution, reference, **LIMITS)
    assert (passed, total) == (12, 14), lines
    assert [line.split()[1] for line in lines][-3:] == ["FAIL", "FAIL", "PASS"]


def test_function_call_and_stdio_references():
    calls = {"fn_name": "add", "inputs": [[1, 2], [[1], [2]], [2, 2]], "outputs": [3, [1, 2], 5]}
    assert run_tests(CORRECT, calls, **LIMITS)[:2] == (2, 3)
    leetcode = "class Solution:\n    def add(self, a, b):\n        return a + b\n"
    assert run_tests(leetcode, calls, **LIMITS)[:2] == (2, 3)
    stdio = {"inputs": ["1 2\n", "3 4\n", "5 5\n"], "outputs": ["3\n", "7", "11\n"]}
    program = "a, b = map(int, input().split())\nprint(a + b)\n"
    assert run_tests(program, stdio, **LIMITS)[:2] == (2, 3)
    assert run_tests(program + "raise SystemExit(3)\n", stdio, **LIMITS)[:2] == (0, 3)
    assert run_tests(program, '{"inputs": ["1 1"], "outputs": ["2"]}', **LIMITS)[:2] == (1, 1)
    assert parse_reference(calls).kind == "calls" and parse_reference(stdio).kind == "stdio"


def test_bad_references_are_clear_errors():
    with pytest.raises(ValueError, match="no tests"):
        parse_tests([])
    with pytest.raises(ValueError, match="no tests"):
        parse_tests("x = 1\n")
    with pytest.raises(ValueError, match="not valid Python"):
        parse_tests("assert (")
    with pytest.raises(ValueError, match="test 1 of the reference is a int"):
        parse_tests(["assert True", 3])
    with pytest.raises(ValueError, match="same length"):
        parse_reference({"inputs": ["1"], "outputs": []})
    with pytest.raises(ValueError, match="network_namespace"):
        run_tests(CORRECT, TESTS, network_namespace="sometimes")


def test_code_extraction():
    assert extract_code("```python\na = 1\n```\ntext\n```py\nb = 2\n```") == "b = 2\n"
    assert extract_code("```python\na = 1\n```\n```\nb = 2\n```", "first") == "a = 1\n"
    assert extract_code("```python\na = 1\n```\n```python\nb = 2\n```", "all") == "a = 1\n\n\nb = 2\n"
    assert extract_code("```bash\nls\n```<answer>x = 3</answer>") == "x = 3"
    assert extract_code("x = 4") == "x = 4"


def test_partial_credit_survives_a_hang_in_a_later_test():
    hangs_on_zero = "def add(a, b):\n    while a == 0:\n        pass\n    return a + b\n"
    passed, total, _ = run_tests(hangs_on_zero, TESTS, **{**LIMITS, "timeout_s": 3.0, "per_test_timeout_s": None})
    assert (passed, total) == (3, 4)


def test_scratch_files_in_the_private_tmp_are_allowed():
    uses_scratch = (
        "def add(a, b):\n    with open('scratch.txt', 'w') as f:\n        f.write(str(a + b))\n"
        "    return int(open('/tmp/scratch.txt').read())\n"
    )
    assert score(uses_scratch) == 1.0


def test_clean_environment_and_stdlib_available(monkeypatch):
    monkeypatch.setenv("IGRPO_SECRET_TOKEN", "do-not-leak")
    probe = (
        "import os, json, collections, dataclasses, re, math, itertools, functools, heapq, sqlite3, ctypes\n"
        "def add(a, b):\n    assert 'IGRPO_SECRET_TOKEN' not in os.environ\n"
        "    assert os.getcwd() == os.environ['HOME'] == '/tmp'\n    return a + b\n"
    )
    assert score(probe) == 1.0


def test_sandbox_unavailable_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    sandbox._checked.cache_clear()
    try:
        with pytest.raises(sandbox.SandboxUnavailableError, match="bubblewrap"):
            score(CORRECT)
    finally:
        sandbox._checked.cache_clear()


# ---------------------------------------------------------------------------------------------
# The escape table


@pytest.fixture()
def victim():
    """A host process the solutions try to kill or signal (stands in for the trainer)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture()
def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.setblocking(False)
    yield server
    server.close()


def _leftovers(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:  # gone, a zombie, or not ours to read
            pass
    return found


def _status(proc: psutil.Process):
    try:
        return proc.status()
    except psutil.Error:
        return None


def _is_inner_python(proc: psutil.Process) -> bool:
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return False
    return (
        bool(cmd) and "python" in Path(cmd[0]).name and any(part.endswith("/igrpo/_sandbox_runner.py") for part in cmd)
    )


def _runner_processes(parent_pid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.Process(parent_pid).children(recursive=True):
        try:
            if any("_sandbox_runner" in part for part in proc.cmdline()):
                found.append(proc)
        except psutil.Error:  # a bwrap stage exiting between the listing and the read
            pass
    return found


# Each entry: (class, attack). `{...}` fields are filled per run. The attack's `add` is correct
# only if the escape succeeded (or forges a pass), so every entry must score 0.
ESCAPES = {
    # forged results: the solution owns its interpreter, not the judging
    "replace_builtins": """
        import builtins
        builtins.isinstance = lambda *a: True
        builtins.exec = builtins.eval = builtins.compile = lambda *a, **k: None
        builtins.AssertionError = type("Never", (Exception,), {{}})
        def add(a, b):
            return a - b
        """,
    "always_equal_object": """
        class Anything:
            def __eq__(self, other):
                return True
            __hash__ = object.__hash__
        class Int(int):
            def __eq__(self, other):
                return True
        def add(a, b):
            return Anything() if a > 0 else Int(-999)
        """,
    "harness_frames_and_gc": """
        import gc, signal, sys
        found = []
        def scan(frame):
            while frame is not None:
                found.extend(v for v in frame.f_locals.values() if type(v) in (int, str))
                frame = frame.f_back
        signal.signal(signal.SIGALRM, lambda s, f: scan(f))
        signal.setitimer(signal.ITIMER_REAL, 0.001)
        import time; time.sleep(0.05)
        scan(sys._getframe())
        secrets = [o for o in gc.get_objects() if isinstance(o, dict) and ("nonce" in o or "expected" in o)]
        def add(a, b):
            return (a + b) if secrets else a - b
        """,
    "forged_channel_records": """
        import os
        forged = b'["loaded"]\\n' + b"".join(b'["ok",%d,true]\\n["judge",%d,true]\\n' % (i, i) for i in range(8))
        for fd in range(0, 32):
            try:
                os.write(fd, forged)
            except OSError:
                pass
        print("0 PASS\\n1 PASS\\n2 PASS\\n3 PASS")
        def add(a, b):
            return True
        """,
    "exit_early": """
        import os, sys
        def add(a, b):
            os._exit(0)
        sys.exit(0)
        """,
    # writes outside the work dir
    "write_outside": """
        import os, sqlite3, sys
        ok = False
        for path in ({host_file!r}, os.path.join(sys.base_prefix, "igrpo-pwned"), "/igrpo/_sandbox_runner.py",
                     "/usr/igrpo-pwned", "/igrpo-pwned", "/dev/igrpo-pwned"):
            try:
                with open(path, "w") as f:
                    f.write("pwned")
                ok = True
            except OSError:
                pass
            try:
                fd = os.open(os.path.dirname(path), os.O_RDONLY)
                os.close(os.open(os.path.basename(path), os.O_WRONLY | os.O_CREAT, dir_fd=fd))
                ok = True
            except OSError:
                pass
            try:
                sqlite3.connect(path + ".db").execute("create table t(x)")
                ok = True
            except Exception:
                pass
        def add(a, b):
            return a + b if ok else a - b
        """,
    # native code, from a library the solution copied into its own directory
    "native_code": """
        import ctypes, ctypes.util, os, shutil
        shutil.copy("/lib/x86_64-linux-gnu/libc.so.6" if os.path.exists("/lib/x86_64-linux-gnu/libc.so.6")
                    else ctypes.util.find_library("c"), "/tmp/mine.so")
        libc = ctypes.CDLL("/tmp/mine.so")
        hit = libc.kill({victim_pid}, 9) == 0
        fd = libc.open({host_file!r}.encode(), os.O_WRONLY | os.O_CREAT, 0o644)
        hit = hit or fd >= 0
        def add(a, b):
            return a + b if hit else a - b
        """,
    # processes
    "spawn_kill_and_pidfd": """
        import os, signal, subprocess
        hit = False
        try:
            hit = subprocess.run(["sh", "-c", "kill -9 {victim_pid} && touch {host_file}"]).returncode == 0
        except Exception:
            pass
        for attempt in (lambda: os.kill({victim_pid}, 9), lambda: os.killpg(0, 0),
                        lambda: signal.pidfd_send_signal(os.pidfd_open({victim_pid}), 9)):
            try:
                attempt()
                hit = hit or attempt is not None and os.path.exists("/proc/{victim_pid}")
            except Exception:
                pass
        def add(a, b):
            return a + b if hit else a - b
        """,
    "setsid_detach": """
        import os, subprocess, sys
        subprocess.Popen(["setsid", sys.executable, "-c", "import time; time.sleep(60)  # {marker}"],
                         start_new_session=True)
        if os.fork() == 0:
            os.setsid()
            os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)  # {marker}"])
        def add(a, b):
            return a - b
        """,
    "fork_storm": """
        import os, time
        made = 0
        for _ in range(300):
            try:
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                made += 1
            except OSError:
                break
        def add(a, b):
            return a + b if made >= 50 else a - b
        """,
    # secrets
    "read_parent_environment": """
        import glob, os
        seen = str(dict(os.environ))
        for path in glob.glob("/proc/*/environ") + ["/proc/{parent_pid}/environ"]:
            try:
                seen += open(path, "rb").read().decode(errors="replace")
            except OSError:
                pass
        try:
            seen += open({secret_file!r}).read()
        except OSError:
            pass
        def add(a, b):
            return a + b if "{secret}" in seen else a - b
        """,
    "network_to_host": """
        import socket
        try:
            socket.create_connection(("127.0.0.1", {port}), timeout=1).close()
            reached = True
        except OSError:
            reached = False
        def add(a, b):
            return a + b if reached else a - b
        """,
    # resources
    "memory_bomb": """
        hog = []
        while True:
            hog.append(bytearray(50 * 1024 * 1024))
        """,
    "infinite_loop_swallowing_the_alarm": """
        def add(a, b):
            while True:
                try:
                    while True:
                        pass
                except BaseException:
                    pass
        """,
    "huge_output": """
        import os, sys
        block = b"x" * (1 << 20)
        for _ in range(100):
            for fd in range(1, 16):
                try:
                    os.write(fd, block)
                except OSError:
                    pass
        def add(a, b):
            return a - b
        """,
    "huge_return_value": """
        def add(a, b):
            return "x" * (50 * 1024 * 1024)
        """,
    "fill_the_tmpfs": """
        with open("big", "wb") as f:
            for _ in range(200):
                f.write(b"x" * (1 << 20))
        """,
}


@pytest.mark.parametrize("name", list(ESCAPES))
def test_escape_is_contained(name, victim, listener, tmp_path, monkeypatch):
    secret = uuid.uuid4().hex
    marker = f"igrpo-escape-{uuid.uuid4().hex}"
    monkeypatch.setenv("IGRPO_TEST_SECRET", secret)
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text(secret)
    host_file = tmp_path / "pwned.txt"
    attack = textwrap.dedent(ESCAPES[name]).format(
        victim_pid=victim.pid,
        host_file=str(host_file),
        marker=marker,
        parent_pid=os.getpid(),
        secret=secret,
        secret_file=str(secret_file),
        port=listener.getsockname()[1],
    )
    before_tmp = set(os.listdir("/tmp"))
    started = time.monotonic()
    passed, total, lines = run_tests(extract_code(fenced(attack)), TESTS, **LIMITS)
    assert passed == 0, (name, lines)
    elapsed = time.monotonic() - started
    # Contained: within the wall limit (plus slack for a loaded machine), nothing touched outside.
    assert elapsed < LIMITS["timeout_s"] + 15, elapsed
    assert victim.poll() is None, "the host process was killed"
    assert not host_file.exists()
    with pytest.raises(BlockingIOError):
        listener.accept()
    deadline = time.monotonic() + 5
    while _leftovers(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _leftovers(marker), "a detached process outlived the sandbox"
    # The old sandbox's host temp dir leaked when its parent was killed; this one makes none.
    # (Only our old prefix: other tests running concurrently make their own igrpo-* dirs.)
    assert not {d for d in set(os.listdir("/tmp")) - before_tmp if d.startswith("igrpo-code-")}


def test_process_limit_holds_per_sandbox():
    # 8 processes allowed (the runner and bwrap's init count): a storm gets a few, not 300.
    counts = """
        import os, time
        made = 0
        for _ in range(300):
            try:
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                made += 1
            except OSError:
                break
        def add(a, b):
            return made
        """
    _, _, lines = run_tests(textwrap.dedent(counts), ["assert add(0, 0) < 8"], **LIMITS)
    assert lines == ["0 PASS"]


def test_sandbox_does_not_outlive_a_killed_parent():
    # The RewardManager kills a hung worker: the sandbox must not outlive its wall-clock budget
    # (10 s here) without the parent that would have killed it (bwrap's --die-with-parent, and
    # the runner's in-sandbox watchdog at the budget + 5 s).
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "from nemo_igrpo.rewards.code import run_tests\n"
                "run_tests('import time\\ntime.sleep(1000)\\n', ['assert True'], timeout_s=10.0, per_test_timeout_s=None)\n"
            ),
        ]
    )
    try:
        deadline = time.monotonic() + 120  # imports on a loaded 2-core machine
        sandboxes: list = []
        # Wait for the interpreter inside the sandbox, not just bwrap's first stage: bwrap arms
        # --die-with-parent as it starts, and killing the parent before that tests nothing.
        while not any(_is_inner_python(p) for p in sandboxes) and time.monotonic() < deadline:
            time.sleep(0.05)
            sandboxes = _runner_processes(parent.pid)
        assert any(_is_inner_python(p) for p in sandboxes), "the sandboxed interpreter never started"
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    gone, alive = psutil.wait_procs(sandboxes, timeout=60)
    # A zombie runs nothing: it is dead and waits only for its new parent (PID 1 here, which in
    # some containers never reaps) to collect it.
    running = [p for p in alive if _status(p) not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD, None)]
    assert not running, f"sandbox still running after its parent was killed: {[(p.pid, _status(p)) for p in running]}"


def test_reward_manager_refuses_at_start_when_the_sandbox_cannot_start(monkeypatch, tmp_path):
    # A host without bubblewrap (an empty PATH): the run must stop before training, with the
    # setting named, instead of scoring every solution with the fallback score.
    from nemo_igrpo.rewards.config import RewardConfig, RewardTermConfig
    from nemo_igrpo.rewards.manager import RewardManager
    from nemo_igrpo.utils.errors import UserError

    monkeypatch.setenv("PATH", str(tmp_path))
    sandbox._checked.cache_clear()
    try:
        cfg = RewardConfig(
            terms=[RewardTermConfig(name="code_tests", weight=1.0)], num_workers=0, correctness_term="code_tests"
        )
        with pytest.raises(UserError, match="bubblewrap"):
            RewardManager(cfg)
    finally:
        sandbox._checked.cache_clear()
