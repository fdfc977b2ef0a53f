"""Atomic, private file writes: a reader sees the old file or the new one, never a part of either.

Every stage that replaces a file (render's gateway files, the runtime's plan.json, state.json,
supervisor.pid, PostgreSQL's pg_hba.conf) goes through ``write_atomic``. Like twllm.settings it
imports nothing from twllm, so any layer may use it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

PRIVATE_FILE = 0o600
"""The mode of every file twllm writes into a state directory."""

TEMP_SUFFIX = ".tmp"
"""Temp files are ``.<name>.<random>.tmp`` next to the target; none is left after a write."""


def write_atomic(path: Path, text: str, *, owner: tuple[int, int] | None = None) -> None:
    """Replace ``path`` with ``text`` (UTF-8) in one rename; the file is 0600 whatever the umask.

    Each call writes its own temp file in ``path``'s folder (``tempfile.mkstemp``), syncs it to
    disk and ``os.replace``-s it over ``path``, so concurrent writers of one file (threads or
    processes) never interleave: the last rename wins whole. On any failure the temp file is
    removed and ``path`` is left as it was. ``owner`` is a ``(uid, gid)`` to give the file
    (needs the right to chown, i.e. root)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), PRIVATE_FILE)  # mkstemp's 0600 passes through the umask
            if owner is not None:
                os.fchown(handle.fileno(), *owner)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
