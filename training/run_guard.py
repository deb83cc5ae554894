"""What keeps one run's results truthful while it runs: the lock that gives one run at a time its
output folder, SIGTERM turned into an exception that the run records like Ctrl-C, saves that a
second Ctrl-C cannot cut short, and the two ways a run ends badly after its setup was accepted."""

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

from common.errors import ConfigError

LOCK_FILE = ".exp6.lock"  # in the output folder; holds the pid of the run that owns the folder (for messages only)


class SaveFailed(RuntimeError):
    """The results could not be written (disk full, folder gone); the message says so, and the results
    computed so far were printed to the terminal before it was raised."""


class ExperimentFailed(RuntimeError):
    """The experiment ran to its end but some arm has no completed run, so there is nothing to compare."""


class RunTerminated(KeyboardInterrupt):
    """SIGTERM arrived (`timeout`, a scheduler's kill). A KeyboardInterrupt, so that every place that
    handles Ctrl-C handles it too; the run is recorded as "terminated" rather than "interrupted"."""


def stop_status(stop: BaseException) -> str:
    """The status a run stopped by `stop` gets: "terminated" for SIGTERM, "interrupted" for Ctrl-C."""
    return "terminated" if isinstance(stop, RunTerminated) else "interrupted"


class _RaiseOnce:
    """A SIGTERM handler that raises RunTerminated the first time only."""

    def __init__(self) -> None:
        self.fired = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if not self.fired:
            self.fired = True
            raise RunTerminated(f"terminated by {signal.Signals(signum).name}")


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
    previous = signal.signal(signal.SIGTERM, _RaiseOnce())
    try:
        yield
    finally:
        # None: a handler installed outside Python, which cannot be reinstated; the default is the closest
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextlib.contextmanager
def signals_deferred(redeliver: bool = True) -> Iterator[None]:
    """While inside, Ctrl-C (SIGINT) and SIGTERM wait, so the save inside completes whole.

    On the way out the previous handlers come back and, with `redeliver`, the first signal that arrived
    is raised again, so the run stops right after the save; without it (the stop handler's own final
    save, already stopping) it is dropped. Python handles signals in the main thread only; in another
    thread this changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    if pending and redeliver:
        signal.raise_signal(pending[0])  # through the handler that is back in place: KeyboardInterrupt, RunTerminated


def _lock_holder(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


@contextlib.contextmanager
def output_dir_lock(directory: Path, wait_for_pid_s: float = 1.0) -> Iterator[Path]:
    """Hold an exclusive lock on `directory` itself (flock on the folder) while inside.

    A folder locked by another run raises ConfigError at once, naming that run's pid (read from
    directory/.exp6.lock, which only says who holds the lock), so two runs never write one results
    file and drop each other's seeds. The lock is on the folder, not on a file in it: deleting
    .exp6.lock does not release it. It dies with its process (the kernel drops it even on SIGKILL).
    `wait_for_pid_s` covers the instant between another run taking the lock and writing its pid.
    """
    path = directory / LOCK_FILE
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as error:
        raise ConfigError(f"cannot open {directory} to lock it ({error.strerror or error}); choose another --output-dir") from error
    try:
        deadline = time.monotonic() + wait_for_pid_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _lock_holder(path)
                if holder or time.monotonic() > deadline:
                    raise ConfigError(
                        f"another run (pid {holder or 'unknown'}) is writing results to {directory}; "
                        f"wait for it to finish or choose another --output-dir") from None
                time.sleep(0.02)  # it has the lock but has not written its pid yet, or is just letting go
            except OSError as error:  # e.g. a file system without locks: refuse rather than risk lost results
                raise ConfigError(f"cannot lock {directory} ({error.strerror or error}); choose another --output-dir") from error
        try:
            path.write_text(f"{os.getpid()}\n")
        except OSError as error:
            fcntl.flock(fd, fcntl.LOCK_UN)
            raise ConfigError(f"cannot write {path} ({error.strerror or error}); choose another --output-dir") from error
        try:
            yield path
        finally:
            with contextlib.suppress(OSError):  # so that a pid in the file always names a run that holds the lock
                if _lock_holder(path) == str(os.getpid()):
                    path.write_text("")
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
