"""A full disk under the ledger's journal (issue 18, chaos d): a row the disk takes only part of
leaves no torn line behind, rows the journal refuses stay in memory until PostgreSQL has them,
and the failures are counted and logged once per burst, not once per row."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
from pathlib import Path

import pytest
from test_gateway_hooks import FakeDb, _row

from twllm.accounting import ledger as ledger_mod
from twllm.accounting import spool as spool_mod
from twllm.accounting.ledger import LedgerRow, LedgerWriter
from twllm.accounting.spool import Spool, encode, read_rows
from twllm.gateway import metrics


class DiskFills:
    """``os.write`` of a disk with ``room`` bytes left: a write gets what fits, then ENOSPC."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.real = os.write

    def __call__(self, fd: int, data: bytes) -> int:
        if self.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        taken = self.real(fd, bytes(data[: self.room]))
        self.room -= taken
        return taken


def rows_in(folder: Path) -> list[str]:
    return [
        r["request_id"] for p in sorted(folder.glob("ledger-*.jsonl")) for chunk in read_rows(p, 100) for r in chunk
    ]


def test_a_row_cut_short_by_a_full_disk_is_taken_back_and_the_next_row_is_whole(tmp_path: Path, monkeypatch):
    spool = Spool(tmp_path)
    first = encode(_row(request_id="first").to_json())
    spool.append(first)
    disk = DiskFills(room=10)  # the next row gets 10 bytes in, then the disk is full
    monkeypatch.setattr(spool_mod.os, "write", disk)
    with pytest.raises(OSError) as refused:
        spool.append(encode(_row(request_id="torn").to_json()))
    assert refused.value.errno == errno.ENOSPC
    monkeypatch.setattr(spool_mod.os, "write", disk.real)  # space is back
    spool.append(encode(_row(request_id="after").to_json()))
    spool.close()
    [segment] = list(tmp_path.glob("ledger-*.jsonl"))
    assert segment.read_bytes().startswith(first)
    assert rows_in(tmp_path) == ["first", "after"]  # no torn line: "after" is not spoiled by it


def test_a_write_the_disk_takes_in_two_parts_is_one_row(tmp_path: Path, monkeypatch):
    spool = Spool(tmp_path)
    calls = []
    real = os.write

    def short_then_rest(fd: int, data: bytes) -> int:
        calls.append(len(data))
        return real(fd, bytes(data[:5]) if len(calls) == 1 else data)

    monkeypatch.setattr(spool_mod.os, "write", short_then_rest)
    spool.append(encode(_row(request_id="split").to_json()))
    monkeypatch.setattr(spool_mod.os, "write", real)
    spool.close()
    assert len(calls) == 2 and rows_in(tmp_path) == ["split"]


class FullSpool(Spool):
    """A spool whose disk is full while ``full`` is set."""

    full = True

    def append(self, line: bytes) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        super().append(line)


def failures_counted() -> float:
    return metrics.SPOOL_WRITE_FAILURES._value.get()


def test_rows_the_full_disk_refuses_reach_postgres_and_the_burst_is_logged_once(tmp_path: Path, caplog, monkeypatch):
    # LiteLLM's logging setup, imported by an earlier test of the run, disables the loggers that
    # existed then (logging.config's default); the gateway imports it first, so it keeps ours.
    monkeypatch.setattr(logging.getLogger(ledger_mod.__name__), "disabled", False)
    db = FakeDb()
    spool = FullSpool(tmp_path)
    stored: list[LedgerRow] = []
    writer = LedgerWriter(db, spool, on_stored=stored.extend)  # type: ignore[arg-type]
    asyncio.run(writer.replay())  # as the writer's task does first: nothing left by an earlier process
    before = failures_counted()
    with caplog.at_level(logging.WARNING, logger=ledger_mod.__name__):
        for i in range(5):
            writer.enqueue(_row(request_id=f"full{i}"))
        spool.full = False
        writer.enqueue(_row(request_id="space-again"))
        asyncio.run(writer.flush())
    assert failures_counted() - before == 5
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "twllm_spool_write_failures_total" in errors[0].getMessage()
    assert not any(r.exc_info for r in caplog.records)  # one line, not a traceback per row
    assert any("again, after 5 rows" in r.getMessage() for r in caplog.records)
    assert sorted(r.request_id for r in stored) == sorted([f"full{i}" for i in range(5)] + ["space-again"])
    assert writer.pending == 0 and list(tmp_path.glob("ledger-*.jsonl")) == []


def test_while_postgres_is_down_the_refused_rows_wait_in_memory_and_are_stored_when_it_is_back(tmp_path: Path):
    db = FakeDb(down=True)
    spool = FullSpool(tmp_path)
    stored: list[LedgerRow] = []
    writer = LedgerWriter(db, spool, on_stored=stored.extend)  # type: ignore[arg-type]
    writer.enqueue(_row(request_id="in-memory"))
    spool.full = False
    writer.enqueue(_row(request_id="journaled"))
    asyncio.run(writer.flush())
    assert writer.pending == 1  # the refused row: nowhere but here until PostgreSQL is back
    assert rows_in(tmp_path) == ["journaled"]
    db.down = False
    asyncio.run(writer.replay())
    asyncio.run(writer.flush())
    written = [p[1] for q, p in db.executed if q == ledger_mod.INSERT_SQL]
    assert sorted(r for batch in written for r in batch) == ["in-memory", "journaled"]
    assert writer.pending == 0 and list(tmp_path.glob("ledger-*.jsonl")) == []
    assert json.loads(json.dumps(writer.unwritten())) == [0, 0.0]
