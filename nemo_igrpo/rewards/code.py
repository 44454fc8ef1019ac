"""`code_tests`: fraction of the reference's tests that the response's Python code passes.

Beyond the paper (its "transfer beyond math" open question). The response's code is run in a
fresh `python -I -S` process (rewards/_sandbox_runner.py) and each test is executed after it
in the same namespace; score = passed tests / tests.

What the code is: the last ```python (or bare ```) fenced block of the response
(`code_block="first"`/`"all"` pick the first / concatenate all), else the content of
<answer>...</answer>, else the whole response.

The reference (the dataset's answer field) is one of
- a list of test strings, each one test (typically one `assert`), e.g.
  ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"];
- a string of Python: its top-level `assert` statements are the tests, every other top-level
  statement (imports, helpers, variables) is setup executed in order;
- a dict {"setup": "<python>", "tests": [...]}.

Isolation (see docs/rewards.md for what is and is not guaranteed):
- separate process, own session (the whole process group is killed at `timeout_s` wall clock);
- RLIMIT_CPU `cpu_s`, RLIMIT_AS `memory_mb`, RLIMIT_FSIZE `max_file_mb`, no core files;
- per-test alarm `per_test_timeout_s` so one looping test does not take the others with it;
- a fresh temporary working directory (also HOME and TMPDIR), deleted afterwards;
- a clean environment and `-I -S`: no PYTHON* variables, no user or site packages (the
  standard library still imports; `allow_site_packages=True` drops `-S` for numpy & co.);
- a Python audit hook refusing sockets, subprocesses/fork/exec, signals to other processes,
  ctypes, frame/gc introspection, and file writes/renames/deletes outside the working directory;
- when `unshare` can create a network namespace here (`network_namespace="auto"`), the process
  also runs with no network interfaces at all, which holds even against native code.
"""

from __future__ import annotations

import ast
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from nemo_igrpo.rewards.registry import register_reward

_RUNNER = Path(__file__).with_name("_sandbox_runner.py")
_FENCED = re.compile(r"```[ \t]*(?P<lang>[A-Za-z0-9_+-]*)[^\n]*\n(?P<body>.*?)```", re.DOTALL)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_PYTHON_LANGS = {"", "python", "py", "python3"}


def extract_code(response: str, code_block: str = "last") -> str:
    """The solution code in a response (see the module docstring)."""
    if code_block not in ("first", "last", "all"):
        raise ValueError(f"code_tests: code_block={code_block!r}: must be 'first', 'last' or 'all'")
    blocks = [m.group("body") for m in _FENCED.finditer(response) if m.group("lang").lower() in _PYTHON_LANGS]
    if blocks:
        if code_block == "all":
            return "\n\n".join(blocks)
        return blocks[0] if code_block == "first" else blocks[-1]
    answers = _ANSWER_TAG.findall(response)
    if answers and answers[-1].strip():
        return answers[-1]
    return response


def parse_tests(reference: Any) -> list[tuple[str, str]]:
    """The reference as ordered steps ("setup" | "test", source). Raises on no tests."""
    steps: list[tuple[str, str]] = []
    if isinstance(reference, str) and reference.lstrip().startswith("["):
        try:
            reference = json.loads(reference)  # a list stored as a JSON string in a table column
        except json.JSONDecodeError:
            pass
    if isinstance(reference, dict):
        unknown = set(reference) - {"setup", "tests"}
        if unknown or "tests" not in reference:
            raise ValueError(f"code_tests: a dict reference needs 'tests' (and optionally 'setup'), got keys {sorted(reference)}")
        if reference.get("setup"):
            steps.append(("setup", str(reference["setup"])))
        reference = reference["tests"]
    if isinstance(reference, str):
        try:
            tree = ast.parse(reference)
        except SyntaxError as e:
            raise ValueError(f"code_tests: the reference test snippet is not valid Python ({e.msg}, line {e.lineno})") from None
        for node in tree.body:
            steps.append(("test" if isinstance(node, ast.Assert) else "setup", ast.get_source_segment(reference, node) or ""))
    elif isinstance(reference, (list, tuple)):
        for i, test in enumerate(reference):
            if not isinstance(test, str):
                raise ValueError(f"code_tests: test {i} of the reference is a {type(test).__name__}, not a string of Python")
            steps.append(("test", test))
    elif not steps:
        raise ValueError(f"code_tests: reference must be a list of tests, a Python snippet or a dict, got {type(reference).__name__}")
    if not any(kind == "test" for kind, _ in steps):
        raise ValueError("code_tests: the reference contains no tests (no assert statements / empty list)")
    return steps


@lru_cache(maxsize=1)
def _network_namespace_available() -> bool:
    # Probed once per process: unprivileged user namespaces are often disabled (containers, CI).
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    try:
        probe = subprocess.run([unshare, "--net", "--map-root-user", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


def _command(allow_site_packages: bool, network_namespace: str) -> list[str]:
    python = [sys.executable, "-I"] + ([] if allow_site_packages else ["-S"]) + [str(_RUNNER)]
    if network_namespace not in ("auto", "require", "off"):
        raise ValueError(f"code_tests: network_namespace={network_namespace!r}: must be 'auto', 'require' or 'off'")
    if network_namespace == "off":
        return python
    if _network_namespace_available():
        return ["unshare", "--net", "--map-root-user"] + python
    if network_namespace == "require":
        raise RuntimeError("code_tests: network_namespace='require' but 'unshare --net --map-root-user' does not work here")
    return python


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_tests(code: str, reference: Any, *, timeout_s: float = 6.0, cpu_s: int = 5, memory_mb: int = 512,
              per_test_timeout_s: Optional[float] = 2.0, max_file_mb: int = 16, allow_site_packages: bool = False,
              network_namespace: str = "auto") -> tuple[int, int, list[str]]:
    """(passed, total, per-test result lines) for `code` against the reference's tests."""
    steps = parse_tests(reference)
    total = sum(1 for kind, _ in steps if kind == "test")
    nonce = secrets.token_hex(16)
    sandbox_dir = tempfile.mkdtemp(prefix="igrpo-code-")
    job = json.dumps({"nonce": nonce, "sandbox_dir": sandbox_dir, "code": code, "steps": steps,
                      "cpu_s": cpu_s, "memory_mb": memory_mb, "max_file_mb": max_file_mb,
                      "per_test_timeout_s": per_test_timeout_s, "wall_timeout_s": timeout_s + 1.0})
    env = {"PATH": "/usr/bin:/bin", "HOME": sandbox_dir, "TMPDIR": sandbox_dir, "LANG": "C.UTF-8"}
    try:
        # start_new_session: the sandbox gets its own process group, so a kill takes anything
        # it managed to start too. No preexec_fn: it is unsafe in a threaded caller.
        proc = subprocess.Popen(_command(allow_site_packages, network_namespace), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=sandbox_dir, env=env,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(job.encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            # Tests that passed before the hang were already reported: keep their credit.
            out, _ = proc.communicate()
        finally:
            _kill_group(proc)  # anything left in the group (the audit hook should have prevented it)
    finally:
        shutil.rmtree(sandbox_dir, ignore_errors=True)
    passed_indices: set[int] = set()
    lines: list[str] = []
    for line in out.decode(errors="replace").splitlines():
        parts = line.split(" ", 3)
        if len(parts) < 3 or parts[0] != nonce:
            continue
        lines.append(line[len(nonce) + 1 :])
        if parts[2] == "PASS" and parts[1].isdigit() and int(parts[1]) < len(steps) and steps[int(parts[1])][0] == "test":
            passed_indices.add(int(parts[1]))
    return len(passed_indices), total, lines


@register_reward("code_tests")
def code_tests(prompt: str, response: str, reference: Any, *, code_block: str = "last", timeout_s: float = 6.0,
               cpu_s: int = 5, memory_mb: int = 512, per_test_timeout_s: Optional[float] = 2.0,
               max_file_mb: int = 16, allow_site_packages: bool = False, network_namespace: str = "auto") -> float:
    """Fraction of the reference's tests that the response's code passes (see module docstring)."""
    passed, total, _ = run_tests(extract_code(response, code_block), reference, timeout_s=timeout_s, cpu_s=cpu_s,
                                 memory_mb=memory_mb, per_test_timeout_s=per_test_timeout_s, max_file_mb=max_file_mb,
                                 allow_site_packages=allow_site_packages, network_namespace=network_namespace)
    return passed / total
