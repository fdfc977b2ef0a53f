"""Component logs: rotation keeps a bounded number of files, tail reads the end."""

from __future__ import annotations

import io
import os
import stat

from twllm.runtime.logs import RotatingLog, tail


def test_rotation_keeps_backups_and_bounds_size(tmp_path):
    log = RotatingLog(tmp_path / "engine.log", max_bytes=1000, backups=2)
    for i in range(101):
        log.write(f"line {i:03d} ".encode() + b"x" * 40 + b"\n")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["engine.log", "engine.log.1", "engine.log.2"]
    assert all((tmp_path / f).stat().st_size <= 1100 for f in files)
    assert tail(tmp_path / "engine.log", 1)[0].startswith("line 100")


def test_pump_copies_a_stream_and_notes_are_timestamped(tmp_path):
    log = RotatingLog(tmp_path / "gw.log")
    thread = log.pump(io.BytesIO(b"hello\nworld\n"))
    thread.join(5)
    log.note("twllm: stopped gw")
    lines = tail(tmp_path / "gw.log")
    assert lines[:2] == ["hello", "world"]
    assert lines[2].endswith("twllm: stopped gw") and lines[2][:4].isdigit()


def test_tail_of_a_missing_file_is_empty(tmp_path):
    assert tail(tmp_path / "nope.log") == []


def test_logs_and_their_rotations_are_private(tmp_path):
    old = os.umask(0o022)
    try:
        (tmp_path / "logs").mkdir()
        older = tmp_path / "logs" / "engine.log"
        older.write_text("from an older twllm\n")
        older.chmod(0o644)
        log = RotatingLog(tmp_path / "logs" / "engine.log", max_bytes=200, backups=2)
        fresh = RotatingLog(tmp_path / "new" / "gw.log")
        fresh.note("hello")
        for i in range(20):
            log.write(f"line {i:03d} ".encode() + b"x" * 40 + b"\n")
    finally:
        os.umask(old)
    files = sorted((tmp_path / "logs").iterdir())
    assert [p.name for p in files] == ["engine.log", "engine.log.1", "engine.log.2"]
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {"0o600"}
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "new" / "gw.log").stat().st_mode) == 0o600
