"""Per-key rate limits (RPM, TPM) and budgets, shared by every gateway worker through PostgreSQL.

How the counters are shared, and how exact they are:

- **RPM** — fixed one-minute windows in the ``rate_windows`` table, one row per key and minute
  (``date_trunc('minute', now())`` on the database's clock, so every worker and host agrees on
  the window). Each request runs one ``INSERT … ON CONFLICT DO UPDATE … RETURNING``: the row
  lock serialises concurrent requests of a key across all workers, and the counter stops at
  ``rpm + 1``, so exactly ``rpm`` requests per window are admitted however many workers there
  are. Being fixed windows, up to 2 × rpm can pass within 60 s that straddle a window boundary.
- **TPM** — the spend logger adds each finished request's tokens to the same row (in the ledger
  writer's batch, so within ~0.2 s of the request's end). A request is refused once the window's
  tokens reach ``tpm``; requests already running when it is reached still finish, so a window
  can exceed ``tpm`` by the tokens of the requests in flight.
- **Budget** — shared exactly by every process through two tables. ``budget_spend`` holds each
  key's cost per UTC day, added in the very statement that writes the ledger rows
  (``ledger.INSERT_SQL``). ``budget_holds`` holds one row per admitted request of a key with a
  budget until that statement writes its ledger row. A request is admitted (``BudgetGate``) under
  a transaction-scoped advisory lock on the key, so admissions of one key queue across all
  processes: with ``spent`` the period's cost (the key and those it was rotated from), ``held``
  the requests in flight and ``est`` the period's most expensive request, it runs iff
  ``spent < budget`` and either nothing is in flight or ``spent + held × est < budget``; otherwise
  it waits (up to ``WAIT_S``, then 429 ``budget_in_flight`` with Retry-After) for requests in
  flight to be written. With no request priced yet (``est`` also looks at earlier periods), a
  key's requests run one at a time until one is. So the period's spend exceeds the budget by less
  than one request's cost, as long as no request costs more than the most expensive one before
  it. A request whose every model is free takes no place. A hold whose request never reached the
  ledger (its gateway killed) expires after ``HOLD_TTL_S``.
- **One key, one connection per worker** — a worker sends the admissions of a key to PostgreSQL
  one at a time (``KeyLocks``), its other requests of that key waiting in the worker: PostgreSQL
  serialises them anyway (the row lock, the advisory lock), and a burst of one key must not hold
  every pooled connection waiting on that lock, or the pool's timeout would read as PostgreSQL
  being down and the counts below would take over (a burst overspending, RPM × workers).
- **PostgreSQL down** — each worker falls back to counting RPM/TPM in its own memory, with the
  same limits, so while the database is unreachable a key can get up to (workers × limit); the
  budget uses this worker's last reading of the period's spend (``BudgetTracker``, at most
  ``BUDGET_REFRESH_S`` old) plus its own spend since (a key never read is not refused).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal

from twllm.accounting.gateway_config import Database, DatabaseUnavailable

if TYPE_CHECKING:
    from twllm.accounting.ledger import LedgerRow

WINDOW_S = 60
BUDGET_REFRESH_S = 2.0
"""How old a worker's reading of a key's period spend may get before it is read again."""
WINDOW_RETENTION = "5 minutes"
"""Rate windows older than this are deleted (by the ledger writer, at most once a minute)."""

ADMIT_SQL = """
INSERT INTO rate_windows AS w (key_id, window_start, requests)
VALUES (%(key)s, date_trunc('minute', now()), 1)
ON CONFLICT (key_id, window_start) DO UPDATE SET requests =
    CASE WHEN %(tpm)s::bigint IS NOT NULL AND w.tokens >= %(tpm)s::bigint THEN w.requests
         ELSE LEAST(w.requests + 1, %(rpm)s::integer + 1) END
RETURNING w.requests, w.tokens,
    ceil(extract(epoch FROM w.window_start + interval '1 minute' - now()))::integer
"""
"""Count one request in the key's current window; the count stops at rpm + 1 (NULL: no cap)
and does not move once the window's tokens reach tpm. Returns (requests, tokens, seconds left)."""

ADD_TOKENS_SQL = """
INSERT INTO rate_windows AS w (key_id, window_start, tokens)
SELECT k, date_trunc('minute', now()), t FROM unnest(%s::bigint[], %s::bigint[]) AS u(k, t)
ON CONFLICT (key_id, window_start) DO UPDATE SET tokens = w.tokens + EXCLUDED.tokens
"""

CLEANUP_SQL = f"DELETE FROM rate_windows WHERE window_start < now() - interval '{WINDOW_RETENTION}'"
HOLDS_CLEANUP_SQL = "DELETE FROM budget_holds WHERE expires_at < now()"

HOLD_TTL_S = 900
"""How long a budget hold lasts if its request never reaches the ledger (longer than any request
the gateway lets run: ``gateway.request_timeout_s`` is at most 600 s by default)."""
BUDGET_LOCK_CLASS = 0x7477  # "tw": the advisory-lock namespace of budget admissions (key id is the second int)

BUDGET_LOCK_SQL = "SELECT pg_advisory_xact_lock(%(class)s, (%(key)s::bigint %% 2147483647)::integer)"
BUDGET_STATE_SQL = """
WITH RECURSIVE chain (member) AS (
    SELECT %(key)s::bigint
    UNION ALL
    SELECT k.rotated_from FROM chain c JOIN api_keys k ON k.id = c.member WHERE k.rotated_from IS NOT NULL
), days AS (
    SELECT day, cost, max_cost, (%(since)s::date IS NULL OR day >= %(since)s::date) AS in_period
    FROM budget_spend WHERE key_id IN (SELECT member FROM chain)
)
SELECT coalesce((SELECT sum(cost) FROM days WHERE in_period), 0),
       coalesce((SELECT max(max_cost) FILTER (WHERE in_period) FROM days), (SELECT max(max_cost) FROM days), 0),
       (SELECT count(*) FROM budget_holds WHERE key_id IN (SELECT member FROM chain) AND expires_at > now())
"""
"""The key's spend in its period (since: the period's first UTC day; NULL: all), the most
expensive request of the period (of any earlier period when it has none), and the requests of
the key in flight."""
HOLD_SQL = "INSERT INTO budget_holds (hold_id, key_id, expires_at) VALUES (%s, %s, now() + make_interval(secs => %s))"
WAIT_S = 5.0
"""How long a request waits for requests in flight to finish when they could spend what is left."""
POLL_S = 0.05

Decision = Literal["admit", "spent", "wait"]


class KeyLocks:
    """One ``asyncio.Lock`` per key id, kept while a task holds or waits for it: a worker's
    admissions of one key reach PostgreSQL one at a time (see the module docstring)."""

    def __init__(self) -> None:
        self._locks: dict[int, tuple[asyncio.Lock, int]] = {}
        """Key id -> (its lock, tasks holding or waiting for it)."""

    @asynccontextmanager
    async def hold(self, key_id: int) -> AsyncIterator[None]:
        lock, users = self._locks.get(key_id) or (asyncio.Lock(), 0)
        self._locks[key_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key_id]
            if users == 1:
                del self._locks[key_id]
            else:
                self._locks[key_id] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


def budget_decision(budget: Decimal, spent: Decimal, est: Decimal, held: int) -> Decision:
    """What one more request gets (the rule of the module docstring): run, refused because the
    budget is spent, or wait for the requests in flight (they could spend what is left, or no
    request of the key has been priced yet)."""
    if spent >= budget:
        return "spent"
    if held == 0 or (est > 0 and spent + held * est < budget):
        return "admit"
    return "wait"


@dataclass(frozen=True)
class BudgetVerdict:
    allowed: bool
    hold: str | None = None
    """The hold the admitted request carries to its ledger row (None: none needed)."""
    spent: Decimal | None = None
    in_flight: bool = False
    """Refused after waiting ``WAIT_S`` for requests in flight (not for a spent budget)."""


class BudgetGate:
    """Budget admission shared by every gateway process (see the module docstring)."""

    def __init__(self, db: Database, hold_ttl_s: float = HOLD_TTL_S, wait_s: float = WAIT_S) -> None:
        self.db = db
        self.hold_ttl_s = hold_ttl_s
        self.wait_s = wait_s
        self.locks = KeyLocks()

    async def admit(self, key_id: int, budget: Decimal, since: datetime | None, *, hold: bool = True) -> BudgetVerdict:
        """Admit one request of the key or refuse it; raises DatabaseUnavailable. ``hold`` False:
        a request that cannot spend (every model it may reach is free) runs while the budget is
        not spent, without a place in the queue."""
        import secrets

        day = None if since is None else since.astimezone(UTC).date()
        deadline = time.monotonic() + self.wait_s
        while True:
            async with self.locks.hold(key_id), self.db.connection() as conn, conn.transaction():
                await conn.execute(BUDGET_LOCK_SQL, {"class": BUDGET_LOCK_CLASS, "key": key_id})
                cur = await conn.execute(BUDGET_STATE_SQL, {"key": key_id, "since": day})
                spent, est, held = await cur.fetchone()  # type: ignore[misc]
                decision = budget_decision(budget, Decimal(spent), Decimal(est), int(held))
                if decision == "spent":
                    return BudgetVerdict(False, spent=Decimal(spent))
                if decision == "admit" or not hold:
                    if not hold:
                        return BudgetVerdict(True, None, Decimal(spent))
                    token = secrets.token_hex(16)
                    await conn.execute(HOLD_SQL, (token, key_id, self.hold_ttl_s))
                    return BudgetVerdict(True, token, Decimal(spent))
            if time.monotonic() >= deadline:
                return BudgetVerdict(False, spent=Decimal(spent), in_flight=True)
            await asyncio.sleep(POLL_S)


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    exceeded: Literal["requests", "tokens"] | None = None
    limit: int | None = None
    retry_after_s: int = 0
    shared: bool = True
    """False when the decision came from this worker's own counters (PostgreSQL unreachable)."""


ALLOWED = RateDecision(True)


def decide(rpm: int | None, tpm: int | None, requests: int, tokens: int, seconds_left: int) -> RateDecision:
    """The verdict for a window that now holds ``requests`` (this one counted) and ``tokens``."""
    retry = max(1, min(WINDOW_S, seconds_left))
    if tpm is not None and tokens >= tpm:
        return RateDecision(False, "tokens", tpm, retry)
    if rpm is not None and requests > rpm:
        return RateDecision(False, "requests", rpm, retry)
    return ALLOWED


class RateLimiter:
    """RPM/TPM admission: shared windows in PostgreSQL, local windows while it is unreachable."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.locks = KeyLocks()
        self._local: dict[tuple[int, int], list[int]] = {}
        """(key id, minute) -> [requests, tokens] counted by this worker alone."""
        self._next_cleanup = 0.0

    async def admit(self, key_id: int, rpm: int | None, tpm: int | None) -> RateDecision:
        """Count one request of the key and say whether it may run."""
        if rpm is None and tpm is None:
            return ALLOWED
        try:
            async with self.locks.hold(key_id), self.db.connection() as conn:
                cur = await conn.execute(ADMIT_SQL, {"key": key_id, "rpm": rpm, "tpm": tpm})
                requests, tokens, left = await cur.fetchone()  # type: ignore[misc]
            return decide(rpm, tpm, requests, tokens, left)
        except DatabaseUnavailable:
            return self._admit_locally(key_id, rpm, tpm)

    def _admit_locally(self, key_id: int, rpm: int | None, tpm: int | None) -> RateDecision:
        now = time.time()
        minute = int(now // WINDOW_S)
        window = self._window(key_id, minute)
        if not (tpm is not None and window[1] >= tpm):
            window[0] = min(window[0] + 1, rpm + 1) if rpm is not None else window[0] + 1
        verdict = decide(rpm, tpm, window[0], window[1], int(WINDOW_S - now % WINDOW_S) + 1)
        return RateDecision(verdict.allowed, verdict.exceeded, verdict.limit, verdict.retry_after_s, shared=False)

    def note_tokens(self, key_id: int, tokens: int) -> None:
        """Count a finished request's tokens in this worker's own window (the fallback's TPM)."""
        if tokens > 0:
            self._window(key_id, int(time.time() // WINDOW_S))[1] += tokens

    def _window(self, key_id: int, minute: int) -> list[int]:
        window = self._local.get((key_id, minute))
        if window is None:
            for stale in [k for k in self._local if k[1] < minute]:
                del self._local[stale]
            window = self._local[(key_id, minute)] = [0, 0]
        return window

    async def add_tokens(self, conn: Any, rows: Sequence[LedgerRow]) -> None:
        """Add written rows' tokens to their keys' current windows (the ledger writer calls this
        with its connection after a batch of new rows); also drops old windows once a minute."""
        totals: dict[int, int] = {}
        for row in rows:
            if row.key_id is not None:
                tokens = row.prompt_tokens + row.completion_tokens
                if tokens:
                    totals[row.key_id] = totals.get(row.key_id, 0) + tokens
        if totals:
            await conn.execute(ADD_TOKENS_SQL, (list(totals), list(totals.values())))
        if time.monotonic() >= self._next_cleanup:
            self._next_cleanup = time.monotonic() + WINDOW_S
            await conn.execute(CLEANUP_SQL)
            await conn.execute(HOLDS_CLEANUP_SQL)


@dataclass
class _Reading:
    spend: Decimal
    since: datetime | None
    read_at: float
    stored_before: Decimal
    """This worker's spend stored in the database when the read began."""


class BudgetTracker:
    """Each key's spend in its budget period, as this worker best knows it (see the module doc)."""

    def __init__(self, db: Database, refresh_s: float = BUDGET_REFRESH_S) -> None:
        self.db = db
        self.refresh_s = refresh_s
        self._readings: dict[int, _Reading] = {}
        self._queued: dict[int, Decimal] = {}
        """Cost this worker queued for the ledger, per key, ever."""
        self._stored: dict[int, Decimal] = {}
        """Of that, what is in the database."""
        self._reads: dict[int, asyncio.Future[None]] = {}

    def note_queued(self, key_id: int, cost: Decimal) -> None:
        self._queued[key_id] = self._queued.get(key_id, Decimal(0)) + cost

    def note_stored(self, rows: Sequence[LedgerRow]) -> None:
        for row in rows:
            if row.key_id is not None and row.cost:
                self._stored[row.key_id] = self._stored.get(row.key_id, Decimal(0)) + row.cost

    async def spend(self, key_id: int, period: str | None, now: datetime | None = None) -> Decimal | None:
        """The key's spend in its current period; None when it was never read and cannot be now."""
        from twllm.accounting.store import period_start

        now = now or datetime.now(UTC)
        since = period_start(period, now)
        reading = self._readings.get(key_id)
        if reading is None or reading.since != since or time.monotonic() - reading.read_at >= self.refresh_s:
            await self._read(key_id, period, since, now)
            reading = self._readings.get(key_id)
        if reading is None:
            return None
        base = reading.spend if reading.since == since else Decimal(0)
        unstored = self._queued.get(key_id, Decimal(0)) - reading.stored_before
        return base + max(unstored, Decimal(0))

    async def _read(self, key_id: int, period: str | None, since: datetime | None, now: datetime) -> None:
        running = self._reads.get(key_id)
        if running is not None:  # another request of this key is reading it: wait for that read
            await asyncio.shield(running)
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reads[key_id] = done
        try:
            from twllm.accounting.store import _PERIOD_SPEND

            stored_before = self._stored.get(key_id, Decimal(0))
            try:
                async with self.db.connection() as conn:
                    cur = await conn.execute(_PERIOD_SPEND, {"ids": [key_id], "since": [since]})
                    row = await cur.fetchone()
            except DatabaseUnavailable:
                return
            self._readings[key_id] = _Reading(
                Decimal(row[1]) if row and row[1] is not None else Decimal(0), since, time.monotonic(), stored_before
            )
        finally:
            del self._reads[key_id]
            done.set_result(None)
