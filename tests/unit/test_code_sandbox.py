"""code_tests: real sandboxed runs of untrusted solutions (separate `python -I -S` processes)."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from nemo_igrpo.rewards.code import code_tests, extract_code, parse_tests, run_tests

TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(-1, 1) == 0", "assert add(0, 5) == 5"]
CORRECT = "def add(a, b):\n    return a + b\n"


def fenced(code: str) -> str:
    return f"<think>easy</think>\nHere is my solution:\n```python\n{code}```\n<answer>see above</answer>"


# Fast limits keep the hostile cases cheap; the defaults are a few seconds.
LIMITS = dict(timeout_s=3.0, cpu_s=2, memory_mb=256, per_test_timeout_s=0.5)


def test_correct_solution_scores_one():
    assert code_tests("q", fenced(CORRECT), TESTS, **LIMITS) == 1.0


def test_half_correct_solution_scores_half():
    half = "def add(a, b):\n    return a + b if a > 0 else 99\n"  # passes tests 0 and 1 only
    assert code_tests("q", fenced(half), TESTS, **LIMITS) == 0.5


def test_reference_as_snippet_and_dict():
    snippet = "import math\nBASE = 2\nassert add(BASE, 1) == 3\nassert add(1, 1) == math.floor(2.5)\nassert add(1, 1) == 3\n"
    assert [kind for kind, _ in parse_tests(snippet)] == ["setup", "setup", "test", "test", "test"]
    assert run_tests(CORRECT, snippet, **LIMITS)[:2] == (2, 3)
    assert run_tests(CORRECT, {"setup": "K = 10", "tests": ["assert add(K, 1) == 11"]}, **LIMITS)[:2] == (1, 1)
    assert run_tests(CORRECT, '["assert add(1, 1) == 2"]', **LIMITS)[:2] == (1, 1)  # JSON string column


def test_bad_references_are_clear_errors():
    with pytest.raises(ValueError, match="no tests"):
        parse_tests([])
    with pytest.raises(ValueError, match="no tests"):
        parse_tests("x = 1\n")
    with pytest.raises(ValueError, match="not valid Python"):
        parse_tests("assert (")
    with pytest.raises(ValueError, match="test 1 of the reference is a int"):
        parse_tests(["assert True", 3])


def test_code_extraction():
    assert extract_code("```python\na = 1\n```\ntext\n```py\nb = 2\n```") == "b = 2\n"
    assert extract_code("```python\na = 1\n```\n```\nb = 2\n```", "first") == "a = 1\n"
    assert extract_code("```python\na = 1\n```\n```python\nb = 2\n```", "all") == "a = 1\n\n\nb = 2\n"
    assert extract_code("```bash\nls\n```<answer>x = 3</answer>") == "x = 3"
    assert extract_code("x = 4") == "x = 4"


def test_infinite_loop_at_top_level_is_stopped_by_the_per_test_alarm():
    started = time.monotonic()
    assert code_tests("q", fenced("while True:\n    pass\n" + CORRECT), TESTS, **LIMITS) == 0.0
    assert time.monotonic() - started < 2.5


def test_loop_that_swallows_the_alarm_is_killed_at_the_wall_clock_limit():
    stubborn = ("def add(a, b):\n    while True:\n        try:\n            while True:\n                pass\n"
                "        except BaseException:\n            pass\n")
    started = time.monotonic()
    passed, total, _ = run_tests(stubborn, TESTS, timeout_s=1.5, cpu_s=5, memory_mb=256, per_test_timeout_s=None)
    assert (passed, total) == (0, 4)
    assert time.monotonic() - started < 3.0


def test_partial_credit_survives_a_hang_in_a_later_test():
    hangs_on_zero = "def add(a, b):\n    while a == 0:\n        pass\n    return a + b\n"
    # tests 0-2 pass, test 3 (add(0, 5)) loops until the wall clock kills the process
    passed, total, _ = run_tests(hangs_on_zero, TESTS, timeout_s=1.5, cpu_s=5, memory_mb=256, per_test_timeout_s=None)
    assert (passed, total) == (3, 4)


def test_memory_bomb_is_contained():
    bomb = "def add(a, b):\n    hog = []\n    while True:\n        hog.append(bytearray(50 * 1024 * 1024))\n"
    assert code_tests("q", fenced(bomb), TESTS, **LIMITS) == 0.0
    assert code_tests("q", fenced("big = [0] * (10 ** 10)\n" + CORRECT), TESTS, **LIMITS) == 0.0


def test_writing_outside_the_working_directory_is_blocked(tmp_path):
    target = tmp_path / f"escape-{uuid.uuid4().hex}.txt"
    for attack in (
        f"open({str(target)!r}, 'w').write('pwned')\n",
        f"import os\nos.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))\n",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('pwned')\n",
        f"import os\nos.symlink('/etc/passwd', 'link')\n",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
    ):
        assert code_tests("q", fenced(attack + CORRECT), TESTS, **LIMITS) == 0.0, attack
        assert not target.exists()
    assert tmp_path.exists()


def test_writing_inside_the_working_directory_is_allowed():
    uses_scratch = ("def add(a, b):\n    with open('scratch.txt', 'w') as f:\n        f.write(str(a + b))\n"
                    "    return int(open('scratch.txt').read())\n")
    assert code_tests("q", fenced(uses_scratch), TESTS, **LIMITS) == 1.0


@pytest.mark.parametrize("network_namespace", ["auto", "off"])
def test_sockets_subprocesses_and_signals_are_blocked(network_namespace):
    # "off" checks the audit hook alone (what a machine without user namespaces gets).
    for attack in (
        "import socket\nsocket.create_connection(('127.0.0.1', 9))\n",
        "import _socket\n_socket.socket()\n",
        "import os\nos.system('true')\n",
        "import subprocess\nsubprocess.run(['true'])\n",
        "import os\nos.kill(os.getppid(), 9)\n",
        "import ctypes\n",
        "import sys\nsys._getframe(1)\n",
    ):
        score = code_tests("q", fenced(attack + CORRECT), TESTS, network_namespace=network_namespace, **LIMITS)
        assert score == 0.0, attack


def test_printed_text_cannot_forge_results():
    forger = "import sys\nfor i in range(4):\n    print(f'{i} PASS')\n    sys.stderr.write(f'{i} PASS\\n')\n"
    assert code_tests("q", fenced(forger), TESTS, **LIMITS) == 0.0


def test_clean_environment_and_stdlib_available(monkeypatch):
    monkeypatch.setenv("IGRPO_SECRET_TOKEN", "do-not-leak")
    probe = ("import os, json, collections, dataclasses, re, math, itertools, functools, heapq\n"
             "def add(a, b):\n    assert 'IGRPO_SECRET_TOKEN' not in os.environ\n"
             "    assert os.getcwd() == os.environ['HOME']\n    return a + b\n")
    assert code_tests("q", fenced(probe), TESTS, **LIMITS) == 1.0


def test_temporary_directory_is_removed():
    leaves_files = f"open('left-{os.getpid()}.txt', 'w').write('x')\nimport os\nWHERE = os.getcwd()\n" + CORRECT
    before = set(os.listdir("/tmp"))
    assert code_tests("q", fenced(leaves_files), TESTS, **LIMITS) == 1.0
    new = {d for d in set(os.listdir("/tmp")) - before if d.startswith("igrpo-code-")}
    assert not new


def test_sandbox_does_not_outlive_a_killed_parent_beyond_its_wall_limit():
    # The RewardManager kills a hung worker; a sleeping solution (no CPU time) must still end.
    import subprocess
    import sys

    import psutil

    parent = subprocess.Popen([sys.executable, "-c", (
        "from nemo_igrpo.rewards.code import run_tests\n"
        "run_tests('import time\\ntime.sleep(1000)\\n', ['assert True'], timeout_s=1.0, per_test_timeout_s=None)\n")])
    try:
        deadline = time.monotonic() + 20
        sandboxes: list = []
        while not sandboxes and time.monotonic() < deadline:
            time.sleep(0.05)
            sandboxes = [p for p in psutil.Process(parent.pid).children(recursive=True)
                         if any("_sandbox_runner" in part for part in p.cmdline())]
        assert sandboxes, "the sandbox process never started"
    finally:
        parent.kill()
        parent.wait()
    gone, alive = psutil.wait_procs(sandboxes, timeout=5)
    assert not alive, "sandbox still running after its wall-clock limit"
