"""Runs one untrusted Python solution and its tests. Executed as a script by rewards/code.py:

    python -I -S _sandbox_runner.py   (job as JSON on stdin)

It imports nothing from nemo_igrpo and only stdlib modules, because `-I -S` leaves just the
standard library on sys.path. Order matters: everything the harness needs is read, bound to
local names and locked down BEFORE the first line of untrusted code runs.

Result protocol: one line per test on a private duplicate of the original stdout,
`<nonce> <index> PASS|FAIL <reason>`. The solution's own stdout/stderr go to /dev/null, and
the nonce lives only in a local variable of `main`, so printed text cannot forge a result.
"""

import json
import os
import resource
import signal
import sys
import threading
import time


class _TestTimeout(BaseException):
    # A BaseException so that a solution's `except Exception:` does not swallow it.
    pass


def _is_write_open(mode, flags):
    if isinstance(mode, str) and any(c in mode for c in "wax+"):
        return True
    if isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND):
        return True
    return False


def _make_audit_hook(sandbox_dir):
    realpath, fsdecode, sep = os.path.realpath, os.fsdecode, os.sep
    inside_prefix = sandbox_dir.rstrip(sep) + sep

    def inside(path):
        if isinstance(path, int):
            return True  # an already-open descriptor: opening it was checked when it was made
        try:
            resolved = realpath(fsdecode(path))
        except Exception:
            return False
        return resolved == sandbox_dir or resolved.startswith(inside_prefix)

    # Events that are refused outright: network, new processes, signals to other processes,
    # native code loading, limit changes, and the introspection routes (frames, gc) by which
    # code could reach the harness's locals.
    blocked = frozenset({
        "socket.__new__", "socket.bind", "socket.connect", "socket.getaddrinfo", "socket.gethostbyname",
        "socket.gethostbyaddr", "socket.sendto", "socket.sendmsg", "socket.socketpair",
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
        "os.startfile", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill",
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "ctypes.addressof",
        "resource.setrlimit", "resource.prlimit", "sys._getframe", "sys._current_frames",
        "sys._current_exceptions", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
        "os.symlink", "os.chroot", "webbrowser.open", "sys.settrace", "sys.setprofile",
    })
    blocked_imports = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "subprocess", "multiprocessing",
                                 "_multiprocessing", "socket", "_socket", "ssl", "_ssl"})
    # Events whose arguments at these positions are paths that must lie inside the sandbox.
    path_events = {
        "os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.mkdir": (0,), "os.chmod": (0,),
        "os.chown": (0,), "os.link": (0, 1), "os.truncate": (0,), "os.utime": (0,), "shutil.rmtree": (0,),
        "shutil.move": (0, 1), "shutil.copyfile": (1,), "shutil.copytree": (1,), "os.mkfifo": (0,),
        "os.mknod": (0,), "os.setxattr": (0,), "os.removexattr": (0,), "os.chflags": (0,),
    }
    # The audited ways to get hold of a frame object (and from it the harness's locals).
    frame_attributes = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame"})

    def hook(event, args):
        if event in blocked:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            if _is_write_open(mode, flags) and not inside(path):
                raise PermissionError(f"sandbox: writing outside the working directory is not allowed: {path!r}")
        elif event == "import":
            if args and isinstance(args[0], str) and args[0].split(".")[0] in blocked_imports:
                raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
        elif event == "object.__getattr__":
            if len(args) > 1 and args[1] in frame_attributes:
                raise PermissionError(f"sandbox: reading .{args[1]} is not allowed")
        elif event in path_events:
            for position in path_events[event]:
                if position < len(args) and args[position] is not None and not inside(args[position]):
                    raise PermissionError(f"sandbox: {event} outside the working directory is not allowed")

    return hook


def main():
    job = json.loads(sys.stdin.read())
    nonce = job["nonce"]
    sandbox_dir = os.path.realpath(job["sandbox_dir"])
    code, steps = job["code"], job["steps"]
    per_test_timeout_s = job.get("per_test_timeout_s")

    # Private result channel, then silence the solution's stdout/stderr and give it no stdin.
    write, encode = os.write, str.encode
    report_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.chdir(sandbox_dir)

    def report(index, passed, reason=""):
        line = f"{nonce} {index} {'PASS' if passed else 'FAIL'} {reason}".replace("\n", " ")[:300] + "\n"
        try:
            write(report_fd, encode(line))
        except OSError:
            pass

    memory = int(job["memory_mb"]) * 1024 * 1024
    cpu_s = int(job["cpu_s"])
    file_bytes = int(job["max_file_mb"]) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    # Soft limit: SIGXCPU (kills by default); hard limit a second later: SIGKILL.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    def on_alarm(signum, frame):
        raise _TestTimeout()

    signal.signal(signal.SIGALRM, on_alarm)
    setitimer, ITIMER_REAL = signal.setitimer, signal.ITIMER_REAL
    timeout_type = _TestTimeout

    def run(source, namespace):
        if per_test_timeout_s:
            setitimer(ITIMER_REAL, float(per_test_timeout_s))
        try:
            exec(compile(source, "<solution>", "exec"), namespace)
        finally:
            if per_test_timeout_s:
                setitimer(ITIMER_REAL, 0)

    # Watchdog: the parent kills this process at its wall-clock limit, but if the parent itself
    # is killed first (the RewardManager abandoning a hung worker) nobody would; a sleeping
    # solution uses no CPU time, so RLIMIT_CPU would not end it either.
    wall_timeout_s, exit_now, sleep = float(job["wall_timeout_s"]), os._exit, time.sleep

    def watchdog():
        sleep(wall_timeout_s)
        exit_now(124)

    threading.Thread(target=watchdog, daemon=True).start()
    sys.addaudithook(_make_audit_hook(sandbox_dir))
    # `__name__` is not "__main__" so a solution's `if __name__ == "__main__":` block (often a
    # stdin-reading driver) does not run.
    namespace = {"__name__": "__solution__", "__builtins__": __builtins__}
    try:
        run(code, namespace)
    except timeout_type:
        report(-1, False, "solution timed out")
        return
    except BaseException as e:  # noqa: BLE001 - anything the untrusted code raises
        report(-1, False, f"solution raised {type(e).__name__}")
        return
    for index, (kind, source) in enumerate(steps):
        try:
            run(source, namespace)
            passed, reason = True, ""
        except timeout_type:
            passed, reason = False, "timed out"
        except BaseException as e:  # noqa: BLE001
            passed, reason = False, f"{type(e).__name__}: {str(e)[:100]}"
        if kind == "test":
            report(index, passed, reason)


if __name__ == "__main__":
    main()
    # Skip interpreter teardown: untrusted atexit handlers or __del__ methods get no last word.
    os._exit(0)
