"""The ledger's local journal: every row is on disk before PostgreSQL has it, until it has it.

Each gateway worker appends every ledger row, as one JSON line, to its current *segment*
``ledger-<pid>-<seq>.jsonl`` the moment the spend logger makes it (one ``write`` to an
``O_APPEND`` file: the row survives the process being killed; no fsync, so a power cut of the
host can lose the last rows, as it can lose the page cache). When the ledger writer takes a batch
it *seals* the segment (later rows go to a new one); once the batch is in PostgreSQL the sealed
segment is deleted. A segment whose batch could not be written stays: it is the spool, replayed
when PostgreSQL is back. Replays insert with ``ON CONFLICT DO NOTHING`` on the ledger's primary
key (ts, request_id), so a row stored twice counts once.

Each process holds an exclusive ``flock`` on ``ledger-<pid>.lock`` while it lives. Segments of a
pid whose lock is free belong to a process that is gone (crashed, replaced, or a gateway stopped
before its last batch was written): any worker — or ``replay_folder`` after the gateway has
stopped — may adopt them, under that lock, so two never replay the same files at once.

A line cut short by a crash in mid-write is skipped (and logged): it was never a whole row.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_SEGMENT = re.compile(r"^ledger-(\d+)-(\d+)\.jsonl$")


def encode(row: dict[str, Any]) -> bytes:
    return (json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


class Spool:
    """The journal folder as one process (``pid``) uses it."""

    def __init__(self, folder: Path, pid: int | None = None) -> None:
        self.folder = Path(folder)
        self.pid = os.getpid() if pid is None else pid
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._current: Path | None = None
        self._seq = time.time_ns()  # unique even if an earlier process had our pid

    # --- this process's segments ---------------------------------------------------------------

    def open(self) -> None:
        """Create the folder and take this process's lock (held until ``close`` or exit)."""
        if self._lock_fd is not None:
            return
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # private, like the state dir
        lock_path = lock_file(self.folder, self.pid)
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            # Waits only while another process replays what a dead process with our pid left.
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, lock_path):
                self._lock_fd = fd
                return
            os.close(fd)  # that process deleted the lock file we locked: lock the new one

    def append(self, line: bytes) -> None:
        """Add one encoded row to the current segment (opened on demand); raises OSError."""
        if self._fd is None:
            self.open()
            self._seq += 1
            self._current = self.folder / f"ledger-{self.pid}-{self._seq}.jsonl"
            self._fd = os.open(self._current, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        written = os.write(self._fd, line)
        if written < len(line):  # a full disk takes part of a row and refuses the rest
            self._complete(line, written)

    def _complete(self, line: bytes, written: int) -> None:
        """Write the rest of a row ``write`` took only ``written`` bytes of; if the disk refuses
        it, cut the segment back to its last whole row and raise (the caller keeps the row): a
        torn row left there would also spoil the next row appended, once space returns."""
        assert self._fd is not None
        try:
            while written < len(line):
                more = os.write(self._fd, line[written:])
                if not more:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                written += more
        except OSError:
            try:
                os.ftruncate(self._fd, os.fstat(self._fd).st_size - written)
            except OSError:
                self.seal()  # cannot cut it: later rows go to a new segment; the torn line is skipped
            raise

    def seal(self) -> Path | None:
        """End the current segment and return it (None if nothing was appended since the last)."""
        if self._fd is None:
            return None
        os.close(self._fd)
        sealed, self._fd, self._current = self._current, None, None
        return sealed

    def sealed_segments(self) -> list[Path]:
        """This pid's segments other than the current one: batches not yet in the database."""
        return [p for p in self._segments(self.pid) if p != self._current]

    def close(self) -> None:
        self.seal()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- segments of processes that are gone -------------------------------------------------

    def other_pids(self) -> list[int]:
        """Pids, other than ours, that have segments here (alive or not: ``adopt`` tells)."""
        return sorted({pid for pid, _, _ in segments(self.folder) if pid != self.pid})

    @contextmanager
    def adopt(self, pid: int) -> Iterator[list[Path] | None]:
        """Lock the segments of a process that is gone; yields None while it still runs."""
        with adopt(self.folder, pid) as segments:
            yield segments

    def _segments(self, pid: int) -> list[Path]:
        return [path for p, _, path in segments(self.folder) if p == pid]


@contextmanager
def adopt(folder: Path, pid: int) -> Iterator[list[Path] | None]:
    """Take the lock of ``pid``'s segments in ``folder``; yields them, or None if ``pid`` runs.

    Delete each segment once its rows are stored; the lock file goes when none is left."""
    lock_path = lock_file(folder, pid)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        if not _same_file(fd, lock_path):
            yield None
            return
        yield [path for p, _, path in segments(folder) if p == pid]
        if not any(p == pid for p, _, _ in segments(folder)):
            lock_path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def read_rows(path: Path, chunk: int) -> Iterator[list[dict[str, Any]]]:
    """The JSON rows of a segment, ``chunk`` at a time; torn or corrupt lines are skipped."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return
    with handle:
        batch: list[dict[str, Any]] = []
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                log.error("twllm spool: skipping an unreadable line %d of %s (cut short by a crash?)", number, path)
                continue
            batch.append(row)
            if len(batch) >= chunk:
                yield batch
                batch = []
        if batch:
            yield batch


def lock_file(folder: Path, pid: int) -> Path:
    return folder / f"ledger-{pid}.lock"


def segments(folder: Path) -> list[tuple[int, int, Path]]:
    """(pid, seq, path) of every segment in ``folder``, by pid, oldest first."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        match = _SEGMENT.match(name)
        if match:
            found.append((int(match[1]), int(match[2]), folder / name))
    return sorted(found)


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (it may have been deleted meanwhile)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (info.st_dev, info.st_ino) == (mine.st_dev, mine.st_ino)
