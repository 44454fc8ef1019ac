"""The process that runs inside the bubblewrap sandbox (rewards/sandbox.py starts it):

    python -I -S /igrpo/_sandbox_runner.py CPU_S AS_BYTES FSIZE_BYTES NOFILE NPROC   (job as JSON on stdin)

It is NOT a security boundary. The operating system is (namespaces, read-only mounts, a private
tmpfs, rlimits, the parent's wall-clock kill), and the parent decides pass/fail. This file only
runs code and reports what came out: one JSON array per line on the sandbox's stdout, which the
parent reads with a byte cap. Nothing secret is in here: the job carries the solution, the
expressions to evaluate and the stdin inputs, never an expected value, so untrusted code that
takes over this process (replaces builtins, writes on the channel itself) can only report
values it computed, which is what solving the task means.

Stdlib only and nothing from nemo_igrpo: `-I -S` leaves just the standard library on sys.path.
The parent imports `decode` and `encode` from here so both sides share one value format.

Modes (job["mode"]):
- "probe": report ["ready"]; the parent's check that the sandbox starts at all.
- "solution": exec the solution (as module "__solution__"), report ["loaded"] or
  ["loadfail", why], then in order: "exec" runs a setup statement, "eval" evaluates a test's
  sub-expression, "run" executes a test that has no assert (value True when it ran) and "call"
  calls fn_name(*args); each reports ["ok", id, value] or ["err", id, why].
- "stdio": for each input, a fresh forked process runs the solution as "__main__" with that
  stdin; reports ["out", index, stdout_text, exit_code, truncated].
- "judge": trusted reference code only (no solution code is in this sandbox): binds the values
  the solution's run produced (decoded, plain data), runs setup, evaluates rewritten tests;
  reports ["judge", id, true|false].

Value format (`encode`): JSON with exact builtin types only. Scalars (None, bool, int, float,
str) are plain JSON; everything else is a one-key object: {"t": [...]} tuple, {"l": [...]}
list, {"s": [...]} set, {"f": [...]} frozenset, {"d": [[k, v], ...]} dict, {"b": "hex"} bytes,
{"c": [re, im]} complex. Subclasses are converted to their base type (an IntEnum becomes its
int, a namedtuple a tuple); anything else cannot be encoded and fails that test. So no object
with its own __eq__ ever reaches the comparison in the parent.
"""

import os
import resource
import signal
import sys
import time


def _arm_watchdog(seconds: int) -> None:
    """A process that ends the whole sandbox `seconds` from now, from inside its PID namespace.

    The parent kills the sandbox at its deadline, and bwrap's --die-with-parent covers a parent
    that dies; but the parent-death signal is a chain across bwrap's stages whose links the
    kernel clears on credential changes (entering a user namespace is one), so it is a second
    line here, not the only one. kill(-1) reaches every process of the sandbox user in this
    namespace. A run that ends earlier takes the watchdog with it (the namespace's init exits)."""
    if os.fork():
        return
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # hold no pipe the parent reads to EOF
            os.dup2(devnull, fd)
        time.sleep(seconds)
        os.kill(-1, signal.SIGKILL)
    finally:
        os._exit(0)


def _set_limits(argv):
    # First, before anything of the job is even read: hard = soft, so nothing later in this
    # process tree can raise them (CAP_SYS_RESOURCE is dropped and belongs to the host anyway).
    cpu_s, as_bytes, fsize, nofile, nproc = (int(a) for a in argv[1:6])
    if len(argv) > 6:
        _arm_watchdog(int(argv[6]))
        nproc += 1  # the watchdog is one of the sandbox user's processes
    # CPU: SIGXCPU at the soft limit (kills by default), SIGKILL at the hard one.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (as_bytes, as_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    # Counted per user inside this sandbox's own user namespace, so concurrent sandboxes do not
    # share it; the sandbox user is never host root (root would be exempt).
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


if __name__ == "__main__":
    _set_limits(sys.argv)

import builtins  # noqa: E402 - after the limits on purpose
import io  # noqa: E402
import json  # noqa: E402
import operator  # noqa: E402
import select  # noqa: E402

_MAX_DEPTH = 64


class _Unencodable(Exception):
    pass


def encode(value, depth=0):
    """A JSON-able structure for a plain value (see the module docstring); raises _Unencodable."""
    if depth > _MAX_DEPTH:
        raise _Unencodable("nested too deeply")
    if value is None or type(value) in (bool, str):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__index__(value)  # an int subclass becomes a plain int without calling its methods
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, (bytes, bytearray)):
        return {"b": bytes(value).hex()}
    if isinstance(value, complex):
        return {"c": [complex.__complex__(value).real, complex.__complex__(value).imag]}
    if isinstance(value, tuple):
        return {"t": [encode(v, depth + 1) for v in tuple.__iter__(value)]}
    if isinstance(value, list):
        return {"l": [encode(v, depth + 1) for v in list.__iter__(value)]}
    if isinstance(value, frozenset):
        return {"f": [encode(v, depth + 1) for v in frozenset.__iter__(value)]}
    if isinstance(value, set):
        return {"s": [encode(v, depth + 1) for v in set.__iter__(value)]}
    if isinstance(value, dict):
        return {"d": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in dict.items(value)]}
    if hasattr(type(value), "__index__"):  # numpy integers and the like, when site-packages are on
        return int(operator.index(value))
    raise _Unencodable(f"a {type(value).__name__} is not a plain value")


def decode(data, depth=0):
    """The plain Python value of `encode`'s output. Raises ValueError/TypeError on anything else."""
    if depth > _MAX_DEPTH:
        raise ValueError("nested too deeply")
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is not dict or len(data) != 1:
        raise ValueError("not an encoded value")
    ((tag, items),) = data.items()
    if tag == "b" and type(items) is str:
        return bytes.fromhex(items)
    if type(items) is not list:
        raise ValueError("not an encoded value")
    if tag == "c" and len(items) == 2 and all(type(x) in (int, float) for x in items):
        return complex(items[0], items[1])
    if tag == "d":
        out = {}
        for pair in items:
            if type(pair) is not list or len(pair) != 2:
                raise ValueError("not an encoded dict item")
            out[decode(pair[0], depth + 1)] = decode(pair[1], depth + 1)
        return out
    kinds = {"t": tuple, "l": list, "s": set, "f": frozenset}
    if tag not in kinds:
        raise ValueError(f"unknown tag {tag!r}")
    return kinds[tag](decode(x, depth + 1) for x in items)


class _TestTimeout(BaseException):
    # A BaseException so that a solution's `except Exception:` does not swallow it.
    pass


def _describe(e):
    return f"{type(e).__name__}: {str(e)[:200]}" if not isinstance(e, _TestTimeout) else "timed out"


def main():
    job = json.loads(sys.stdin.buffer.read())
    # The channel is a private duplicate of stdout; the solution's own stdin/stdout/stderr go to
    # /dev/null, so what it prints is not mistaken for a report (it could still find the channel:
    # that gains it nothing, see the module docstring).
    channel = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    max_value = int(job.get("max_value_bytes", 65536))

    def emit(record):
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        while data:
            data = data[os.write(channel, data) :]

    def emit_value(kind, ident, value):
        try:
            text = json.dumps(encode(value), separators=(",", ":"))
        except (_Unencodable, ValueError, RecursionError) as e:
            emit(["err", ident, f"return value: {e}"[:200]])
            return
        if len(text) > max_value:
            emit(["err", ident, f"return value: {len(text)} bytes encoded, over the {max_value} byte cap"])
            return
        emit([kind, ident, json.loads(text)])

    mode = job["mode"]
    if mode == "probe":
        emit(["ready", os.getuid(), os.getpid()])
        return
    per_test = job.get("per_test_timeout_s") or 0.0

    def on_alarm(signum, frame):
        raise _TestTimeout()

    signal.signal(signal.SIGALRM, on_alarm)

    def timed(fn, *args):
        if per_test:
            signal.setitimer(signal.ITIMER_REAL, float(per_test))
        try:
            return fn(*args)
        finally:
            if per_test:
                signal.setitimer(signal.ITIMER_REAL, 0)

    if mode == "stdio":
        _run_stdio(job, emit, channel, devnull, float(per_test or job.get("case_timeout_s", 5.0)))
        return
    namespace = {"__name__": "__solution__" if mode == "solution" else "__reference__", "__builtins__": builtins}
    if mode == "judge":
        for name, value in job.get("values", {}).items():
            namespace[name] = decode(value)
    else:
        # `__name__` is not "__main__", so a solution's `if __name__ == "__main__":` driver (often
        # reading stdin) does not run in function-call tests.
        try:
            timed(exec, compile(job["code"], "<solution>", "exec"), namespace)
        except BaseException as e:  # noqa: BLE001 - anything the untrusted code raises
            emit(["loadfail", _describe(e)])
            return
        emit(["loaded"])
    for step in job["steps"]:
        kind = step[0]
        if kind == "exec":
            try:
                timed(exec, compile(step[1], "<setup>", "exec"), namespace)
            except BaseException:  # noqa: BLE001 - the tests that need it fail on their own
                pass
            continue
        ident = step[1]
        try:
            if kind == "eval":
                value = timed(eval, compile(step[2], "<test>", "eval"), namespace)
            elif kind == "run":  # a test without assert: passes when its statements run
                timed(exec, compile(step[2], "<test>", "exec"), namespace)
                value = True
            elif kind == "call":
                fn_name, args = step[2], [decode(a) for a in step[3]]
                fn = namespace.get(fn_name)
                if fn is None and "Solution" in namespace:  # LeetCode style: class Solution: def f(self, ...)
                    fn = getattr(namespace["Solution"](), fn_name)
                if fn is None:
                    raise NameError(f"the solution defines no function {fn_name!r}")
                value = timed(fn, *args)
            elif kind == "judge":
                value = bool(timed(eval, compile(step[2], "<test>", "eval"), namespace))
            else:
                raise ValueError(f"unknown step {kind!r}")
        except BaseException as e:  # noqa: BLE001
            emit(["err", ident, _describe(e)])
            continue
        emit_value("judge" if kind == "judge" else "ok", ident, value)


def _run_stdio(job, emit, channel, devnull, case_timeout_s):
    try:
        code = compile(job["code"], "<solution>", "exec")
    except BaseException as e:  # noqa: BLE001
        emit(["loadfail", _describe(e)])
        return
    emit(["loaded"])
    cap = int(job.get("max_case_output_bytes", 65536))
    for index, text in enumerate(job["inputs"]):
        # The input goes in through an in-memory file: no pipe to keep fed, nothing on disk.
        stdin_fd = os.memfd_create("stdin")
        data = text.encode()
        while data:
            data = data[os.write(stdin_fd, data) :]
        os.lseek(stdin_fd, 0, os.SEEK_SET)
        read_fd, write_fd = os.pipe()
        try:
            pid = os.fork()
        except OSError as e:
            emit(["out", index, "", f"could not start: {e}", False])
            os.close(stdin_fd), os.close(read_fd), os.close(write_fd)
            continue
        if pid == 0:  # the case's process: fresh, nothing of the other cases in it
            status = 1
            try:
                os.setpgid(0, 0)
                os.close(channel)
                os.close(read_fd)
                os.dup2(stdin_fd, 0)
                os.dup2(write_fd, 1)
                os.dup2(devnull, 2)
                sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)))
                sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)))
                status = 0
                try:
                    exec(code, {"__name__": "__main__", "__builtins__": builtins})
                except SystemExit as e:
                    status = 0 if e.code is None else (e.code if isinstance(e.code, int) else 1)
                except BaseException:  # noqa: BLE001
                    status = 1
                sys.stdout.flush()
            finally:
                os._exit(status & 0xFF)
        os.close(stdin_fd)
        os.close(write_fd)
        out, truncated, deadline = bytearray(), False, time.monotonic() + case_timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select([read_fd], [], [], left)
            if not ready:
                break
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            out += chunk
            if len(out) > cap:
                truncated = True
                break
        os.close(read_fd)
        timed_out = time.monotonic() >= deadline
        try:
            os.killpg(pid, signal.SIGKILL)  # the case and anything it started in its group
        except OSError:
            pass
        _, wait_status = os.waitpid(pid, 0)
        if timed_out:
            status = "timed out"
        elif os.WIFEXITED(wait_status):
            status = os.WEXITSTATUS(wait_status)
        else:
            status = f"killed by signal {os.WTERMSIG(wait_status)}"
        emit(["out", index, bytes(out[:cap]).decode(errors="replace"), status, truncated])


if __name__ == "__main__":
    try:
        main()
    finally:
        # Skip interpreter teardown: untrusted atexit handlers or __del__ methods get no last word.
        os._exit(0)
