"""`code_tests`: fraction of the reference's tests that the response's Python code passes.

Beyond the paper (its "transfer beyond math" open question). Each solution runs in a
bubblewrap sandbox of its own (rewards/sandbox.py: new user/PID/mount/network/IPC namespaces,
read-only Python, a private tmpfs, rlimits, wall-clock kill of the whole sandbox); the runner
inside (rewards/_sandbox_runner.py) only reports values and outputs, and this process decides
pass/fail (rewards/_code_plan.py). Score = passed tests / tests. If the sandbox cannot start
here, every call raises `SandboxUnavailableError` naming the host setting; nothing runs
without it. docs/rewards.md lists what is guaranteed and what the host must allow.

What the code is: the last ```python (or bare ```) fenced block of the response
(`code_block="first"`/`"all"` pick the first / concatenate all), else the content of
<answer>...</answer>, else the whole response.

The reference (the dataset's answer field) is one of
- a list of test strings, each one test (typically one `assert`), e.g.
  ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"];
- a string of Python: its top-level `assert` statements are the tests, every other top-level
  statement (imports, helpers, variables) is setup executed in order;
- a dict {"setup": "<python>", "tests": [...]};
- function calls: {"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [3, 7]}: each
  input is the argument list, each output the expected return value (JSON: a returned tuple
  compares equal to a list). A `class Solution` with method fn_name also works (LeetCode style);
- stdin/stdout: {"inputs": ["1 2\\n", ...], "outputs": ["3\\n", ...]}: the code runs as
  `__main__` once per input; its stdout must equal the output up to trailing whitespace on
  each line and trailing blank lines, and it must exit with status 0.
A JSON string holding a list or a dict is decoded first (a table column).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from typing import Any, Optional

from nemo_igrpo.rewards import _sandbox_runner as wire
from nemo_igrpo.rewards._code_plan import PLACEHOLDER, judge_locally, plan_asserts
from nemo_igrpo.rewards.registry import register_reward
from nemo_igrpo.rewards.sandbox import SandboxLimits, SandboxUnavailableError, ensure_available, run_sandboxed

__all__ = ["code_tests", "extract_code", "parse_tests", "parse_reference", "run_tests", "SandboxUnavailableError"]

_FENCED = re.compile(r"```[ \t]*(?P<lang>[A-Za-z0-9_+-]*)[^\n]*\n(?P<body>.*?)```", re.DOTALL)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_PYTHON_LANGS = {"", "python", "py", "python3"}
_NETWORK_NAMESPACE_VALUES = ("auto", "require", "off")


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
            raise ValueError(
                f"code_tests: a dict reference needs 'tests' (and optionally 'setup'), got keys {sorted(reference)}"
            )
        if reference.get("setup"):
            steps.append(("setup", str(reference["setup"])))
        reference = reference["tests"]
    if isinstance(reference, str):
        try:
            tree = ast.parse(reference)
        except SyntaxError as e:
            raise ValueError(
                f"code_tests: the reference test snippet is not valid Python ({e.msg}, line {e.lineno})"
            ) from None
        for node in tree.body:
            steps.append(
                ("test" if isinstance(node, ast.Assert) else "setup", ast.get_source_segment(reference, node) or "")
            )
    elif isinstance(reference, (list, tuple)):
        for i, test in enumerate(reference):
            if not isinstance(test, str):
                raise ValueError(
                    f"code_tests: test {i} of the reference is a {type(test).__name__}, not a string of Python"
                )
            steps.append(("test", test))
    elif not steps:
        raise ValueError(
            f"code_tests: reference must be a list of tests, a Python snippet or a dict, got {type(reference).__name__}"
        )
    if not any(kind == "test" for kind, _ in steps):
        raise ValueError("code_tests: the reference contains no tests (no assert statements / empty list)")
    return steps


@dataclass
class Reference:
    kind: str  # "asserts" | "calls" | "stdio"
    steps: Optional[list[tuple[str, str]]] = None  # asserts
    fn_name: Optional[str] = None  # calls
    inputs: Optional[list] = None  # calls (argument lists) | stdio (stdin texts)
    outputs: Optional[list] = None  # calls (return values) | stdio (stdout texts)


def parse_reference(reference: Any) -> Reference:
    """The reference as one of the three kinds (see the module docstring). Raises ValueError."""
    if isinstance(reference, str) and reference.lstrip()[:1] in ("[", "{"):
        try:
            reference = json.loads(reference)
        except json.JSONDecodeError:
            pass
    if not (isinstance(reference, dict) and "inputs" in reference):
        return Reference("asserts", steps=parse_tests(reference))
    unknown = set(reference) - {"inputs", "outputs", "fn_name"}
    inputs, outputs = reference.get("inputs"), reference.get("outputs")
    if unknown or not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs):
        raise ValueError(
            "code_tests: an input/output reference needs 'inputs' and 'outputs', two lists of the same "
            f"length (and optionally 'fn_name'), got keys {sorted(reference)}"
        )
    if not inputs:
        raise ValueError("code_tests: the reference contains no tests (empty 'inputs')")
    fn_name = reference.get("fn_name")
    if fn_name:
        if not isinstance(fn_name, str) or not fn_name.isidentifier():
            raise ValueError(f"code_tests: fn_name {fn_name!r} is not a Python identifier")
        if not all(isinstance(args, list) for args in inputs):
            raise ValueError("code_tests: with fn_name, each of 'inputs' is the list of arguments of one call")
        return Reference("calls", fn_name=fn_name, inputs=inputs, outputs=outputs)
    if not all(isinstance(x, str) for x in inputs + outputs):
        raise ValueError("code_tests: a stdin/stdout reference needs strings in 'inputs' and 'outputs'")
    return Reference("stdio", inputs=inputs, outputs=outputs)


def _records(stdout: bytes) -> list[list]:
    """The runner's JSON lines. Anything malformed is skipped: the sandbox's output is untrusted."""
    records = []
    for line in stdout.split(b"\n"):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, list) and record and isinstance(record[0], str):
            records.append(record)
    return records


def _first_by_id(records: list[list], kinds: tuple[str, ...], count: int) -> dict[int, list]:
    # The first record per id counts; an id out of range is ignored.
    out: dict[int, list] = {}
    for record in records:
        if record[0] in kinds and len(record) >= 3 and type(record[1]) is int and 0 <= record[1] < count:
            out.setdefault(record[1], record)
    return out


def _load_failure(records: list[list], result: Any) -> Optional[str]:
    if any(r == ["loaded"] for r in records):
        return None
    for r in records:
        if r[0] == "loadfail" and len(r) > 1:
            return f"solution failed: {str(r[1])[:200]}"
    if result.timed_out:
        return "solution timed out"
    if result.truncated:
        return "solution output over the cap"
    return f"solution did not run (exit {result.returncode})"


def _as_json_value(value: Any) -> Any:
    # The expected outputs came from JSON, which has lists but no tuples.
    if isinstance(value, tuple):
        return [_as_json_value(v) for v in value]
    if isinstance(value, list):
        return [_as_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_json_value(v) for k, v in value.items()}
    return value


def _normalise_stdout(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _run_asserts(
    code: str, ref: Reference, limits: SandboxLimits, per_test_timeout_s: Optional[float], allow_site_packages: bool
) -> tuple[list[bool], list[str]]:
    plan, probes = plan_asserts(ref.steps)
    max_value = limits.max_output_bytes // 4
    job = {
        "mode": "solution",
        "code": code,
        "steps": plan.solution_steps,
        "per_test_timeout_s": per_test_timeout_s,
        "max_value_bytes": max_value,
    }
    result = run_sandboxed(job, limits, allow_site_packages)
    records = _records(result.stdout)
    failure = _load_failure(records, result)
    if failure:
        return [False] * len(plan.tests), [f"{t.step_index} FAIL {failure}" for t in plan.tests]
    values: dict[str, Any] = {}
    encoded: dict[str, Any] = {}
    problems: dict[int, str] = {}
    for pid, record in _first_by_id(records, ("ok", "err"), len(probes)).items():
        if record[0] == "err":
            problems[pid] = str(record[2])[:200]
            continue
        try:
            values[PLACEHOLDER.format(pid)] = wire.decode(record[2])
            encoded[PLACEHOLDER.format(pid)] = record[2]
        except (ValueError, TypeError, RecursionError) as e:
            problems[pid] = f"malformed value ({type(e).__name__})"
    outcome: dict[int, tuple[bool, str]] = {}
    to_judge: list[int] = []
    for test_id, test in enumerate(plan.tests):
        missing = [pid for pid in test.probes if PLACEHOLDER.format(pid) not in values]
        if test.broken:
            outcome[test_id] = (False, test.broken)
        elif missing:
            pid = missing[0]
            outcome[test_id] = (False, problems.get(pid, "timed out or killed before this test"))
        elif test.expr is None:
            outcome[test_id] = (True, "")
        elif test.local:
            passed, reason = judge_locally(test, values)
            outcome[test_id] = (passed, reason or "")
        else:
            to_judge.append(test_id)
    if to_judge:
        # The rest of these tests is reference code: run it in a sandbox of its own, with the
        # solution's values as plain data and none of the solution's code.
        wanted = set(to_judge)
        steps = [s for s in plan.judge_steps if s[0] == "exec" or s[1] in wanted]
        needed = {PLACEHOLDER.format(pid) for t in to_judge for pid in plan.tests[t].probes}
        judge_job = {
            "mode": "judge",
            "values": {k: v for k, v in encoded.items() if k in needed},
            "steps": steps,
            "per_test_timeout_s": per_test_timeout_s,
            "max_value_bytes": 64,
        }
        judged = run_sandboxed(judge_job, limits, allow_site_packages)
        by_id = _first_by_id(_records(judged.stdout), ("judge", "err"), len(plan.tests))
        for test_id in to_judge:
            record = by_id.get(test_id)
            if record is None:
                outcome[test_id] = (False, "the reference-side check did not finish")
            elif record[0] == "err":
                outcome[test_id] = (False, str(record[2])[:200])
            else:
                outcome[test_id] = (record[2] is True, "")
    passed = [outcome[i][0] for i in range(len(plan.tests))]
    lines = [
        f"{t.step_index} {'PASS' if outcome[i][0] else 'FAIL'} {outcome[i][1]}".rstrip()
        for i, t in enumerate(plan.tests)
    ]
    return passed, lines


def _run_calls(
    code: str, ref: Reference, limits: SandboxLimits, per_test_timeout_s: Optional[float], allow_site_packages: bool
) -> tuple[list[bool], list[str]]:
    steps = [["call", i, ref.fn_name, [wire.encode(a) for a in args]] for i, args in enumerate(ref.inputs)]
    job = {
        "mode": "solution",
        "code": code,
        "steps": steps,
        "per_test_timeout_s": per_test_timeout_s,
        "max_value_bytes": limits.max_output_bytes // 4,
    }
    result = run_sandboxed(job, limits, allow_site_packages)
    records = _records(result.stdout)
    failure = _load_failure(records, result)
    if failure:
        return [False] * len(ref.inputs), [f"{i} FAIL {failure}" for i in range(len(ref.inputs))]
    by_id = _first_by_id(records, ("ok", "err"), len(ref.inputs))
    passed, lines = [], []
    for i, expected in enumerate(ref.outputs):
        record = by_id.get(i)
        reason = ""
        if record is None:
            ok, reason = False, "timed out or killed before this call"
        elif record[0] == "err":
            ok, reason = False, str(record[2])[:200]
        else:
            try:
                ok = _as_json_value(wire.decode(record[2])) == expected
            except (ValueError, TypeError, RecursionError) as e:
                ok, reason = False, f"malformed value ({type(e).__name__})"
            reason = reason or ("" if ok else "wrong value")
        passed.append(ok)
        lines.append(f"{i} {'PASS' if ok else 'FAIL'} {reason}".rstrip())
    return passed, lines


def _run_stdio(
    code: str, ref: Reference, limits: SandboxLimits, per_test_timeout_s: Optional[float], allow_site_packages: bool
) -> tuple[list[bool], list[str]]:
    # The expected outputs never enter the sandbox; it only reports what the program printed.
    per_case = max(4096, limits.max_output_bytes // (2 * len(ref.inputs)))
    job = {
        "mode": "stdio",
        "code": code,
        "inputs": ref.inputs,
        "per_test_timeout_s": per_test_timeout_s,
        "case_timeout_s": limits.wall_s,
        "max_case_output_bytes": per_case,
    }
    result = run_sandboxed(job, limits, allow_site_packages)
    records = _records(result.stdout)
    failure = _load_failure(records, result)
    if failure:
        return [False] * len(ref.inputs), [f"{i} FAIL {failure}" for i in range(len(ref.inputs))]
    by_id = _first_by_id(records, ("out",), len(ref.inputs))
    passed, lines = [], []
    for i, expected in enumerate(ref.outputs):
        record = by_id.get(i)
        if record is None or len(record) < 5:
            ok, reason = False, "timed out or killed before this input"
        elif record[4] is not False:
            ok, reason = False, "output over the cap"
        elif record[3] != 0:
            ok, reason = False, f"exit status {str(record[3])[:50]}"
        else:
            ok = isinstance(record[2], str) and _normalise_stdout(record[2]) == _normalise_stdout(expected)
            reason = "" if ok else "wrong output"
        passed.append(ok)
        lines.append(f"{i} {'PASS' if ok else 'FAIL'} {reason}".rstrip())
    return passed, lines


def run_tests(
    code: str,
    reference: Any,
    *,
    timeout_s: float = 6.0,
    cpu_s: int = 5,
    memory_mb: int = 512,
    per_test_timeout_s: Optional[float] = 2.0,
    max_file_mb: int = 16,
    allow_site_packages: bool = False,
    network_namespace: str = "auto",
    max_processes: int = 8,
    max_open_files: int = 64,
    tmpfs_mb: int = 64,
    max_output_kb: int = 1024,
) -> tuple[int, int, list[str]]:
    """(passed, total, per-test result lines) for `code` against the reference's tests."""
    if network_namespace not in _NETWORK_NAMESPACE_VALUES:
        raise ValueError(
            f"code_tests: network_namespace={network_namespace!r}: must be 'auto', 'require' or 'off' "
            "(the sandbox always has its own empty network namespace now; the key is only kept so "
            "that existing configs load)"
        )
    ref = parse_reference(reference)
    limits = SandboxLimits(
        wall_s=float(timeout_s),
        cpu_s=int(cpu_s),
        memory_mb=int(memory_mb),
        max_file_mb=int(max_file_mb),
        max_open_files=int(max_open_files),
        max_processes=int(max_processes),
        tmpfs_mb=int(tmpfs_mb),
        max_output_bytes=int(max_output_kb) * 1024,
    )
    runner = {"asserts": _run_asserts, "calls": _run_calls, "stdio": _run_stdio}[ref.kind]
    passed, lines = runner(code, ref, limits, per_test_timeout_s, allow_site_packages)
    return sum(passed), len(passed), lines


@register_reward("code_tests")
def code_tests(
    prompt: str,
    response: str,
    reference: Any,
    *,
    code_block: str = "last",
    timeout_s: float = 6.0,
    cpu_s: int = 5,
    memory_mb: int = 512,
    per_test_timeout_s: Optional[float] = 2.0,
    max_file_mb: int = 16,
    allow_site_packages: bool = False,
    network_namespace: str = "auto",
    max_processes: int = 8,
    max_open_files: int = 64,
    tmpfs_mb: int = 64,
    max_output_kb: int = 1024,
) -> float:
    """Fraction of the reference's tests that the response's code passes (see module docstring)."""
    passed, total, _ = run_tests(
        extract_code(response, code_block),
        reference,
        timeout_s=timeout_s,
        cpu_s=cpu_s,
        memory_mb=memory_mb,
        per_test_timeout_s=per_test_timeout_s,
        max_file_mb=max_file_mb,
        allow_site_packages=allow_site_packages,
        network_namespace=network_namespace,
        max_processes=max_processes,
        max_open_files=max_open_files,
        tmpfs_mb=tmpfs_mb,
        max_output_kb=max_output_kb,
    )
    return passed / total


def _check_host(allow_site_packages: bool = False, **_: Any) -> None:
    """Raise SandboxUnavailableError (naming the host setting) unless the sandbox starts here.
    The RewardManager calls it at construction, so a host without user namespaces stops the run
    before training instead of scoring every solution 0."""
    ensure_available(bool(allow_site_packages))


code_tests.check_host = _check_host
