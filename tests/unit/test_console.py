"""The console session (utils/console.py): what reaches the terminal and what goes to
<run.dir>/logs/rank<R>.log. Each case runs in a fresh Python process, because the session
rewires file descriptors 1 and 2, which pytest itself captures."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import REPO

# Library noise through all three routes: logging (a "vllm" logger), warnings, raw writes to the
# descriptors by this process and by a child process; then the project's own lines.
_SCRIPT = textwrap.dedent("""
    import logging, os, subprocess, sys, warnings
    from nemo_igrpo.utils import console

    run_dir, mode, fail = sys.argv[1], sys.argv[2], sys.argv[3]
    try:
        with console.session(run_dir, mode, "train"):
            logging.getLogger("vllm.engine").warning("LIBRARY-LOG reset prefix cache")
            warnings.warn("LIBRARY-WARNING apex is not installed")
            print("LIBRARY-PRINT stdout")
            print("LIBRARY-PRINT stderr", file=sys.stderr)
            os.write(2, b"LIBRARY-RAW fd2\\n")
            subprocess.run([sys.executable, "-c", "import sys; print('LIBRARY-CHILD out'); "
                            "print('LIBRARY-CHILD err', file=sys.stderr)"], check=True)
            console.echo("[igrpo] PROJECT-LINE step 1/1")
            logging.getLogger("nemo_igrpo.trainer").warning("PROJECT-WARNING something to know")
            if fail == "user":
                raise ValueError("bad input")
            if fail == "bug":
                raise RuntimeError("a bug")
    except ValueError as e:
        print(f"igrpo train: error: {e}", file=sys.stderr)  # what cli.main does, after the session
        sys.exit(2)
    print("AFTER-SESSION stdout")
""")


def _run(tmp_path: Path, mode: str = "quiet", fail: str = "no", rank: str = "0") -> subprocess.CompletedProcess:
    script = tmp_path / "session.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "RANK": rank, "PYTHONWARNINGS": "always"}
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run"), mode, fail],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _log(tmp_path: Path, rank: int = 0) -> str:
    return (tmp_path / "run" / "logs" / f"rank{rank}.log").read_text()


def test_quiet_session_sends_library_output_to_the_log(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    terminal = proc.stdout + proc.stderr
    assert "LIBRARY" not in terminal, terminal
    assert "[igrpo] PROJECT-LINE step 1/1" in proc.stdout
    assert "[igrpo] warning: PROJECT-WARNING something to know" in proc.stderr
    assert "AFTER-SESSION stdout" in proc.stdout  # the terminal is back after the session
    assert "logs/rank0.log" in proc.stdout  # the user is told where the rest went
    log = _log(tmp_path)
    for line in (
        "LIBRARY-LOG reset prefix cache",
        "LIBRARY-WARNING apex",
        "LIBRARY-PRINT stdout",
        "LIBRARY-PRINT stderr",
        "LIBRARY-RAW fd2",
        "LIBRARY-CHILD out",
        "LIBRARY-CHILD err",
        "PROJECT-LINE",
        "PROJECT-WARNING",
    ):
        assert line in log, f"{line!r} not in the log:\n{log}"


def test_verbose_session_keeps_everything_on_the_terminal(tmp_path):
    proc = _run(tmp_path, mode="verbose")
    assert proc.returncode == 0, proc.stderr
    terminal = proc.stdout + proc.stderr
    for line in (
        "LIBRARY-WARNING apex",
        "LIBRARY-PRINT stdout",
        "LIBRARY-PRINT stderr",
        "LIBRARY-RAW fd2",
        "LIBRARY-CHILD out",
        "LIBRARY-CHILD err",
        "[igrpo] PROJECT-LINE",
    ):
        assert line in terminal, f"{line!r} not on the terminal:\n{terminal}"
    assert not (tmp_path / "run" / "logs").exists()


def test_user_error_reaches_the_terminal_and_the_log_keeps_the_traceback(tmp_path):
    proc = _run(tmp_path, fail="user")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "igrpo train: error: bad input"
    assert "Traceback" not in proc.stderr
    assert "ValueError: bad input" in _log(tmp_path)


def test_unexpected_exception_keeps_its_traceback_on_the_terminal(tmp_path):
    proc = _run(tmp_path, fail="bug")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "RuntimeError: a bug" in proc.stderr
    assert "RuntimeError: a bug" in _log(tmp_path)


def test_other_ranks_write_nothing_to_the_terminal(tmp_path):
    proc = _run(tmp_path, rank="1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "AFTER-SESSION stdout" and proc.stderr == ""
    log = _log(tmp_path, rank=1)
    assert "PROJECT-LINE" in log and "LIBRARY-CHILD out" in log


def test_mode_is_checked():
    from nemo_igrpo.utils import console
    from nemo_igrpo.utils.errors import UserError

    assert console.resolve_mode("quiet") == "quiet"
    assert console.resolve_mode("quiet", verbose_flag=True) == "verbose"
    assert console.resolve_mode("VERBOSE") == "verbose"
    with pytest.raises(UserError, match="logging.console"):
        console.resolve_mode("loud")


def test_echo_without_a_session_prints(capsys):
    from nemo_igrpo.utils import console

    console.echo("[igrpo] plain")
    assert capsys.readouterr().out == "[igrpo] plain\n"
