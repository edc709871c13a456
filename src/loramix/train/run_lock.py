"""One training process per run folder: an OS lock (``fcntl.flock``) held while a run writes.

Two runs into the same ``output_dir`` would interleave their metrics, checkpoints and adapter (and a
checkpoint could be renamed away under the other's feet), so every process that writes a run folder
first takes ``hold_run_folder(output_dir)``; a second process gets ``RunFolderBusy`` naming the folder
and the owner (pid, host, start time). ``loramix train`` takes it before it checks or moves the folder
aside (``claim_run_folder``); the ``Trainer`` API takes it before a job writes anything
(``Job.start_log``) and gives it back in ``Trainer.cleanup``.

The lock file lies *beside* the run folder, ``<parent>/.<name>.loramix.lock``: the lock guards the
name ``output_dir``, which stays the same while ``--overwrite`` renames an old run to
``<name>.old-<time>``, and the run folder itself holds only what the run writes. The kernel releases
the lock when the process ends, however it ends (kill -9 included), so a stale lock never blocks a
``--resume``. Within one process the lock is counted (the command and its trainer both hold it).

Example:
    >>> lock = hold_run_folder("runs/mix")   # RunFolderBusy if another process trains into runs/mix
    >>> ...                                   # write the run
    >>> lock.release()
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .checkpoint import RunFolderError


class RunFolderBusy(RunFolderError):
    """Another process holds the run folder; the message names the folder and that process."""


def lock_path(output_dir: str | os.PathLike) -> Path:
    """The lock file of ``output_dir``: ``.<name>.loramix.lock`` in its parent (symlinks resolved, so two
    spellings of one folder share one lock)."""
    real = Path(os.path.realpath(output_dir))
    return real.parent / f".{real.name}.loramix.lock"


class RunFolderLock:
    """A held run-folder lock (see ``hold_run_folder``); ``release`` gives one hold back."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd, self.holds = path, fd, 1

    def release(self) -> None:
        """Give back one hold; the last one deletes the lock file (while still locked) and unlocks it."""
        if self.holds == 0:
            return
        self.holds -= 1
        if self.holds:
            return
        _HELD.pop(str(self.path), None)
        # Deleted while locked: a process that opened the old file meanwhile sees it is gone and retries.
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)  # closing the only descriptor releases the lock


_HELD: dict[str, RunFolderLock] = {}  # lock file → this process's lock on it


def _owner() -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}) + "\n"


OWNER_WAIT_S = 2.0  # how long a refused process waits for the holder to write who it is


def _describe_owner(fd: int) -> str:
    """The holder of the lock on ``fd``, as the holder wrote it. The holder writes itself just after it
    locks, so a process refused in between waits up to ``OWNER_WAIT_S`` for that line to name the holder."""
    deadline = time.monotonic() + OWNER_WAIT_S
    while True:
        try:
            owner = json.loads(os.pread(fd, 4096, 0).decode() or "null")
            return f"pid {owner['pid']} on host {owner['host']}, started {owner['started']}"
        except (OSError, ValueError, TypeError, KeyError):  # locked, not written yet (or half written)
            if time.monotonic() >= deadline:
                return "a process that is just starting"
            time.sleep(0.02)


def hold_run_folder(output_dir: str | os.PathLike, *, key: str = "output_dir") -> RunFolderLock:
    """Take the lock of run folder ``output_dir`` for this process (non-blocking), or a further hold of it
    if this process has it already. Creates ``output_dir``'s parent folder, nothing inside it.

    Raises:
        RunFolderBusy: another process holds it; names the folder, the owner and ``key``.
    """
    path = lock_path(output_dir)
    held = _HELD.get(str(path))
    if held is not None:
        held.holds += 1
        return held
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _describe_owner(fd)
            os.close(fd)
            raise RunFolderBusy(f"{output_dir} is in use by another training run ({owner}; lock file {path}): "
                                f"wait for it to end, or choose another {key}=") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its owner deleted that file while releasing it: lock the current one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, _owner().encode(), 0)
    except OSError:
        os.close(fd)
        raise
    lock = _HELD[str(path)] = RunFolderLock(path, fd)
    return lock
