"""Spend ledger rows: built from LiteLLM's logging payload, written in batches off the request path.

``row_from_logging`` turns one success or failure event into a ``LedgerRow`` (pure). The
``LedgerWriter`` journals each row to a local file at once (``spool.py``) and a background task
writes the queued rows every ``FLUSH_INTERVAL_S`` (or as soon as ``BATCH_MAX_ROWS`` wait) with one
``INSERT … SELECT FROM unnest(…) ON CONFLICT DO NOTHING`` per batch. A batch PostgreSQL cannot
take stays in its journal segment and is replayed when PostgreSQL is back; the primary key
(ts, request_id) makes a replay of a row already written a no-op.

So a row, once made, is in the database or on disk at every moment: a database outage, a
worker killed or a gateway stopped mid-batch loses nothing (``replay_folder`` stores what a
stopped gateway left; running workers adopt it too).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg

from twllm.accounting.gateway_config import CONNECT_TIMEOUT_S, Database, DatabaseUnavailable, Price
from twllm.accounting.names import ModelNames
from twllm.accounting.spool import Spool, adopt, encode, read_rows, segments
from twllm.gateway import metrics
from twllm.gateway.errors import public_error

log = logging.getLogger(__name__)

BATCH_MAX_ROWS = 1000
"""Rows per INSERT; also how many waiting rows wake the writer before its interval is up."""
FLUSH_INTERVAL_S = 0.2
"""The longest a row waits in memory before the writer tries to store it."""
REPLAY_INTERVAL_S = 1.0
"""How often spooled rows are tried again while PostgreSQL is (or may be) back."""
WRITE_TIMEOUT_S = 10.0
"""A batch that takes longer counts as not written (it stays journaled; a replay cannot double it)."""
JOURNAL_ERROR_EVERY_S = 60.0
"""The journal's write failures (disk full) are logged at most this often (all are counted)."""


@dataclass(frozen=True)
class LedgerRow:
    """One request, as a row of ``spend_ledger`` (see migrations/0001_accounts.sql)."""

    ts: datetime
    """When the request started (UTC); with request_id, the primary key."""
    request_id: str
    """LiteLLM's call id (``x-litellm-call-id``)."""
    tenant_id: int | None
    key_id: int | None
    model: str
    deployment: str | None
    prompt_tokens: int
    completion_tokens: int
    cost: Decimal
    currency: str
    latency_ms: int | None
    ttft_ms: int | None
    status_code: int
    error_class: str | None
    stream: bool
    requested_model: str | None = None
    """The name the client asked for (an alias, or the model a fallback stood in for); ``model``
    is the model that answered. None in rows written before migration 0006."""
    guard: dict[str, Any] | None = None
    hold: str | None = None
    """The request's budget hold (``budget_holds``), released in the statement that writes the
    row; not a column of the ledger."""

    def to_json(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in _FIELDS}  # not asdict(): it deep-copies
        data["ts"] = self.ts.isoformat()
        data["cost"] = str(self.cost)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LedgerRow:
        values: dict[str, Any] = {f.name: data.get(f.name) for f in fields(cls)}
        values["ts"] = datetime.fromisoformat(str(data["ts"]))
        values["cost"] = Decimal(str(data.get("cost") or 0))
        return cls(**values)


_FIELDS = tuple(f.name for f in fields(LedgerRow))
_COLUMNS = tuple(name for name in _FIELDS if name != "hold")
"""What ``spend_ledger`` stores (the spool keeps every field)."""


def row_from_logging(
    kwargs: Mapping[str, Any],
    *,
    success: bool,
    tenant_id: int | None,
    key_id: int | None,
    price_of: Callable[[str], Price],
    guard: Mapping[str, Any] | None = None,
    names: ModelNames | None = None,
) -> LedgerRow:
    """The ledger row of one LiteLLM success/failure event (``kwargs`` as the logger gets it).

    Reads ``standard_logging_object``, which LiteLLM fills for streams too. Cost is the model's
    price (``price_of(model)``) times the tokens: our price and currency from the spec, never
    LiteLLM's cost. ``guard``: the Safety Guard's verdicts; an answer it blocked is recorded as
    the client saw it (400 GuardBlocked) at the cost of the tokens the engine produced.
    ``names``: the gateway's aliases and deployments, so that ``model`` is the model that
    answered (priced as such) and ``requested_model`` the name the client asked for."""
    slo: Mapping[str, Any] = kwargs.get("standard_logging_object") or {}
    start = _epoch(slo.get("startTime"), kwargs.get("start_time"))
    end = _epoch(slo.get("endTime"), kwargs.get("end_time"))
    first = _epoch(slo.get("completionStartTime"), kwargs.get("completion_start_time"))
    stream = bool(slo.get("stream") or kwargs.get("stream"))
    prompt = _int(slo.get("prompt_tokens"))
    completion = _int(slo.get("completion_tokens"))
    if not prompt and not completion:  # a rerank: LiteLLM keeps its tokens in the answer only
        prompt = _int(rerank_tokens(slo.get("response")))
    error = slo.get("error_information") or {}
    if success and (guard or {}).get("output", {}).get("verdict") == "block":
        status, error_class = 400, "GuardBlocked"
    elif success:
        status, error_class = 200, None
    else:
        status = _status(error.get("error_code"), kwargs.get("exception"))
        # The status the client was answered (the gateway's shield maps LiteLLM's view of an
        # error to OpenAI's: an unreachable engine is 503, an unknown model 404).
        error_class = _text(error.get("error_class")) or _exception_class(kwargs.get("exception"))
        message = f"{error_class or ''}: {kwargs.get('exception') or error.get('error_message') or ''}"
        status = public_error(status, {"error": {"message": message, "code": str(status)}}).status
    group = _text(slo.get("model_group")) or _text(slo.get("model")) or _text(kwargs.get("model")) or ""
    # The router keeps the name asked for across fallbacks; its model group is the one answering,
    # an alias's included (``names`` tells the model by the deployment that answered).
    requested = _text(_router_metadata(kwargs).get("original_model_group")) or group
    model = names.answered(_text(slo.get("model_id")), group) if names is not None else group
    price = price_of(model)
    return LedgerRow(
        ts=datetime.fromtimestamp(start if start is not None else time.time(), tz=UTC),
        request_id=_text(kwargs.get("litellm_call_id"))
        or _text(slo.get("litellm_call_id"))
        or _text(slo.get("id"))
        or "",
        tenant_id=tenant_id,
        key_id=key_id,
        model=model,
        deployment=_text(slo.get("model_id")) or None,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost=price.cost(prompt, completion),
        currency=price.currency,
        latency_ms=_ms(start, end),
        ttft_ms=_ms(start, first) if stream and first is not None and success else None,
        status_code=status,
        error_class=error_class,
        stream=stream,
        guard=dict(guard) if guard else None,
        requested_model=requested,
    )


def _router_metadata(kwargs: Mapping[str, Any]) -> Mapping[str, Any]:
    """What LiteLLM's router noted on the call (``metadata``, or ``litellm_metadata`` for the
    endpoints that keep the client's ``metadata`` apart)."""
    params = kwargs.get("litellm_params") or {}
    for name in ("metadata", "litellm_metadata"):
        meta = params.get(name) if isinstance(params, Mapping) else None
        if isinstance(meta, Mapping) and meta.get("original_model_group"):
            return meta
    return {}


def rerank_tokens(response: Any) -> int | None:
    """The tokens a rerank answer reports, None for any other answer. vLLM counts them in
    ``usage.prompt_tokens``; LiteLLM moves them to the Cohere-style ``meta.tokens.input_tokens``
    (and ``meta.billed_units.total_tokens``) and leaves ``standard_logging_object``'s token
    counts at 0, so the ledger reads them from the answer it logs (``response``)."""
    meta = response.get("meta") if isinstance(response, Mapping) else getattr(response, "meta", None)
    if not isinstance(meta, Mapping):
        return None
    for section, name in (("tokens", "input_tokens"), ("billed_units", "total_tokens")):
        part = meta.get(section)
        value = part.get(name) if isinstance(part, Mapping) else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _epoch(value: Any, fallback: Any) -> float | None:
    for candidate in (value, fallback):
        if isinstance(candidate, (int, float)) and not isinstance(candidate, bool):
            return float(candidate)
        if isinstance(candidate, datetime):
            return candidate.timestamp()
    return None


_INT_MAX = 2**31 - 1
"""The ledger's integer columns are 32-bit: clamp rather than have PostgreSQL refuse a batch."""


def _ms(start: float | None, end: float | None) -> int | None:
    if start is None or end is None:
        return None
    return min(_INT_MAX, max(0, round((end - start) * 1000)))


def _int(value: Any) -> int:
    try:
        return min(_INT_MAX, max(0, int(value or 0)))
    except (TypeError, ValueError, OverflowError):
        return 0


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).replace("\x00", "")  # PostgreSQL text cannot hold NUL
    return text or None


def _status(code: Any, exception: Any) -> int:
    for candidate in (code, getattr(exception, "status_code", None), getattr(exception, "code", None)):
        try:
            status = int(str(candidate))
        except (TypeError, ValueError):
            continue
        if 400 <= status <= 599:
            return status
    return 500


def _exception_class(exception: Any) -> str | None:
    return type(exception).__name__ if exception is not None else None


# --- writing ---------------------------------------------------------------------------------

_TYPES = {
    "ts": "timestamptz",
    "request_id": "text",
    "tenant_id": "bigint",
    "key_id": "bigint",
    "model": "text",
    "deployment": "text",
    "prompt_tokens": "integer",
    "completion_tokens": "integer",
    "cost": "numeric",
    "currency": "text",
    "latency_ms": "integer",
    "ttft_ms": "integer",
    "status_code": "integer",
    "error_class": "text",
    "stream": "boolean",
    "requested_model": "text",
    "guard": "text",
}
INSERT_SQL = (
    "WITH ins AS ("
    f"INSERT INTO spend_ledger ({', '.join(_COLUMNS)}) "
    f"SELECT {', '.join(c + '::jsonb' if c == 'guard' else c for c in _COLUMNS)} "
    f"FROM unnest({', '.join(f'%s::{_TYPES[c]}[]' for c in _COLUMNS)}) AS u({', '.join(_COLUMNS)}) "
    "ON CONFLICT DO NOTHING RETURNING key_id, ts, cost), "
    "spent AS (INSERT INTO budget_spend AS b (key_id, day, cost, max_cost) "
    "SELECT key_id, (ts AT TIME ZONE 'UTC')::date, sum(cost), max(cost) FROM ins "
    "WHERE key_id IS NOT NULL GROUP BY 1, 2 "
    "ON CONFLICT (key_id, day) DO UPDATE SET cost = b.cost + EXCLUDED.cost, "
    "max_cost = GREATEST(b.max_cost, EXCLUDED.max_cost)), "
    "released AS (DELETE FROM budget_holds WHERE hold_id = ANY(%s::text[])) "
    "SELECT count(*) FROM ins"
)
"""One statement per batch: the rows as one array per column. In the same statement, the new
rows' cost is added to their keys' day in ``budget_spend`` (a replayed row already written adds
nothing), and the batch's budget holds are released, so a request's cost is never in neither."""


def insert_params(rows: Sequence[LedgerRow]) -> list[list[Any]]:
    columns: list[list[Any]] = [[] for _ in _COLUMNS]
    for row in rows:
        for i, name in enumerate(_COLUMNS):
            value = getattr(row, name)
            if name == "guard" and value is not None:
                value = json.dumps(value, ensure_ascii=False)
            columns[i].append(value)
    columns.append([row.hold for row in rows if row.hold])
    return columns


OnInsert = Callable[[Any, Sequence[LedgerRow]], Awaitable[None]]
"""Called with the connection after a batch of new rows is written (rate windows' token counts)."""
OnStored = Callable[[Sequence[LedgerRow]], None]
"""Called with this process's rows once they are in the database (budget bookkeeping)."""


class LedgerWriter:
    """The ledger rows of one worker process: journaled at once, stored by a background task.

    ``enqueue`` writes the row to the journal (``spool.py``) and queues it. Every
    ``FLUSH_INTERVAL_S`` the task seals the journal segment, inserts the queued rows and deletes
    the segment. Once PostgreSQL fails a batch, that segment stays and the writer has a
    *backlog*: until ``replay`` (every ``REPLAY_INTERVAL_S``) has stored it, new rows only go to
    the open segment (one file for the whole outage) and leave memory. ``replay`` also adopts
    the segments of processes that are gone."""

    def __init__(
        self, db: Database, spool: Spool, *, on_insert: OnInsert | None = None, on_stored: OnStored | None = None
    ) -> None:
        self.db = db
        self.spool = spool
        self.on_insert = on_insert
        self.on_stored = on_stored
        self._lock = threading.Lock()
        self._rows: list[LedgerRow] = []
        self._unjournaled: list[LedgerRow] = []
        """Rows the journal could not take (disk full, …): kept in memory until stored."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._next_replay = 0.0
        self._backlog = True  # a process before us with our pid may have left segments
        self.stored = 0
        """Rows this writer put into the database (new and replayed)."""
        self.spooled = 0
        """Rows left in sealed segments because PostgreSQL could not take them."""
        self.journal_failures = 0
        """Rows the journal refused (disk full, …) since it last took one: the current burst."""
        self._journal_error_at = 0.0
        self._journal_error_logged = False
        # For the spool gauges: when the oldest row still in memory was queued (monotonic), the
        # batch being inserted, and the rows (and oldest) left to the replay since the backlog began.
        self._queued_since: float | None = None
        self._inflight: tuple[int, float | None] | None = None
        self._backlog_rows = 0
        self._backlog_since: float | None = None

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._rows) + len(self._unjournaled)

    def unwritten(self) -> tuple[int, float]:
        """This writer's rows not yet in PostgreSQL (queued, being inserted, or left to the replay)
        and the seconds since the oldest of them was queued (0 when none)."""
        with self._lock:
            rows = len(self._rows) + len(self._unjournaled) + self._backlog_rows
            since = [t for t in (self._queued_since, self._backlog_since) if t is not None]
            if self._inflight is not None:
                rows += self._inflight[0]
                since += [self._inflight[1]] if self._inflight[1] is not None else []
        return rows, (time.monotonic() - min(since) if rows and since else 0.0)

    def _to_backlog(self, rows: int, since: float | None) -> None:
        """Count ``rows`` (queued at ``since``) as left to the replay (under the lock)."""
        if rows:
            self._backlog_rows += rows
            if since is not None and (self._backlog_since is None or since < self._backlog_since):
                self._backlog_since = since

    def enqueue(self, row: LedgerRow) -> None:
        """Journal and queue a row; never waits on the database (safe from any thread)."""
        line = encode(row.to_json())
        with self._lock:
            if not self._rows and not self._unjournaled:
                self._queued_since = time.monotonic()
            try:
                self.spool.append(line)
            except OSError as exc:
                self._journal_failed(exc)
                self._unjournaled.append(row)
            else:
                if self._journal_error_logged:
                    self._journal_error_logged = False
                    log.warning(
                        "twllm ledger: journaling rows in %s again, after %d rows it could not take "
                        "(kept in memory until PostgreSQL has them)",
                        self.spool.folder,
                        self.journal_failures,
                    )
                self.journal_failures = 0
                self._rows.append(row)
            waiting = len(self._rows) + len(self._unjournaled)
        if waiting >= BATCH_MAX_ROWS and self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def _journal_failed(self, exc: OSError) -> None:
        """Count a row the journal refused (under the lock). Logged once per burst of failures,
        and at most once per ``JOURNAL_ERROR_EVERY_S`` (a disk that is nearly full fails and
        recovers many times a second)."""
        metrics.observe_spool_write_failure()
        self.journal_failures += 1
        now = time.monotonic()
        if self.journal_failures == 1 and now >= self._journal_error_at:
            self._journal_error_at = now + JOURNAL_ERROR_EVERY_S
            self._journal_error_logged = True
            log.error(
                "twllm ledger: cannot journal rows in %s (%s); keeping them in memory until PostgreSQL "
                "has them (a gateway killed meanwhile loses them). Counted in "
                "twllm_spool_write_failures_total; logged again when the journal works again.",
                self.spool.folder,
                exc,
            )

    def start(self) -> None:
        """Start the background task on the running loop (once)."""
        if self._task is not None and not self._task.done():
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = self._loop.create_task(self._run(), name="twllm-ledger-writer")

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), FLUSH_INTERVAL_S)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
                if time.monotonic() >= self._next_replay:
                    self._next_replay = time.monotonic() + REPLAY_INTERVAL_S
                    await self.replay()
            except asyncio.CancelledError:
                raise
            except DatabaseUnavailable:
                pass  # logged by Database; the rows stay journaled and the next replay retries
            except Exception:  # the writer must outlive any one failure
                log.exception("twllm ledger: unexpected error in the writer (rows stay journaled)")
            metrics.set_ledger_backlog(*self.unwritten())

    async def flush(self) -> None:
        """Store the queued rows now, or, while PostgreSQL is away, leave them to the replay."""
        with self._lock:
            if not self._rows and not self._unjournaled:
                return
            if self._backlog or not self.db.usable:
                # The rows are in the open journal segment already: free the memory and let the
                # replay store them, after the older ones, once PostgreSQL is back.
                self.spooled += len(self._rows)
                self._to_backlog(len(self._rows), self._queued_since)
                self._rows = []
                if not self._unjournaled:
                    self._queued_since = None
                self._backlog = True
                return
            rows, self._rows = self._rows, []
            memory, self._unjournaled = self._unjournaled, []
            segment = self.spool.seal()
            since, self._queued_since = self._queued_since, None
            self._inflight = (len(rows) + len(memory), since)
        try:
            for start in range(0, len(rows) + len(memory), BATCH_MAX_ROWS):
                await self._store((rows + memory)[start : start + BATCH_MAX_ROWS], fresh=True)
        except (DatabaseUnavailable, psycopg.Error) as exc:
            if not isinstance(exc, DatabaseUnavailable):
                log.error(
                    "twllm ledger: PostgreSQL refused a batch of %d rows (%s); keeping it for a replay",
                    len(rows) + len(memory),
                    " ".join(str(exc).split())[:300],
                )
            with self._lock:  # the sealed segment stays for the replay; unjournaled rows stay here
                self.spooled += len(rows)
                self._backlog = True
                self._unjournaled[:0] = memory
                self._inflight = None
                self._to_backlog(len(rows), since)
                if memory and since is not None:
                    self._queued_since = min(since, self._queued_since or since)
            return
        with self._lock:
            self._inflight = None
        if segment is not None:
            segment.unlink(missing_ok=True)
        if self.on_stored is not None:
            self.on_stored(rows + memory)

    async def replay(self) -> None:
        """Store what the journal holds for a replay: ours first, then that of processes gone."""
        if not self.db.usable:
            return
        if self._backlog:
            with self._lock:
                self.spool.seal()  # the rows queued since the outage began are in it: drop them here
                self.spooled += len(self._rows)
                self._to_backlog(len(self._rows), self._queued_since)
                self._rows = []
                if not self._unjournaled:
                    self._queued_since = None
                own = self.spool.sealed_segments()
            for path in own:
                rows = await self._replay_segment(path)
                if self.on_stored is not None:
                    self.on_stored(rows)
            self._backlog = False
            with self._lock:
                self._backlog_rows, self._backlog_since = 0, None
        for pid in self.spool.other_pids():
            with self.spool.adopt(pid) as segments:
                for path in segments or ():
                    await self._replay_segment(path)

    async def _replay_segment(self, path: Path) -> list[LedgerRow]:
        rows: list[LedgerRow] = []
        for chunk in read_rows(path, BATCH_MAX_ROWS):
            batch = [LedgerRow.from_json(r) for r in chunk]
            try:
                await self._store(batch, fresh=False)
            except (psycopg.DataError, psycopg.IntegrityError):
                batch = await self._store_one_by_one(batch, path)
            rows.extend(batch)
        path.unlink(missing_ok=True)
        log.info("twllm ledger: replayed %d rows from %s", len(rows), path.name)
        return rows

    async def _store_one_by_one(self, batch: list[LedgerRow], path: Path) -> list[LedgerRow]:
        """Store a batch PostgreSQL refused for its data row by row; set the refused rows aside
        in ``<segment>.rejected`` (kept for people, never replayed) so they block nothing."""
        stored, refused = [], []
        for row in batch:
            try:
                await self._store([row], fresh=False)
                stored.append(row)
            except (psycopg.DataError, psycopg.IntegrityError) as exc:
                log.error(
                    "twllm ledger: PostgreSQL refuses row %s (%s); kept in %s.rejected",
                    row.request_id,
                    " ".join(str(exc).split())[:200],
                    path.name,
                )
                refused.append(encode(row.to_json()))
        if refused:
            fd = os.open(path.with_name(path.name + ".rejected"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "ab") as out:
                out.write(b"".join(refused))
        return stored

    async def _store(self, rows: Sequence[LedgerRow], *, fresh: bool) -> None:
        async with self.db.connection(timeout=WRITE_TIMEOUT_S) as conn:
            await conn.execute(INSERT_SQL, insert_params(rows))
            if fresh and self.on_insert is not None:
                await self.on_insert(conn, rows)
        self.stored += len(rows)


def replay_folder(url: str, folder: Path, *, include_pid: int | None = None) -> int:
    """Store every segment in ``folder`` whose process is gone (plus ``include_pid``'s); the rows stored.

    What the supervisor runs after the gateway stopped and before PostgreSQL stops, so rows
    still journaled at the gateway's exit reach the ledger now rather than at its next start.
    Raises psycopg errors; segments not stored stay for a later replay."""
    stored = 0
    found = segments(Path(folder))
    if not found:
        return 0
    with psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        for pid in sorted({pid for pid, _, _ in found}):
            own = [path for p, _, path in found if p == pid]
            with nullcontext(own) if pid == include_pid else adopt(Path(folder), pid) as paths:
                for path in paths or ():
                    for chunk in read_rows(path, BATCH_MAX_ROWS):
                        conn.execute(INSERT_SQL, insert_params([LedgerRow.from_json(r) for r in chunk]))
                        stored += len(chunk)
                    path.unlink(missing_ok=True)
    return stored
