"""Schema migrations, and the maintenance of the spend ledger's monthly partitions and retention.

Migrations are the files ``migrations/NNNN_name.sql`` shipped in this package, applied in version
order, each in its own transaction together with its row in ``twllm_migrations``; a migration
that fails leaves nothing behind. Every transaction first takes one advisory lock, so any number
of concurrent ``migrate`` calls (several gateway workers, a deploy and an operator) apply each
migration exactly once. A migration file whose checksum differs from the one recorded when it
was applied is an error: released migrations are never edited, a new one is added instead.

The ledger (``spend_ledger``) is partitioned by month on ``ts`` (UTC), as
``spend_ledger_YYYYMM``. Rows outside every monthly partition land in ``spend_ledger_default``;
``ensure_partitions`` creates the months that are due, and the months of rows waiting in the
default partition, moving those rows into their new partition.

Retention moves whole months out of the ledger: every row of a month that lies entirely before
the cutoff (today - keep_days, UTC) is added into ``spend_daily`` and deleted, in one transaction,
then that month's partition is dropped. So each request is counted in exactly one of
``spend_ledger`` and ``spend_daily``, never both and never neither, and ``usage`` simply adds the
two. A late row (a spooled write replayed after its month was rolled up) lands in the default
partition, is counted from the ledger until the next retention run, and is then added to its day.
The ledger keeps at least ``keep_days`` days and at most ``keep_days`` plus one month.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from importlib import resources
from importlib.resources.abc import Traversable
from typing import ParamSpec, TypeVar

import psycopg
from psycopg import sql

from twllm.accounting.dburl import connect
from twllm.errors import RuntimeFailure

LOCK_ID = 0x74776C6C6D  # "twllm" in ASCII
"""The advisory lock every schema change and partition change takes (transaction-scoped)."""
LEDGER = "spend_ledger"
DEFAULT_PARTITION = "spend_ledger_default"
LOCK_TIMEOUT = "30s"
"""How long partition changes wait for the ledger's lock before giving up (a later run retries)."""
ERROR_STATUS = 400
"""A ledger row with a status code from here up counts as an error, in roll-ups and in usage."""

P = ParamSpec("P")
T = TypeVar("T")
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_PARTITION_NAME = re.compile(r"^spend_ledger_(\d{4})(\d{2})$")
_HISTORY = """
CREATE TABLE IF NOT EXISTS twllm_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)"""


@dataclass(frozen=True)
class Migration:
    """One migration file."""

    version: int
    name: str
    """The file name without .sql: '0001_accounts'."""
    sql: str
    checksum: str
    """sha256 of the file's bytes, hex."""


def load_migrations(folder: Traversable | None = None) -> list[Migration]:
    """The migration files of ``folder`` (default: this package's ``migrations/``), by version."""
    folder = folder if folder is not None else resources.files("twllm.accounting") / "migrations"
    found: dict[int, Migration] = {}
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_NAME.match(entry.name)
        if match is None:
            raise RuntimeFailure(
                f"migration file {entry.name!r} is not named NNNN_name.sql",
                hint="name migrations like 0002_add_index.sql (lowercase, digits, _)",
            )
        data = entry.read_bytes()
        migration = Migration(int(match[1]), entry.name[:-4], data.decode("utf-8"), hashlib.sha256(data).hexdigest())
        if migration.version in found:
            raise RuntimeFailure(
                f"two migrations have version {match[1]}: {found[migration.version].name} and {migration.name}"
            )
        found[migration.version] = migration
    return [found[v] for v in sorted(found)]


def _failing_as(what: str) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """Turn database errors of the decorated function into a RuntimeFailure about ``what``."""

    def wrap(function: Callable[P, T]) -> Callable[P, T]:
        @functools.wraps(function)
        def run(*args: P.args, **kwargs: P.kwargs) -> T:
            try:
                return function(*args, **kwargs)
            except psycopg.errors.LockNotAvailable as exc:
                raise RuntimeFailure(
                    f"{what}: the ledger stayed locked for {LOCK_TIMEOUT}",
                    hint="a long query or transaction holds it; run it again later",
                ) from exc
            except psycopg.Error as exc:
                raise RuntimeFailure(f"{what}: {_one_line(exc)}") from exc

        return run

    return wrap


@_failing_as("cannot migrate the database")
def migrate(url: str, migrations: list[Migration] | None = None) -> list[str]:
    """Apply every pending migration, then make sure the ledger's partitions exist.

    Returns the names this call applied (empty when the schema was current)."""
    wanted = load_migrations() if migrations is None else migrations
    applied_now: list[str] = []
    with connect(url, autocommit=True) as conn:
        for migration in _pending(conn, wanted):
            try:
                with conn.transaction():
                    _lock(conn)
                    if migration.version in _check_applied(conn, wanted):
                        continue  # a concurrent migrate applied it while we waited for the lock
                    conn.execute(migration.sql)  # no parameters: runs as one multi-statement script
                    conn.execute(
                        "INSERT INTO twllm_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                        (migration.version, migration.name, migration.checksum),
                    )
            except psycopg.Error as exc:
                raise RuntimeFailure(
                    f"migration {migration.name} failed (nothing of it was applied): {_one_line(exc)}"
                ) from exc
            applied_now.append(migration.name)
        if _table_exists(conn, LEDGER):
            ensure_partitions(conn)
    return applied_now


@_failing_as("cannot read the database's migrations")
def pending(url: str, migrations: list[Migration] | None = None) -> list[str]:
    """The names of the migrations not applied yet (checksums of the applied ones are checked).
    Changes nothing."""
    wanted = load_migrations() if migrations is None else migrations
    with connect(url, autocommit=True) as conn:
        applied = _verify(_history(conn), wanted)
    return [m.name for m in wanted if m.version not in applied]


@_failing_as("cannot maintain the ledger")
def maintain(url: str, keep_days: int | None = None, months_ahead: int = 2) -> None:
    """What a periodic job runs (daily is plenty): partitions ahead, then retention if it is set."""
    with connect(url, autocommit=True) as conn:
        ensure_partitions(conn, months_ahead)
        if keep_days is not None:
            apply_retention(conn, keep_days)


def _pending(conn: psycopg.Connection, wanted: list[Migration]) -> list[Migration]:
    with conn.transaction():
        _lock(conn)
        applied = _check_applied(conn, wanted)
    return [m for m in wanted if m.version not in applied]


def _lock(conn: psycopg.Connection) -> None:
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ID,))


def _check_applied(conn: psycopg.Connection, wanted: list[Migration]) -> set[int]:
    """The versions applied so far (creating the history table if needed); raises if an
    applied file changed or is unknown to us."""
    conn.execute(_HISTORY)
    return _verify(conn.execute("SELECT version, name, checksum FROM twllm_migrations").fetchall(), wanted)


def check_current(conn: psycopg.Connection, migrations: list[Migration] | None = None) -> None:
    """Raise unless every migration is applied (read-only; what admin commands check first)."""
    wanted = load_migrations() if migrations is None else migrations
    applied = _verify(_history(conn), wanted)
    missing = [m.name for m in wanted if m.version not in applied]
    if missing:
        raise RuntimeFailure(
            f"the database's schema is not current: {', '.join(missing)} not applied",
            hint="twllm db migrate (with the same --state-dir or --config)",
        )


def _history(conn: psycopg.Connection) -> list[tuple[int, str, str]]:
    """twllm_migrations' rows; none when the table does not exist yet (read-only)."""
    if not _table_exists(conn, "twllm_migrations"):
        return []
    return conn.execute("SELECT version, name, checksum FROM twllm_migrations").fetchall()


def _verify(rows: list[tuple[int, str, str]], wanted: list[Migration]) -> set[int]:
    known = {m.version: m for m in wanted}
    for version, name, checksum in sorted(rows):
        mine = known.get(version)
        if mine is None:
            raise RuntimeFailure(
                f"the database has migration {name}, which this twllm does not know",
                hint="the database was migrated by a newer twllm; upgrade twllm to use it",
            )
        if mine.checksum != checksum:
            raise RuntimeFailure(
                f"migration {mine.name} changed after it was applied (checksum {checksum[:12]}… "
                f"in the database, {mine.checksum[:12]}… in the file)",
                hint="restore the released file and put the change in a new migration",
            )
    return {version for version, _, _ in rows}


# --- partitions -------------------------------------------------------------------------------


def month_start(day: date) -> date:
    return day.replace(day=1)


def add_months(month: date, count: int) -> date:
    index = month.year * 12 + month.month - 1 + count
    return date(index // 12, index % 12 + 1, 1)


def partition_name(month: date) -> str:
    return f"{LEDGER}_{month.year:04d}{month.month:02d}"


def partitions(conn: psycopg.Connection) -> dict[date, str]:
    """The monthly partitions attached to the ledger: first day of the month -> table name."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = %s::regclass",
        (LEDGER,),
    ).fetchall()
    found: dict[date, str] = {}
    for (name,) in rows:
        match = _PARTITION_NAME.match(name)
        if match is not None:
            found[date(int(match[1]), int(match[2]), 1)] = name
    return found


@_failing_as("cannot create the ledger's partitions")
def ensure_partitions(conn: psycopg.Connection, months_ahead: int = 2, today: date | None = None) -> list[str]:
    """Create the partitions of this month and ``months_ahead`` more, and of every month that
    has rows waiting in the default partition; returns the names created.

    A new partition's range must hold no row of the default partition, so those rows are moved
    in the same transaction: taken out of the default, the partition created, put back through
    the ledger (where they now land in the new partition). The ledger is locked meanwhile, so
    no concurrent insert can slip a row into the default in between."""
    today = today or datetime.now(UTC).date()
    this_month = month_start(today)
    due = {add_months(this_month, i) for i in range(months_ahead + 1)}
    rows = conn.execute(
        sql.SQL("SELECT DISTINCT date_trunc('month', ts AT TIME ZONE 'UTC')::date FROM {}").format(
            sql.Identifier(DEFAULT_PARTITION)
        )
    ).fetchall()
    due |= {month for (month,) in rows}
    created: list[str] = []
    for month in sorted(due - set(partitions(conn))):
        with conn.transaction():
            _lock(conn)
            if month in partitions(conn):
                continue  # made by a concurrent run
            _create_partition(conn, month)
        created.append(partition_name(month))
    return created


def _create_partition(conn: psycopg.Connection, month: date) -> None:
    low, high = _utc(month), _utc(add_months(month, 1))
    conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)))
    conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(LEDGER)))
    conn.execute(sql.SQL("CREATE TEMP TABLE twllm_moving (LIKE {}) ON COMMIT DROP").format(sql.Identifier(LEDGER)))
    conn.execute(
        sql.SQL(
            "WITH moved AS (DELETE FROM {} WHERE ts >= %s AND ts < %s RETURNING *) "
            "INSERT INTO twllm_moving SELECT * FROM moved"
        ).format(sql.Identifier(DEFAULT_PARTITION)),
        (low, high),
    )
    conn.execute(
        sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
            sql.Identifier(partition_name(month)),
            sql.Identifier(LEDGER),
            sql.Literal(low.strftime("%Y-%m-%d %H:%M:%S+00")),
            sql.Literal(high.strftime("%Y-%m-%d %H:%M:%S+00")),
        )
    )
    conn.execute(sql.SQL("INSERT INTO {} SELECT * FROM twllm_moving").format(sql.Identifier(LEDGER)))


# --- retention --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Retention:
    """What one retention run did."""

    horizon: date
    """Every ledger row before this day (UTC) is now counted in spend_daily instead."""
    rolled_up_rows: int
    dropped: tuple[str, ...]


def retention_horizon(keep_days: int, today: date) -> date:
    """The first day the ledger keeps: the start of the month that holds the cutoff day."""
    return month_start(today - timedelta(days=keep_days))


@_failing_as("cannot apply the ledger's retention")
def apply_retention(conn: psycopg.Connection, keep_days: int, today: date | None = None) -> Retention:
    """Roll up and drop every month of the ledger that lies entirely before today - keep_days.

    One transaction: sum the rows before the horizon into spend_daily (adding to what a day
    already holds), drop the monthly partitions before it, delete the rest of those rows (late
    ones in the default partition). A second run with the same horizon finds nothing to move.
    The ledger takes writes again when it commits; reads go on throughout except while
    partitions are dropped."""
    if keep_days < 1:
        raise RuntimeFailure(f"retention must keep at least 1 day, not {keep_days}")
    horizon = retention_horizon(keep_days, today or datetime.now(UTC).date())
    cutoff = _utc(horizon)
    with conn.transaction():
        _lock(conn)
        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)))
        # Blocks inserts (a row slipping in between the roll-up and the drop would be lost), not reads.
        conn.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(sql.Identifier(LEDGER)))
        rolled = conn.execute(_ROLL_UP, {"cutoff": cutoff, "error_status": ERROR_STATUS}).fetchone()
        dropped = tuple(name for month, name in sorted(partitions(conn).items()) if add_months(month, 1) <= horizon)
        for name in dropped:
            conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("DELETE FROM {} WHERE ts < %s").format(sql.Identifier(LEDGER)), (cutoff,))
    return Retention(horizon, int(rolled[0]) if rolled else 0, dropped)


# Data-modifying CTEs always run; the outer count sees the rows as they were (same snapshot).
_ROLL_UP = sql.SQL("""
WITH moved AS (
    INSERT INTO spend_daily AS d (day, tenant_id, key_id, model, currency, requests, errors,
                                  prompt_tokens, completion_tokens, cost)
    SELECT (ts AT TIME ZONE 'UTC')::date, coalesce(tenant_id, 0), coalesce(key_id, 0), model, currency,
           count(*), count(*) FILTER (WHERE status_code >= %(error_status)s),
           sum(prompt_tokens), sum(completion_tokens), sum(cost)
    FROM spend_ledger WHERE ts < %(cutoff)s
    GROUP BY 1, 2, 3, 4, 5
    ON CONFLICT (day, tenant_id, key_id, model, currency) DO UPDATE SET
        requests = d.requests + EXCLUDED.requests,
        errors = d.errors + EXCLUDED.errors,
        prompt_tokens = d.prompt_tokens + EXCLUDED.prompt_tokens,
        completion_tokens = d.completion_tokens + EXCLUDED.completion_tokens,
        cost = d.cost + EXCLUDED.cost
    RETURNING 1
)
SELECT count(*) FROM spend_ledger WHERE ts < %(cutoff)s""")


def _utc(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _table_exists(conn: psycopg.Connection, name: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()
    assert row is not None  # a SELECT without FROM yields one row
    return bool(row[0])


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
