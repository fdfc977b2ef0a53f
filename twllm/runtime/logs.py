"""One rotated log file per component, fed from the child's stdout/stderr pipe.

Logs are private like the rest of the state directory: the folder is 0700, every file (rotated
ones too) 0600.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import IO

from twllm.runtime.state import PRIVATE_FILE, mkdir_private

MAX_BYTES = 10 * 2**20
BACKUPS = 3


class RotatingLog:
    """Appends lines to ``path``; at MAX_BYTES moves it to .1 (.1 to .2, ...), keeping BACKUPS."""

    def __init__(self, path: Path, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        mkdir_private(path.parent)
        self._file = _open_private(path)

    def write(self, data: bytes) -> None:
        with self._lock:
            self._file.write(data)
            self._file.flush()
            if self._file.tell() >= self.max_bytes:
                self._rotate()

    def note(self, line: str) -> None:
        """A line from twllm itself, timestamped."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.write(f"{stamp} {line}\n".encode())

    def pump(self, stream: IO[bytes] | None) -> threading.Thread | None:
        """Copy ``stream`` into the log until it closes, in a daemon thread."""
        if stream is None:
            return None

        def copy() -> None:
            with stream:
                for chunk in iter(stream.readline, b""):
                    self.write(chunk)

        thread = threading.Thread(target=copy, daemon=True, name=f"log-{self.path.stem}")
        thread.start()
        return thread

    def _rotate(self) -> None:
        self._file.close()
        for index in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{index + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        self._file = _open_private(self.path)


def _open_private(path: Path) -> IO[bytes]:
    """``path`` opened to append, mode 0600 (also when an older twllm made it readable to others)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE)
    os.fchmod(fd, PRIVATE_FILE)
    return os.fdopen(fd, "ab")


def tail(path: Path, lines: int = 40) -> list[str]:
    """The last ``lines`` lines of a log (reads at most the last 256 KiB)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - 256 * 1024))
            data = handle.read()
    except FileNotFoundError:
        return []
    return data.decode("utf-8", errors="replace").splitlines()[-lines:]
