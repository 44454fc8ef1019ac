"""What reaches the terminal during `igrpo train`, `igrpo eval` and `igrpo demo`.

Other libraries reach the terminal three ways: Python logging (vLLM installs its own handler),
Python warnings, and raw writes to file descriptors 1 and 2, by this process and by the child
processes it starts (vLLM's engine core, tqdm bars of transformers and safetensors). Filtering
any one of them leaves the others, so a quiet session works on the descriptors themselves:

* the terminal's descriptors are duplicated first: the project's own lines (`echo`), its
  progress bar and its warnings are written there;
* descriptors 1 and 2 are then pointed at `<run.dir>/logs/rank<R>.log`, so every other write,
  including those of child processes (which inherit the descriptors), lands in that file;
* on leaving the session, normally or by an exception, the original descriptors come back
  before anything else runs, so `cli.main`'s one-line errors and an unexpected traceback reach
  the user as before (the traceback is also written to the log first).

`logging.console: verbose` (or `--verbose`) keeps everything on the terminal as before.
On ranks other than 0 nothing is written to the terminal at all; torchrun still shows a
failed rank's exit and traceback, because the traceback is printed after the restore.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Optional

from nemo_igrpo.utils.errors import UserError

CONSOLE_MODES = ("quiet", "verbose")
PREFIX = "[igrpo]"

_project_logger = logging.getLogger("nemo_igrpo")


def _rank() -> int:
    # torchrun's RANK; the session starts before torch.distributed is initialized.
    try:
        return int(os.environ.get("RANK", "0").strip() or 0)
    except ValueError:
        return 0


@dataclass
class _Session:
    quiet: bool
    rank: int
    out: IO[str]  # the terminal's stdout (or sys.stdout when verbose)
    err: IO[str]  # the terminal's stderr: the progress bar and project warnings
    log_path: Optional[Path]
    bar: object = None  # the trainer's tqdm bar, cleared around each console line


_active: Optional[_Session] = None


def active() -> bool:
    return _active is not None


def echo(message: str) -> None:
    """One line of the project's console (what is starting, step summaries, results)."""
    s = _active
    if s is None:
        print(message, flush=True)
        return
    if s.quiet:
        # The log file gets the line too, so it reads as the whole story of the run.
        print(message, file=sys.stdout, flush=True)
    if s.rank != 0:
        return
    bar = s.bar
    if bar is not None:
        bar.clear()
    s.out.write(message + "\n")
    s.out.flush()
    if bar is not None:
        bar.refresh()


def progress_stream() -> IO[str]:
    """Where the progress bar draws: the terminal, even while descriptor 2 points at the log."""
    return _active.err if _active is not None else sys.stderr


def attach_progress_bar(bar) -> None:
    """Console lines clear and redraw this bar so they do not break it (None detaches)."""
    if _active is not None:
        _active.bar = bar


def resolve_mode(configured: str, verbose_flag: bool = False) -> str:
    mode = "verbose" if verbose_flag else str(configured or "quiet").lower()
    if mode not in CONSOLE_MODES:
        raise UserError(f"logging.console: must be one of {', '.join(CONSOLE_MODES)}, got {configured!r}")
    return mode


class _ProjectConsoleHandler(logging.Handler):
    """The project's own warnings and errors (nemo_igrpo.*) on the terminal, one line each."""

    def __init__(self, session: _Session):
        super().__init__(level=logging.WARNING)
        self.session = session

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = "error" if record.levelno >= logging.ERROR else "warning"
            text = " ".join(line.strip() for line in record.getMessage().splitlines() if line.strip())
            bar = self.session.bar
            if bar is not None:
                bar.clear()
            self.session.err.write(f"{PREFIX} {level}: {text}\n")
            self.session.err.flush()
            if bar is not None:
                bar.refresh()
        except Exception:  # a console hiccup must never stop training
            self.handleError(record)


def _terminal_stream(fd: int, like: IO[str]) -> IO[str]:
    return os.fdopen(
        fd, "w", buffering=1, encoding=getattr(like, "encoding", None) or "utf-8", errors="replace", closefd=False
    )


@contextlib.contextmanager
def session(run_dir: str | Path, mode: str = "quiet", command: str = "train") -> Iterator[_Session]:
    """The console for one command run. Nested calls (demo -> train) reuse the outer session."""
    global _active
    if _active is not None:
        yield _active
        return
    rank = _rank()
    if mode == "verbose":
        _active = _Session(quiet=False, rank=rank, out=sys.stdout, err=sys.stderr, log_path=None)
        try:
            yield _active
        finally:
            _active = None
        return

    log_dir = Path(run_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"rank{rank}.log"
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)  # not inherited by children (PEP 446)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    term_out = _terminal_stream(saved_out, sys.stdout)
    term_err = _terminal_stream(saved_err, sys.stderr)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    s = _Session(quiet=True, rank=rank, out=term_out, err=term_err, log_path=log_path)

    # Python logging: every record into the log (through descriptor 2); the project's warnings
    # also on the terminal. The root logger's state is put back afterwards (tests, the API).
    root = logging.getLogger()
    saved_root = (root.level, list(root.handlers))
    file_handler = logging.StreamHandler(sys.stderr)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.handlers = [file_handler]
    root.setLevel(os.environ.get("IGRPO_LOG_LEVEL", "INFO").upper())
    console_handler = _ProjectConsoleHandler(s) if rank == 0 else None
    if console_handler is not None:
        _project_logger.addHandler(console_handler)
    logging.captureWarnings(True)  # warnings become log records (into the file), not raw stderr

    _active = s
    print(
        f"===== igrpo {command} (pid {os.getpid()}, rank {rank}) {time.strftime('%Y-%m-%d %H:%M:%S')} =====", flush=True
    )
    if rank == 0:
        term_out.write(
            f"{PREFIX} {command}: run dir {run_dir}; other libraries' output goes to {log_path} "
            "(--verbose shows it here)\n"
        )
        term_out.flush()
    try:
        yield s
    except BaseException:
        # The full traceback belongs in the log; the terminal gets what cli.main decides
        # (one line for a user error, the traceback for a bug) once the descriptors are back.
        traceback.print_exc(file=sys.stderr)
        raise
    finally:
        _active = None
        if s.bar is not None:
            with contextlib.suppress(Exception):
                s.bar.close()
        logging.captureWarnings(False)
        if console_handler is not None:
            _project_logger.removeHandler(console_handler)
        root.handlers = saved_root[1]
        root.setLevel(saved_root[0])
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for stream in (term_out, term_err):
            with contextlib.suppress(Exception):
                stream.close()
        os.close(saved_out)
        os.close(saved_err)
