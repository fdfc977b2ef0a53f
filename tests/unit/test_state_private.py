"""The state directory is private to the deploying user: folders 0700, files 0600."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest

from twllm.runtime.state import DeploymentState, StateDir, mkdir_private, read_or_create_secret, tighten, write_atomic


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def wide_umask():
    """A umask that would leave everything readable to others: modes must not depend on it."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_ensure_makes_private_folders_and_files(tmp_path: Path, wide_umask: None) -> None:
    sd = StateDir(tmp_path / "home" / "twllm" / "prod")
    sd.ensure()
    for folder in (sd.root, sd.root.parent, sd.root.parent.parent, sd.rendered, sd.logs, sd.secrets_dir):
        assert mode(folder) == 0o700, folder
    sd.write_state(DeploymentState(name="prod"))
    key = sd.engine_key()
    assert sd.engine_key() == key
    for path in (sd.state_file, sd.secrets_dir / "engine_key"):
        assert mode(path) == 0o600, path
    assert not list(sd.root.glob(".*.tmp"))


def test_write_atomic_is_0600_even_over_a_wider_file(tmp_path: Path, wide_umask: None) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    target.chmod(0o644)
    write_atomic(target, "{}")
    assert target.read_text() == "{}" and mode(target) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_concurrent_writers_of_one_file_never_interleave(tmp_path: Path, wide_umask: None) -> None:
    """Many threads replace one file at once: every read, and the end result, is one writer's
    whole JSON document; no temp file is left and the mode stays 0600."""
    target = tmp_path / "state.json"
    writers, rounds = 16, 25
    # Documents of very different sizes, so a shared temp file would show torn or mixed text.
    docs = [json.dumps({"writer": w, "pad": "x" * (1 + 4096 * (w % 5))}) for w in range(writers)]
    start = threading.Barrier(writers + 1)
    errors: list[BaseException] = []
    seen: list[str] = []

    def write(w: int) -> None:
        try:
            start.wait()
            for _ in range(rounds):
                write_atomic(target, docs[w])
        except BaseException as exc:  # noqa: BLE001 - surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    start.wait()
    while any(t.is_alive() for t in threads):
        try:
            seen.append(target.read_text(encoding="utf-8"))
        except FileNotFoundError:
            pass  # not written yet
    for thread in threads:
        thread.join()
    assert errors == []
    assert {text for text in seen} <= set(docs), "a reader saw a torn or mixed document"
    assert json.loads(target.read_text(encoding="utf-8"))["writer"] in range(writers)
    assert target.read_text(encoding="utf-8") in docs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    assert mode(target) == 0o600


def test_a_failed_write_leaves_the_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "state.json"
    write_atomic(target, '{"old": true}')

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        write_atomic(target, '{"new": true}')
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_secret_is_made_once(tmp_path: Path, wide_umask: None) -> None:
    path = tmp_path / "secrets" / "db_password"
    made = iter(["first", "second"])
    assert read_or_create_secret(path, lambda: next(made)) == "first"
    assert read_or_create_secret(path, lambda: next(made)) == "first"
    assert mode(path) == 0o600 and mode(path.parent) == 0o700


def test_ensure_tightens_what_an_older_twllm_left_open(tmp_path: Path, wide_umask: None) -> None:
    sd = StateDir(tmp_path / "state")
    for folder in (sd.root, sd.logs, sd.rendered, sd.root / "spool", sd.root / "postgres"):
        folder.mkdir(parents=True, mode=0o755)
        folder.chmod(0o755)
    files = [
        sd.plan,
        sd.state_file,
        sd.log_of("gateway"),
        sd.logs / "gateway.log.1",
        sd.rendered / "litellm_config.yaml",
        sd.root / "spool" / "ledger-1-1.jsonl",
    ]
    for path in files:
        path.write_text("x")
        path.chmod(0o644)
    pg_file = sd.root / "postgres" / "PG_VERSION"
    pg_file.write_text("18")
    pg_file.chmod(0o644)
    outside = tmp_path / "outside.txt"
    outside.write_text("not ours to change")
    outside.chmod(0o644)
    (sd.root / "link").symlink_to(outside)

    sd.ensure()
    assert all(mode(f) == 0o600 for f in files), {f.name: oct(mode(f)) for f in files}
    assert all(mode(d) == 0o700 for d in (sd.root, sd.logs, sd.rendered, sd.root / "spool", sd.root / "postgres"))
    assert mode(outside) == 0o644  # a symbolic link is not followed
    assert mode(pg_file) == 0o644  # PostgreSQL keeps its data directory's modes itself


def test_tighten_keeps_only_group_search_for_postgres_s_group(tmp_path: Path, monkeypatch) -> None:
    from twllm.runtime import state

    root = tmp_path / "state"
    root.mkdir()
    root.chmod(0o751)
    monkeypatch.setattr(state, "_is_postgres_group", lambda gid: True)
    tighten(root)
    assert mode(root) == 0o710
    monkeypatch.setattr(state, "_is_postgres_group", lambda gid: False)
    tighten(root)
    assert mode(root) == 0o700


def test_mkdir_private_leaves_existing_folders_alone(tmp_path: Path, wide_umask: None) -> None:
    tmp_path.chmod(0o755)
    mkdir_private(tmp_path / "a" / "b")
    assert mode(tmp_path) == 0o755 and mode(tmp_path / "a") == mode(tmp_path / "a" / "b") == 0o700
