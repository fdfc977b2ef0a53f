"""The shared budget gate against a real PostgreSQL: holds, the rule, the ledger statement that
releases a hold and counts the cost in the same step, replays that add nothing, expired holds, and
the migration that starts ``budget_spend`` from the ledger a deployment already has."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
import pytest

from twllm.accounting import migrate as mig
from twllm.accounting import store
from twllm.accounting.dburl import connect
from twllm.accounting.gateway_config import Database
from twllm.accounting.ledger import INSERT_SQL, LedgerRow, insert_params
from twllm.accounting.limits import HOLDS_CLEANUP_SQL, BudgetGate

NOW = datetime.now(UTC)


@pytest.fixture
def conn(url: str) -> Iterator[psycopg.Connection]:
    mig.migrate(url)
    with connect(url) as c:
        yield c


def row(key_id: int, request_id: str, cost: str, hold: str | None = None, ts: datetime = NOW) -> LedgerRow:
    return LedgerRow(
        ts=ts,
        request_id=request_id,
        tenant_id=None,
        key_id=key_id,
        model="chat",
        deployment=None,
        prompt_tokens=1,
        completion_tokens=1,
        cost=Decimal(cost),
        currency="TWD",
        latency_ms=1,
        ttft_ms=None,
        status_code=200,
        error_class=None,
        stream=False,
        hold=hold,
    )


def write(c: psycopg.Connection, rows: list[LedgerRow]) -> int:
    found = c.execute(INSERT_SQL, insert_params(rows)).fetchone()
    assert found is not None
    return int(found[0])


def holds(c: psycopg.Connection) -> int:
    found = c.execute("SELECT count(*) FROM budget_holds").fetchone()
    assert found is not None
    return int(found[0])


def spend(c: psycopg.Connection, key_id: int) -> tuple[Decimal, Decimal]:
    found = c.execute(
        "SELECT coalesce(sum(cost), 0), coalesce(max(max_cost), 0) FROM budget_spend WHERE key_id = %s", (key_id,)
    ).fetchone()
    assert found is not None
    return found[0], found[1]


def test_holds_the_rule_and_the_ledger_statement(conn: psycopg.Connection, url: str) -> None:
    tenant = store.create_tenant(conn, "gate").name
    key, _ = store.create_key(conn, tenant, store.KeySettings(budget=Decimal("1.00"), budget_period="total"))

    async def admit() -> list[str | None]:
        db = Database(url)
        gate = BudgetGate(db, wait_s=0.2)
        try:
            first = await gate.admit(key.id, Decimal("1.00"), None)
            second = await gate.admit(key.id, Decimal("1.00"), None)  # no price known yet: one at a time
            assert second.in_flight  # it waited (0.2 s here) for the first, then gave up
            free = await gate.admit(key.id, Decimal("1.00"), None, hold=False)  # can spend nothing: runs
            assert free.allowed and free.hold is None
            return [first.hold if first.allowed else None, second.hold if second.allowed else None]
        finally:
            await db.close()

    first, second = asyncio.run(admit())
    assert first is not None and second is None and holds(conn) == 1

    # The row that releases the hold counts the cost in the same statement.
    assert write(conn, [row(key.id, "r1", "0.30", hold=first)]) == 1
    assert holds(conn) == 0 and spend(conn, key.id) == (Decimal("0.30"), Decimal("0.30"))
    # A replay of a row already written (the spool after an outage) adds nothing.
    assert write(conn, [row(key.id, "r1", "0.30")]) == 0
    assert spend(conn, key.id) == (Decimal("0.30"), Decimal("0.30"))

    async def admit_until_refused() -> list[str]:
        db = Database(url)
        gate = BudgetGate(db, wait_s=0.2)
        got = []
        try:
            while (verdict := await gate.admit(key.id, Decimal("1.00"), None)).allowed:
                assert verdict.hold is not None
                got.append(verdict.hold)
        finally:
            await db.close()
        return got

    # 0.30 spent, 0.30 the most expensive: in flight 0, 1, 2 → 0.30, 0.60, 0.90 < 1.00; 3 → 1.20.
    admitted = asyncio.run(admit_until_refused())
    assert len(admitted) == 3 and holds(conn) == 3
    write(conn, [row(key.id, f"r{i + 2}", "0.30", hold=h) for i, h in enumerate(admitted)])
    assert holds(conn) == 0 and spend(conn, key.id)[0] == Decimal("1.20")  # < budget + one request
    assert asyncio.run(admit_until_refused()) == []  # spent ≥ budget: refused, nothing held

    # An expired hold (its gateway was killed) counts for nothing and is cleaned up.
    conn.execute(
        "INSERT INTO budget_holds VALUES ('lost', %s, now() - interval '1 second')",
        (key.id,),
    )
    other, _ = store.create_key(conn, tenant, store.KeySettings(budget=Decimal("5"), budget_period="daily"))
    conn.execute("INSERT INTO budget_holds VALUES ('lost-2', %s, now() - interval '1 second')", (other.id,))

    async def one(key_id: int, budget: str, since: datetime | None) -> bool:
        db = Database(url)
        try:
            return (await BudgetGate(db).admit(key_id, Decimal(budget), since)).allowed
        finally:
            await db.close()

    assert asyncio.run(one(other.id, "5", store.period_start("daily", NOW)))
    conn.execute(HOLDS_CLEANUP_SQL)
    assert conn.execute("SELECT hold_id FROM budget_holds WHERE hold_id LIKE 'lost%'").fetchall() == []


def test_a_daily_budget_counts_today_and_a_rotated_keys_spend(conn: psycopg.Connection) -> None:
    tenant = store.create_tenant(conn, "daily").name
    key, _ = store.create_key(conn, tenant, store.KeySettings(budget=Decimal("1"), budget_period="daily"))
    write(conn, [row(key.id, "old", "5.00", ts=NOW - timedelta(days=2)), row(key.id, "new", "0.40")])
    successor, _, _ = store.rotate_key(conn, str(key.id))
    write(conn, [row(successor.id, "after", "0.40")])
    from twllm.accounting.limits import BUDGET_STATE_SQL

    found = conn.execute(BUDGET_STATE_SQL, {"key": successor.id, "since": NOW.date()}).fetchone()
    assert found is not None and (found[0], found[1], found[2]) == (Decimal("0.80"), Decimal("0.40"), 0)
    total = conn.execute(BUDGET_STATE_SQL, {"key": successor.id, "since": None}).fetchone()
    assert total is not None and total[0] == Decimal("5.80")


def test_the_migration_starts_from_the_ledger_a_deployment_already_has(url: str) -> None:
    before = [m for m in mig.load_migrations() if m.version < 5]
    mig.migrate(url, before)
    with connect(url) as c:
        tenant = store.create_tenant(c, "old").name
        key, _ = store.create_key(c, tenant, store.KeySettings(budget=Decimal("10")))
        legacy = [replace(row(key.id, f"l{i}", "0.25"), hold=None) for i in range(4)]
        columns = ", ".join(
            ("ts", "request_id", "key_id", "model", "cost", "currency", "status_code"),
        )
        with c.cursor() as cur, cur.copy(f"COPY spend_ledger ({columns}) FROM STDIN") as copy:
            for r in legacy:
                copy.write_row((r.ts, r.request_id, r.key_id, r.model, r.cost, r.currency, r.status_code))
        c.execute(
            "INSERT INTO spend_daily (day, tenant_id, key_id, model, currency, requests, cost) "
            "VALUES (%s, 1, %s, 'chat', 'TWD', 3, 2.5)",
            (NOW.date() - timedelta(days=90), key.id),
        )
    assert mig.migrate(url) == ["0005_budget_holds", "0006_requested_model"]
    with connect(url) as c:
        assert spend(c, key.id) == (Decimal("3.50"), Decimal("0.25"))
