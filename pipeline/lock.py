"""One live writer per output directory (a student run, a teacher cache, a rollout directory, an on-policy run, a
model's eval results).

The writer holds an OS lock (`fcntl.flock`, exclusive, never waited for) on `.<name>.lock` beside the directory, taken
before anything in the directory is read for a decision, deleted or written. The lock file says who holds it (pid,
host, stage, start time), for the one-line refusal a second writer gets. The OS drops the lock when its holder exits,
however it exits (a SIGKILL included), so a lock file left by a dead writer is simply taken over, with a message; the
file itself is never deleted (deleting it would let two writers lock two different files of one name). The lock file
sits beside the directory, not in it, because a writer may delete the directory to start over.

Taking the lock creates the directory's parent: an output directory that cannot be written is refused here, before
any model loads. Multi-rank stages take it on rank 0 only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.config import ConfigError


class DirectoryBusy(ConfigError):
    """Another live process writes the directory."""


def lock_path(directory: Path) -> Path:
    directory = Path(directory)
    return directory.parent / f".{directory.name}.lock"


def check_writable(directory: Path, what: str) -> None:
    """Create `directory` (and its parents) or refuse in one line: a read-only or foreign place found in seconds."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{what} {directory} cannot be written ({e.strerror or e}); choose another out_dir") from None


class DirLock:
    """An exclusive lock on `directory` held by this process until `release` (or its exit)."""

    def __init__(self, directory: Path, stage: str):
        self.directory, self.stage = Path(directory), stage
        self.path = lock_path(self.directory)
        self.fd: int | None = None

    def acquire(self) -> DirLock:
        check_writable(self.path.parent, f"{self.stage}:")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _describe(_holder(fd))
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise ConfigError(f"{self.stage}: cannot lock {self.path} ({e.strerror})") from None
            raise DirectoryBusy(f"{self.directory} is being written by {holder}; wait for it to finish or choose "
                                f"another output (lock: {self.path})") from None
        previous = _read(fd)
        if previous and previous.get("pid") != os.getpid():  # the OS released it: its holder ended without saying so
            print(f"{self.stage}: taking over {self.directory} from {_describe(previous)}, which is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "stage": self.stage,
                                   "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n").encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.ftruncate(fd, 0)  # a clean release leaves an empty file: nothing to take over
            fcntl.flock(fd, fcntl.LOCK_UN)  # also for forked children (loader workers) that share this descriptor
        finally:
            os.close(fd)

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def writer(directory: Path, stage: str, *, take: bool = True) -> Iterator[DirLock | None]:
    """Hold `directory`'s lock for the block (`take=False`: ranks other than 0, which write under rank 0's lock)."""
    if not take:
        yield None
        return
    with DirLock(directory, stage) as held:
        yield held


def _read(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}


def _holder(fd: int, wait: float = 2.0) -> dict:
    """The holder's record; a holder writes it right after locking, so an empty file is read again for a moment."""
    end = time.monotonic() + wait
    while not (found := _read(fd)) and time.monotonic() < end:
        time.sleep(0.01)
    return found


def _describe(holder: dict) -> str:
    if not holder:
        return "another process (starting)"
    return (f"{holder.get('stage', 'a stage')} (pid {holder.get('pid')} on {holder.get('host')}, "
            f"since {holder.get('since')})")
