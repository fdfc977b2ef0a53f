"""Component logs: rotation keeps a bounded number of files, tail reads the end."""

from __future__ import annotations

import io

from twllm.deploy.logs import RotatingLog, tail


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
