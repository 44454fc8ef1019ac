"""OS-level isolation for untrusted code: one bubblewrap (bwrap) sandbox per run.

Why bubblewrap: it is a Debian package (`bubblewrap`, installed by scripts/setup_env.sh), needs
no setuid bit, no daemon and no root, and works wherever unprivileged user namespaces do: CI
here, and Slurm nodes under enroot/pyxis. nsjail would do the same but ships as a binary that
needs extra libraries; Python audit hooks, used before, are no boundary at all. docs/rewards.md
states what the sandbox guarantees and what it needs from the host.

Per run: new user, PID, mount, network, IPC, UTS and cgroup namespaces; no capabilities; no
further user namespaces; an empty environment plus PATH/HOME/TMPDIR/LANG; a read-only view of
/usr, the Python installation (and, only with allow_site_packages, the virtual environment)
and the runner script; /dev minimal and read-only; /proc of its own PID namespace; a private
tmpfs of `tmpfs_mb` at /tmp (cwd and HOME) as the only writable path, gone with the sandbox.
Rlimits (CPU, address space, file size, open files, processes) are set by the runner as its
first act inside (bwrap has none; RLIMIT_NPROC set outside would be shared by every sandbox of
the host user). The parent kills the whole process group at the wall-clock deadline; bwrap's
--die-with-parent then tears down the PID namespace, which ends every process in it, including
ones that called setsid. The parent reads stdout with a byte cap.

Running as host root: a sandbox user that maps to host root is exempt from RLIMIT_NPROC, so
bwrap runs as nobody (65534) via util-linux `setpriv`. nobody may not be able to read the
Python installation or the project (pyenv under /root), so an outer bwrap, still root and in
a mount namespace of its own, first binds those onto a tmpfs where nobody can reach them.

If the sandbox cannot start, `SandboxUnavailableError` names the host setting that blocks it;
nothing runs unsandboxed instead.
"""

from __future__ import annotations

import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

from nemo_igrpo.utils.errors import SandboxUnavailableError

RUNNER = Path(__file__).with_name("_sandbox_runner.py")
_RUNNER_INSIDE = "/igrpo/_sandbox_runner.py"
_NOBODY = 65534
_STAGE = "/tmp"  # where the outer (root) bwrap puts what nobody must be able to read
_STDERR_CAP = 16384


@dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 6.0
    cpu_s: int = 5
    memory_mb: int = 512  # RLIMIT_AS, per process
    max_file_mb: int = 16  # RLIMIT_FSIZE
    max_open_files: int = 64  # RLIMIT_NOFILE
    max_processes: int = 8  # RLIMIT_NPROC, inside the sandbox's own user namespace
    tmpfs_mb: int = 64  # size of the writable /tmp
    max_output_bytes: int = 1 << 20  # what the parent reads from the sandbox, at most


@dataclass
class SandboxResult:
    stdout: bytes  # at most limits.max_output_bytes
    truncated: bool  # the sandbox wrote more than the cap and was killed for it
    timed_out: bool  # killed at the wall-clock deadline
    returncode: Optional[int]
    stderr: bytes  # bwrap's own errors; the runner silences the solution's stderr


def _is_host_root() -> bool:
    if os.geteuid() != 0:
        return False
    try:
        # Root inside a user namespace (rootless containers) is an ordinary host user already.
        first = Path("/proc/self/uid_map").read_text().split("\n")[0].split()
    except OSError:
        return True
    return first == ["0", "0", "4294967295"]


def _python_paths(allow_site_packages: bool) -> tuple[str, list[str]]:
    """(interpreter to run inside, host directories it needs, read-only)."""
    base = os.path.realpath(sys.base_prefix)
    if allow_site_packages and os.path.realpath(sys.prefix) != base:
        # A virtual environment: run its python so that site finds its site-packages.
        return sys.executable, [base, os.path.realpath(sys.prefix)]
    return os.path.realpath(sys.executable), [base]


def _system_binds() -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + top
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    if os.path.exists("/etc/ld.so.cache"):
        args += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    return args


def build_command(limits: SandboxLimits, allow_site_packages: bool = False) -> list[str]:
    """The full command line: [outer bwrap + setpriv when host root] + bwrap + runner."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailableError(
            "code_tests: bubblewrap is not installed (no `bwrap` on PATH). Install the Debian package "
            "`bubblewrap` (scripts/setup_env.sh does it when run as root); the code reward never runs "
            "solutions without it."
        )
    python, python_dirs = _python_paths(allow_site_packages)
    as_root = _is_host_root()
    outer: list[str] = []
    sources = {d: d for d in python_dirs if not (d == "/usr" or d.startswith("/usr/"))}
    runner_source = str(RUNNER)
    if as_root:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise SandboxUnavailableError(
                "code_tests: running as root needs util-linux `setpriv` to start the sandbox as an "
                "unprivileged user (root inside would ignore the process limit); install util-linux."
            )
        # Outer: a private mount namespace (still root) with a tmpfs over /tmp, onto which what
        # nobody needs is bound where nobody can traverse to it.
        outer = [bwrap, "--dev-bind", "/", "/", "--tmpfs", _STAGE, "--die-with-parent"]
        for i, host_dir in enumerate(sources):
            staged = f"{_STAGE}/igrpo-python-{i}"
            outer += ["--ro-bind", host_dir, staged]
            sources[host_dir] = staged
        outer += ["--ro-bind", runner_source, f"{_STAGE}/igrpo-runner.py"]
        runner_source = f"{_STAGE}/igrpo-runner.py"
        # The uid change clears the parent-death signal (prctl(2)); --pdeathsig sets it again, so
        # the inner bwrap dies with the outer one, which dies with us (--die-with-parent).
        outer += [
            "--",
            setpriv,
            f"--reuid={_NOBODY}",
            f"--regid={_NOBODY}",
            "--clear-groups",
            "--pdeathsig",
            "SIGKILL",
            "--",
        ]
    inner = [
        bwrap,
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--clearenv",
        "--hostname",
        "sandbox",
    ]
    for key, value in (("PATH", "/usr/bin:/bin"), ("HOME", "/tmp"), ("TMPDIR", "/tmp"), ("LANG", "C.UTF-8")):
        inner += ["--setenv", key, value]
    inner += _system_binds()
    for host_dir, source in sources.items():
        inner += ["--ro-bind", source, host_dir]  # at its own path: pyenv's libpython has an absolute rpath
    inner += [
        "--ro-bind",
        runner_source,
        _RUNNER_INSIDE,
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--size",
        str(int(limits.tmpfs_mb) * 1024 * 1024),
        "--tmpfs",
        "/tmp",
        "--chdir",
        "/tmp",
        # Only /tmp stays writable: /dev and bwrap's root are tmpfs too, without a size limit.
        "--remount-ro",
        "/dev",
        "--remount-ro",
        "/",
    ]
    mb = 1024 * 1024
    runner = (
        [python, "-I"]
        + ([] if allow_site_packages else ["-S"])
        + [
            _RUNNER_INSIDE,
            str(int(limits.cpu_s)),
            str(int(limits.memory_mb) * mb),
            str(int(limits.max_file_mb) * mb),
            str(int(limits.max_open_files)),
            str(int(limits.max_processes)),
            # The in-sandbox watchdog's deadline: after the parent's own (which normally ends the run).
            str(int(math.ceil(limits.wall_s)) + 5),
        ]
    )
    return outer + inner + ["--"] + runner


def _kill(proc: subprocess.Popen) -> None:
    # The group holds bwrap (outer and inner); their death tears down the PID namespace, which
    # kills everything inside, setsid or not.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _run(command: list[str], job: dict, limits: SandboxLimits) -> SandboxResult:
    payload = json.dumps(job).encode()
    # start_new_session: bwrap gets its own process group. No preexec_fn: unsafe in threads.
    proc = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd="/",
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        start_new_session=True,
    )
    deadline = time.monotonic() + limits.wall_s
    out, err = bytearray(), bytearray()
    truncated = timed_out = False
    try:
        # The job is small next to a pipe buffer only sometimes: write it in the same loop that
        # reads, so a solution flooding stdout cannot deadlock us.
        os.set_blocking(proc.stdin.fileno(), False)
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ, "out")
            sel.register(proc.stderr, selectors.EVENT_READ, "err")
            sel.register(proc.stdin, selectors.EVENT_WRITE, "in")
            view = memoryview(payload)
            while sel.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                for key, _ in sel.select(timeout=left):
                    if key.data == "in":
                        try:
                            written = os.write(key.fileobj.fileno(), view[:65536])
                        except BlockingIOError:
                            continue
                        except BrokenPipeError:  # it stopped reading (died): the rest is moot
                            written = len(view)
                        view = view[written:]
                        if not len(view):
                            sel.unregister(key.fileobj)
                            key.fileobj.close()
                        continue
                    chunk = os.read(key.fileobj.fileno(), 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    if key.data == "out":
                        out += chunk
                        if len(out) > limits.max_output_bytes:
                            truncated = True
                    elif len(err) < _STDERR_CAP:
                        err += chunk[: _STDERR_CAP - len(err)]
                if truncated:
                    break
    finally:
        if truncated or timed_out:
            _kill(proc)
        try:
            returncode = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill(proc)
            timed_out = True
            returncode = proc.wait()
        _kill(proc)  # anything bwrap left in the group (it should have left nothing)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                stream.close()
            except OSError:
                pass
    return SandboxResult(
        bytes(out[: limits.max_output_bytes]), truncated, timed_out, None if timed_out else returncode, bytes(err)
    )


def _host_setting_hint(stderr: str) -> str:
    hints = []

    def read(path: str) -> Optional[str]:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return None

    if read("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        hints.append("sysctl kernel.unprivileged_userns_clone=0 (set it to 1)")
    if read("/proc/sys/user/max_user_namespaces") == "0":
        hints.append("sysctl user.max_user_namespaces=0 (set it above 0, e.g. 15000)")
    if read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        hints.append(
            "sysctl kernel.apparmor_restrict_unprivileged_userns=1 (set it to 0, or give bwrap an "
            "AppArmor profile that allows userns)"
        )
    if "Operation not permitted" in stderr and ("namespace" in stderr or "unshare" in stderr) and not hints:
        hints.append(
            "a seccomp filter or container runtime forbids unshare (Docker's default profile does: "
            "run the container with --security-opt seccomp=unconfined or a profile allowing "
            "unshare/clone with namespace flags)"
        )
    if "proc" in stderr and not hints:
        hints.append(
            "mounting a new /proc is refused (a container with a masked /proc, e.g. Docker without "
            "--security-opt systempaths=unconfined)"
        )
    return "; ".join(hints) if hints else "unprivileged user namespaces must be allowed on this host"


@lru_cache(maxsize=4)
def _checked(allow_site_packages: bool) -> bool:
    limits = SandboxLimits(wall_s=30.0, cpu_s=10, memory_mb=512)
    command = build_command(limits, allow_site_packages)
    try:
        result = _run(command, {"mode": "probe"}, limits)
    except OSError as e:
        raise SandboxUnavailableError(f"code_tests: cannot start bubblewrap: {e}") from None
    lines = result.stdout.decode(errors="replace").splitlines()
    try:
        record = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        record = None
    if result.returncode == 0 and isinstance(record, list) and record[:1] == ["ready"]:
        if record[1] == 0 and _is_host_root():
            raise SandboxUnavailableError("code_tests: the sandbox user is root, so the process limit would not hold")
        return True
    stderr = result.stderr.decode(errors="replace").strip()
    raise SandboxUnavailableError(
        f"code_tests: the bubblewrap sandbox does not start here, so no solution is run "
        f"(exit {result.returncode}{', timed out' if result.timed_out else ''}: {stderr[-500:] or 'no message'}). "
        f"Host setting: {_host_setting_hint(stderr)}. See docs/rewards.md, 'code_tests sandbox'."
    )


def ensure_available(allow_site_packages: bool = False) -> None:
    """Raise SandboxUnavailableError (naming the host setting) unless the sandbox starts here.

    A success is remembered per process; a failure is not, so fixing the host needs no restart."""
    _checked(bool(allow_site_packages))


def run_sandboxed(job: dict, limits: SandboxLimits, allow_site_packages: bool = False) -> SandboxResult:
    """Run the runner with `job` on stdin inside a fresh sandbox."""
    ensure_available(allow_site_packages)
    return _run(build_command(limits, allow_site_packages), job, limits)
