"""For the privacy tests: a second, unrelated OS user, running a probe as that user, and modes.

The probe runs in a forked child that drops to the user (no exec: the Python and the venv may sit
in folders that user cannot reach, which is not what those tests are about)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

OTHER_USER = "twllm-test-other"


def other_user() -> tuple[int, int]:
    """(uid, gid) of ``twllm-test-other``, created if missing. Tests that call it are marked
    ``root`` (skipped, with that reason, when the suite does not run as root)."""
    try:
        entry = pwd.getpwnam(OTHER_USER)
    except KeyError:
        if shutil.which("useradd") is None:
            pytest.fail(f"no user {OTHER_USER!r} and no useradd to create it (install Debian's passwd package)")
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--user-group",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                OTHER_USER,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        entry = pwd.getpwnam(OTHER_USER)
    return entry.pw_uid, entry.pw_gid


def as_user(uid: int, gid: int, probe: Callable[..., Any], *args: Any) -> Any:
    """``probe(*args)`` run as uid/gid (no supplementary groups) in a forked child; its JSON result."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            for name in [n for n in os.environ if n.startswith("PG")]:
                del os.environ[name]
            os.environ["HOME"] = "/nonexistent"  # no ~/.pgpass of root's
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            data = json.dumps({"result": probe(*args)}).encode()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            data = json.dumps({"crash": repr(exc)}).encode()
        try:
            while data:
                data = data[os.write(write_end, data) :]
        finally:
            os._exit(0)
    os.close(write_end)
    chunks = []
    with os.fdopen(read_end, "rb") as reader:
        while chunk := reader.read(65536):
            chunks.append(chunk)
    os.waitpid(pid, 0)
    answer = json.loads(b"".join(chunks) or b'{"crash": "no answer"}')
    if "crash" in answer:
        raise AssertionError(f"the probe as uid {uid} crashed: {answer['crash']}")
    return answer["result"]


def try_read(path: str, is_dir: bool) -> str:
    """'ok', or the name of the OSError that listing (a folder) or reading (a file) raised."""
    try:
        if is_dir:
            os.listdir(path)
        else:
            with open(path, "rb") as handle:
                handle.read(1)
    except OSError as exc:
        return type(exc).__name__
    return "ok"


def try_connect(**params: Any) -> str:
    """'ok', or '<error>: <message>' of a psycopg connection with these parameters."""
    import psycopg

    try:
        with psycopg.connect(connect_timeout=5, **params):
            return "ok"
    except psycopg.Error as exc:
        return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def probe_paths(paths: list[Path]) -> Callable[[], dict[str, str]]:
    """A probe that tries every path (folders listed, files read): {path: outcome}."""
    items = [(str(p), p.is_dir()) for p in paths]

    def probe() -> dict[str, str]:
        return {path: try_read(path, is_dir) for path, is_dir in items}

    return probe


def not_private(root: Path) -> tuple[dict[str, str], set[str]]:
    """Everything under ``root`` (not ``root`` itself) that is not a 0700 folder or a 0600 file:
    {relative path: mode}; and the relative paths seen."""
    wrong: dict[str, str] = {}
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            info = path.lstat()
            rel = str(path.relative_to(root))
            seen.add(rel)
            is_dir = stat.S_ISDIR(info.st_mode)
            if not (is_dir or stat.S_ISREG(info.st_mode)) or stat.S_IMODE(info.st_mode) != (0o700 if is_dir else 0o600):
                wrong[rel] = oct(info.st_mode)
    return wrong, seen
