"""What keeps one run's results truthful while it runs: the lock that gives one run at a time its
output folder, and SIGTERM turned into an exception that the run records like Ctrl-C."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from experiment_config import ConfigError

LOCK_FILE = ".exp6.lock"  # in the output folder; holds the pid of the run that owns the folder


class RunTerminated(KeyboardInterrupt):
    """SIGTERM arrived (`timeout`, a scheduler's kill). A KeyboardInterrupt, so that every place that
    handles Ctrl-C handles it too; the run is recorded as "terminated" rather than "interrupted"."""


def stop_status(stop: BaseException) -> str:
    """The status a run stopped by `stop` gets: "terminated" for SIGTERM, "interrupted" for Ctrl-C."""
    return "terminated" if isinstance(stop, RunTerminated) else "interrupted"


@contextlib.contextmanager
def sigterm_raises_run_terminated() -> Iterator[None]:
    """While inside, SIGTERM raises RunTerminated; the previous handler is restored on the way out.

    Only the first SIGTERM raises: a second one during the clean-up (saving the JSON) is ignored so
    that the clean-up finishes. Python handles signals in the main thread only; in another thread
    this changes nothing (the signal keeps its process-wide handler).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal fired
        if not fired:
            fired = True
            raise RunTerminated(f"terminated by {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        # None: a handler installed outside Python, which cannot be reinstated; the default is the closest
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextlib.contextmanager
def output_dir_lock(directory: Path, wait_for_pid_s: float = 1.0) -> Iterator[Path]:
    """Hold an exclusive lock on `directory` (flock on directory/.exp6.lock, which holds our pid) while inside.

    A folder locked by another run raises ConfigError at once, naming that run's pid, so two runs
    never write one results file and drop each other's seeds. The lock dies with its process (the
    kernel drops it even on SIGKILL); the file stays, empty, and is harmless. `wait_for_pid_s`
    covers the instant between another run taking the lock and writing its pid into the file.
    """
    path = directory / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        raise ConfigError(f"cannot create the lock file {path} ({error.strerror or error}); choose another --output-dir") from error
    try:
        deadline = time.monotonic() + wait_for_pid_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                if holder or time.monotonic() > deadline:
                    raise ConfigError(
                        f"another run (pid {holder or 'unknown'}) is writing results to {directory}; "
                        f"wait for it to finish or choose another --output-dir") from None
                time.sleep(0.02)  # it has the lock but has not written its pid yet, or is just letting go
            except OSError as error:  # e.g. a file system without locks: refuse rather than risk lost results
                raise ConfigError(f"cannot lock {path} ({error.strerror or error}); choose another --output-dir") from error
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # so that a pid in the file always names a run that holds the lock
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
