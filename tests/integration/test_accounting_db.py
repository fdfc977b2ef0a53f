"""Migrations, ledger partitions, retention, tenants and keys, and usage against a real PostgreSQL.

One embedded PostgreSQL serves the module (started like the supervisor starts it); every test
gets a database of its own, dropped afterwards, so no state leaks between tests.
"""

from __future__ import annotations

import random
import re
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import psycopg
import pytest
from pgutil import free_port

from twllm.accounting import migrate as mig
from twllm.accounting import store
from twllm.accounting.dburl import connect
from twllm.accounting.keys import hash_key
from twllm.accounting.migrate import Migration
from twllm.accounting.store import AccountsError, KeySettings
from twllm.accounting.usage import GROUPS, MASTER_KEY_LABEL, totals, usage
from twllm.errors import RuntimeFailure

pytestmark = pytest.mark.integration
UTC = UTC


@pytest.fixture
def conn(url: str) -> Iterator[psycopg.Connection]:
    """A connection to a migrated database."""
    mig.migrate(url)
    with connect(url) as c:
        yield c


def fake(version: int, name: str, text: str) -> Migration:
    import hashlib

    return Migration(version, f"{version:04d}_{name}", text, hashlib.sha256(text.encode()).hexdigest())


# --- migrations -------------------------------------------------------------------------------


def test_migrate_applies_each_migration_once_and_records_it(url: str) -> None:
    shipped = mig.load_migrations()
    assert mig.pending(url) == [m.name for m in shipped]
    with connect(url) as c:  # pending() changes nothing
        assert c.execute("SELECT to_regclass('twllm_migrations')").fetchone() == (None,)
    began = time.perf_counter()
    assert mig.migrate(url) == [m.name for m in shipped]
    first = time.perf_counter() - began
    began = time.perf_counter()
    assert mig.migrate(url) == []
    again = time.perf_counter() - began
    print(f"\nmigrate: first {first * 1000:.0f} ms, again {again * 1000:.0f} ms")
    assert mig.pending(url) == []
    with connect(url) as c:
        rows = c.execute("SELECT version, name, checksum FROM twllm_migrations ORDER BY version").fetchall()
        mig.check_current(c)
    assert rows == [(m.version, m.name, m.checksum) for m in shipped]


def test_concurrent_migrates_apply_each_migration_exactly_once(url: str) -> None:
    # A slow second migration widens the window in which the callers overlap.
    wanted = [*mig.load_migrations(), fake(9001, "slow", "SELECT pg_sleep(0.3); CREATE TABLE slow_one (id int);")]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: mig.migrate(url, wanted), range(8)))
    applied = [name for result in results for name in result]
    assert sorted(applied) == sorted(m.name for m in wanted)  # each applied by exactly one caller
    with connect(url) as c:
        assert c.execute("SELECT count(*) FROM twllm_migrations").fetchone() == (len(wanted),)
        assert len(mig.partitions(c)) == 3


def test_a_changed_migration_is_refused(url: str) -> None:
    first = fake(9001, "extra", "CREATE TABLE extra (id int);")
    mig.migrate(url, [*mig.load_migrations(), first])
    edited = replace(first, sql="CREATE TABLE extra (id bigint);", checksum="0" * 64)
    for call in (mig.migrate, mig.pending):
        with pytest.raises(RuntimeFailure, match="0001_extra|9001_extra") as caught:
            call(url, [*mig.load_migrations(), edited])
        assert "changed after it was applied" in caught.value.message
        assert "new migration" in (caught.value.hint or "")
    with connect(url) as c, pytest.raises(RuntimeFailure, match="changed after it was applied"):
        mig.check_current(c, [*mig.load_migrations(), edited])


def test_a_database_migrated_by_a_newer_twllm_is_refused(url: str) -> None:
    mig.migrate(url, [*mig.load_migrations(), fake(9001, "newer", "SELECT 1;")])
    with pytest.raises(RuntimeFailure, match="9001_newer, which this twllm does not know"):
        mig.migrate(url)


def test_a_failing_migration_leaves_nothing_behind(url: str) -> None:
    broken = fake(9001, "broken", "CREATE TABLE half (id int); SELECT 1 / 0;")
    with pytest.raises(RuntimeFailure, match="migration 9001_broken failed .*division by zero"):
        mig.migrate(url, [*mig.load_migrations(), broken])
    with connect(url) as c:
        assert c.execute("SELECT to_regclass('half')").fetchone() == (None,)
        assert c.execute("SELECT max(version) FROM twllm_migrations").fetchone() == (len(mig.load_migrations()),)
    assert mig.pending(url, [*mig.load_migrations(), broken]) == ["9001_broken"]


def test_admin_commands_see_an_unmigrated_database(url: str) -> None:
    with (
        connect(url) as c,
        pytest.raises(
            RuntimeFailure,
            match="0001_accounts, 0002_guard_policy, 0003_tenant_disabled, 0004_tenant_display_name, 0005_budget_holds, "
            "0006_requested_model not applied",
        ) as caught,
    ):
        mig.check_current(c)
    assert "twllm db migrate" in (caught.value.hint or "")


def test_connection_errors_never_show_the_password() -> None:
    with pytest.raises(RuntimeFailure) as caught:
        connect(f"postgresql://twllm:Pa55-w0rd@127.0.0.1:{free_port()}/twllm")
    assert "Pa55-w0rd" not in caught.value.message and "***" in caught.value.message


# --- partitions ---------------------------------------------------------------------------------


def insert(c: psycopg.Connection, rows: list[tuple]) -> None:
    """Ledger rows: (ts, request_id, tenant_id, key_id, model, prompt, completion, cost, currency, status)."""
    with (
        c.cursor() as cur,
        cur.copy(
            "COPY spend_ledger (ts, request_id, tenant_id, key_id, model, prompt_tokens, completion_tokens, "
            "cost, currency, status_code) FROM STDIN"
        ) as copy,
    ):
        for row in rows:
            copy.write_row(row)


def where_rows_are(c: psycopg.Connection) -> dict[str, int]:
    return dict(c.execute("SELECT tableoid::regclass::text, count(*) FROM spend_ledger GROUP BY 1").fetchall())


def month_of(months_back: int, day: int = 15) -> datetime:
    first = mig.add_months(datetime.now(UTC).date().replace(day=1), -months_back)
    return datetime(first.year, first.month, day, 12, tzinfo=UTC)


def test_migrate_creates_this_months_partition_and_the_next_two(conn: psycopg.Connection) -> None:
    this = datetime.now(UTC).date().replace(day=1)
    assert sorted(mig.partitions(conn)) == [this, mig.add_months(this, 1), mig.add_months(this, 2)]
    assert mig.ensure_partitions(conn) == []
    insert(conn, [(datetime.now(UTC), "now", None, None, "m", 1, 1, 0, "TWD", 200)])
    assert where_rows_are(conn) == {mig.partition_name(this): 1}


def test_rows_waiting_in_the_default_partition_move_into_new_partitions(conn: psycopg.Connection) -> None:
    later, earlier = month_of(-5), month_of(4)  # beyond the partitions made ahead; before any
    insert(
        conn,
        [(later, f"l{i}", None, None, "m", 1, 1, 0, "TWD", 200) for i in range(3)]
        + [(earlier, f"e{i}", None, None, "m", 1, 1, 0, "TWD", 200) for i in range(2)],
    )
    assert where_rows_are(conn) == {"spend_ledger_default": 5}
    created = mig.ensure_partitions(conn)
    assert created == [mig.partition_name(earlier.date()), mig.partition_name(later.date())]
    assert where_rows_are(conn) == {mig.partition_name(later.date()): 3, mig.partition_name(earlier.date()): 2}
    assert conn.execute("SELECT count(*) FROM spend_ledger_default").fetchone() == (0,)
    # The moved rows keep their primary key: a replayed (spooled) row is still a no-op.
    conn.execute(
        "INSERT INTO spend_ledger (ts, request_id, model, status_code) VALUES (%s, 'l0', 'm', 200) "
        "ON CONFLICT DO NOTHING",
        (later,),
    )
    assert conn.execute("SELECT count(*) FROM spend_ledger").fetchone() == (5,)


def test_no_row_is_lost_while_partitions_are_made_and_months_retired(url: str) -> None:
    """Writers keep inserting (one row per transaction, as replayed spool rows may) while a
    partition is created out of the default and while retention rolls months up and drops them."""
    import threading

    mig.migrate(url)
    ahead, old = month_of(-4), month_of(8)
    stop = threading.Event()
    written: dict[str, int] = {}

    def write(when: datetime, tag: str) -> None:
        with connect(url) as c:
            i = 0
            while not stop.is_set() or i < 300:
                c.execute(
                    "INSERT INTO spend_ledger (ts, request_id, model, status_code) VALUES (%s, %s, 'm', 200)",
                    (when + timedelta(seconds=i), f"{tag}-{i}"),
                )
                i += 1
            written[tag] = i

    writers = [threading.Thread(target=write, args=(when, tag)) for when, tag in ((ahead, "ahead"), (old, "old"))]
    for t in writers:
        t.start()
    time.sleep(0.3)
    with connect(url) as c:
        created = mig.ensure_partitions(c, months_ahead=5)  # moves the rows waiting in the default
        time.sleep(0.2)
        retired = mig.apply_retention(c, keep_days=90)  # rolls the old month up and drops it
    time.sleep(0.2)
    stop.set()
    for t in writers:
        t.join(30)
    assert mig.partition_name(ahead.date()) in created and mig.partition_name(old.date()) in created
    assert mig.partition_name(old.date()) in retired.dropped
    with connect(url) as c:
        counted = c.execute(
            "SELECT (SELECT count(*) FROM spend_ledger) + (SELECT coalesce(sum(requests), 0) FROM spend_daily)"
        ).fetchone()[0]
        assert counted == written["ahead"] + written["old"] > 600
        assert c.execute("SELECT count(*) FROM " + mig.partition_name(ahead.date())).fetchone() == (written["ahead"],)


# --- the ledger, usage and retention -----------------------------------------------------------


@pytest.fixture
def accounts(conn: psycopg.Connection) -> dict[str, object]:
    """Two tenants, three keys; returns the ids."""
    store.create_tenant(conn, "acme")
    store.create_tenant(conn, "beta")
    k1, _ = store.create_key(conn, "acme")
    k2, _ = store.create_key(conn, "acme", KeySettings(models=("chat",)))
    k3, _ = store.create_key(conn, "beta")
    return {"acme": k1.tenant_id, "beta": k3.tenant_id, "keys": [k1, k2, k3]}


def random_rows(accounts: dict, count: int, start: datetime, end: datetime, seed: int = 7) -> list[tuple]:
    rng = random.Random(seed)
    owners = [(k.tenant_id, k.id) for k in accounts["keys"]] + [(None, None)]  # None: the master key
    span = (end - start).total_seconds()
    rows = []
    for i in range(count):
        tenant_id, key_id = rng.choice(owners)
        rows.append(
            (
                start + timedelta(seconds=rng.random() * span),
                f"req-{seed}-{i}",
                tenant_id,
                key_id,
                rng.choice(["chat", "embed", "guard"]),
                rng.randint(0, 500),
                rng.randint(0, 300),
                Decimal(rng.randint(0, 10_000_000)) / 10**6,
                rng.choice(["TWD", "TWD", "USD"]),
                rng.choice([200, 200, 200, 429, 500]),
            )
        )
    return rows


def expected(rows: list[tuple], by: str, accounts: dict) -> dict[tuple[str, str], tuple]:
    tenants = {accounts["acme"]: "acme", accounts["beta"]: "beta"}
    prefixes = {k.id: k.prefix for k in accounts["keys"]}
    label = {
        "day": lambda r: r[0].astimezone(UTC).date().isoformat(),
        "model": lambda r: r[4],
        "requested_model": lambda r: r[4],  # these rows name no requested model: the model counts
        "tenant": lambda r: tenants.get(r[2], MASTER_KEY_LABEL),
        "key": lambda r: prefixes.get(r[3], MASTER_KEY_LABEL),
    }[by]
    sums: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0, 0, 0, Decimal(0)])
    for r in rows:
        acc = sums[(label(r), r[8])]
        for i, value in enumerate((1, int(r[9] >= 400), r[5], r[6], r[7])):
            acc[i] += value
    return {group: tuple(acc) for group, acc in sums.items()}


def report(c: psycopg.Connection, by: str, **kwargs) -> dict[tuple[str, str], tuple]:
    return {
        (r.group, r.currency): (r.requests, r.errors, r.prompt_tokens, r.completion_tokens, r.cost)
        for r in usage(c, by=by, **kwargs)
    }


def test_usage_totals_equal_the_inserted_rows_grouped_each_way(conn: psycopg.Connection, accounts: dict) -> None:
    now = datetime.now(UTC)
    rows = random_rows(accounts, 3000, now - timedelta(days=20), now)
    insert(conn, rows)
    for by in GROUPS:
        assert report(conn, by, since=None) == expected(rows, by, accounts), by
    # Filters and the window.
    acme = [r for r in rows if r[2] == accounts["acme"]]
    assert report(conn, "model", tenant="acme", since=None) == expected(acme, "model", accounts)
    k2 = accounts["keys"][1]
    mine = [r for r in rows if r[3] == k2.id]
    assert report(conn, "day", key=k2.prefix, since=None) == expected(mine, "day", accounts)
    assert report(conn, "tenant", key=str(k2.id), since=None) == expected(mine, "tenant", accounts)
    chat = [r for r in rows if r[4] == "chat"]
    assert report(conn, "key", model="chat", since=None) == expected(chat, "key", accounts)
    recent = [r for r in rows if r[0] >= now - timedelta(days=3)]
    assert report(conn, "tenant", since=timedelta(days=3), now=now) == expected(recent, "tenant", accounts)
    # Days in order; the others by cost, highest first; totals per currency.
    days = [r.group for r in usage(conn, by="day", since=None)]
    assert days == sorted(days)
    costs = [r.cost for r in usage(conn, by="model", since=None)]
    assert costs == sorted(costs, reverse=True)
    assert {t.currency: t.requests for t in totals(usage(conn, by="key", since=None))} == {
        cur: sum(1 for r in rows if r[8] == cur) for cur in ("TWD", "USD")
    }


def test_usage_rejects_unknown_names(conn: psycopg.Connection, accounts: dict) -> None:
    with pytest.raises(AccountsError, match="no tenant 'acmee' \\(did you mean 'acme'\\?\\)"):
        usage(conn, tenant="acmee")
    with pytest.raises(AccountsError, match="cannot group usage by 'models'"):
        usage(conn, by="models")
    with pytest.raises(AccountsError, match="no key"):
        usage(conn, key="sk-tw-zzzzzz")
    # A model name is a value, never SQL.
    assert usage(conn, model="x'; DROP TABLE tenants; --", since=None) == []
    assert conn.execute("SELECT count(*) FROM tenants").fetchone() == (2,)


def test_retention_rolls_up_drops_old_months_and_keeps_usage_totals(conn: psycopg.Connection, accounts: dict) -> None:
    today = datetime.now(UTC).date()
    midnight = datetime(today.year, today.month, today.day, tzinfo=UTC)
    start = datetime.combine(mig.add_months(today.replace(day=1), -6), datetime.min.time(), UTC)
    rows = random_rows(accounts, 6000, start, midnight)
    insert(conn, rows)
    mig.ensure_partitions(conn)
    # Rows older than the horizon also wait in the default partition (as if maintenance never ran).
    stale = random_rows(accounts, 50, start - timedelta(days=40), start, seed=8)
    insert(conn, stale)
    assert all(r[0] < start for r in stale)
    assert conn.execute("SELECT count(*) FROM spend_ledger_default").fetchone() == (50,)
    everything = rows + stale

    def reports() -> dict:
        out = {by: report(conn, by, since=None) for by in GROUPS}
        out["window"] = report(conn, "key", since=timedelta(days=100), now=midnight)
        out["acme"] = report(conn, "day", tenant="acme", since=None)
        return out

    before = reports()
    assert before["tenant"] == expected(everything, "tenant", accounts)

    keep = 60
    horizon = mig.retention_horizon(keep, today)
    began = time.perf_counter()
    done = mig.apply_retention(conn, keep, today)
    print(f"\nretention: {done.rolled_up_rows} rows rolled up in {(time.perf_counter() - began) * 1000:.0f} ms")
    assert done.horizon == horizon and horizon <= today - timedelta(days=keep)
    assert done.rolled_up_rows == sum(
        1 for r in everything if r[0] < datetime.combine(horizon, datetime.min.time(), UTC)
    )
    assert done.dropped and all(mig.add_months(m, 1) <= horizon for m in map(_month, done.dropped))
    assert not set(done.dropped) & set(mig.partitions(conn).values())
    assert conn.execute(
        "SELECT count(*) FROM spend_ledger WHERE ts < %s", (datetime.combine(horizon, datetime.min.time(), UTC),)
    ).fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM spend_daily").fetchone()[0] > 0
    assert reports() == before

    # A second run moves nothing and changes nothing.
    daily = conn.execute("SELECT * FROM spend_daily ORDER BY 1, 2, 3, 4, 5").fetchall()
    again = mig.apply_retention(conn, keep, today)
    assert (again.rolled_up_rows, again.dropped) == (0, ())
    assert conn.execute("SELECT * FROM spend_daily ORDER BY 1, 2, 3, 4, 5").fetchall() == daily

    # A late row for a month already rolled up lands in the default partition, is counted from
    # there, and the next run adds it to its day: counted once all along.
    late = (
        start + timedelta(days=3),
        "late-1",
        accounts["acme"],
        accounts["keys"][0].id,
        "chat",
        7,
        3,
        Decimal("1.25"),
        "TWD",
        200,
    )
    insert(conn, [late])
    after_late = report(conn, "tenant", since=None)
    assert after_late == expected(everything + [late], "tenant", accounts)
    assert mig.apply_retention(conn, keep, today).rolled_up_rows == 1
    assert conn.execute("SELECT count(*) FROM spend_ledger_default").fetchone() == (0,)
    assert report(conn, "tenant", since=None) == after_late


def _month(name: str) -> date:
    return date(int(name[-6:-2]), int(name[-2:]), 1)


def test_usage_of_100k_ledger_rows_is_fast(conn: psycopg.Connection, accounts: dict) -> None:
    now = datetime.now(UTC)
    rows = random_rows(accounts, 100_000, now - timedelta(days=30), now)
    began = time.perf_counter()
    insert(conn, rows)
    copied = time.perf_counter() - began
    conn.execute("ANALYZE spend_ledger")
    timings = {}
    for by in GROUPS:
        began = time.perf_counter()
        result = usage(conn, by=by, since=timedelta(days=30), now=now)
        timings[by] = time.perf_counter() - began
        assert sum(r.requests for r in result) == len(rows)
    began = time.perf_counter()
    usage(conn, by="day", tenant="acme", since=timedelta(days=7), now=now)
    timings["day, one tenant, 7d"] = time.perf_counter() - began
    print(
        f"\n100k rows: COPY {copied * 1000:.0f} ms; usage "
        + ", ".join(f"by {k} {v * 1000:.0f} ms" for k, v in timings.items())
    )
    assert max(timings.values()) < 5


# --- tenants and keys -------------------------------------------------------------------------


def test_tenants_are_unique_and_named_sensibly(conn: psycopg.Connection) -> None:
    acme = store.create_tenant(conn, "acme")
    with pytest.raises(AccountsError, match="tenant 'acme' already exists"):
        store.create_tenant(conn, "acme")
    with pytest.raises(AccountsError, match="invalid tenant name"):
        store.create_tenant(conn, "no spaces")
    store.create_key(conn, "acme")
    revoked, _ = store.create_key(conn, "acme")
    store.revoke_key(conn, str(revoked.id))
    assert [(t.name, t.active_keys) for t in store.list_tenants(conn)] == [("acme", 1)]
    assert store.get_tenant(conn, "acme").id == acme.id
    with pytest.raises(AccountsError, match="no tenant 'acm' \\(did you mean 'acme'\\?\\)"):
        store.create_key(conn, "acm")


def test_tenant_display_names_are_text_for_people(conn: psycopg.Connection) -> None:
    xss = "<img src=x onerror=alert(1)>"
    rad = store.create_tenant(conn, "ntuh-rad", display_name=" 臺大醫院 放射科 ")
    assert (rad.display_name, rad.label) == ("臺大醫院 放射科", "臺大醫院 放射科")
    plain = store.create_tenant(conn, "plain")
    assert (plain.display_name, plain.label, plain.to_dict()["display_name"]) == (None, "plain", None)
    with pytest.raises(AccountsError, match="invalid tenant name"):
        store.create_tenant(conn, xss)  # the name stays a slug
    assert store.set_tenant_display_name(conn, "plain", xss).display_name == xss  # any text: shown as text
    for bad, message in [
        ("   ", "is empty"),
        ("a\nb", "U+000A"),
        ("a\tb", "U+0009"),
        ("a\u200bb", "U+200B ZERO WIDTH SPACE"),
        ("a\u202eb", "U+202E"),
        ("a\x00b", "U+0000"),
        ("名" * 101, "101 characters long"),
    ]:
        with pytest.raises(AccountsError, match=re.escape(message)) as caught:
            store.set_tenant_display_name(conn, "ntuh-rad", bad)
        assert "1-100 characters" in (caught.value.hint or "")
        with pytest.raises(AccountsError):
            store.create_tenant(conn, "refused", display_name=bad)
    assert store.set_tenant_display_name(conn, "ntuh-rad", "名" * 100).display_name == "名" * 100
    assert "refused" not in [t.name for t in store.list_tenants(conn)]
    with pytest.raises(AccountsError, match="no tenant 'nobody'"):
        store.set_tenant_display_name(conn, "nobody", "x")
    # Every read of tenants and keys carries it.
    key, _ = store.create_key(conn, "plain")
    listed = {t.name: t.display_name for t in store.list_tenants(conn)}
    assert listed == {"ntuh-rad": "名" * 100, "plain": xss}
    assert store.get_tenant(conn, "plain").to_dict()["label"] == xss
    assert store.find_key(conn, str(key.id)).tenant_display_name == xss
    assert store.list_keys(conn, "plain")[0].to_dict()["tenant_display_name"] == xss
    new, _, old = store.rotate_key(conn, str(key.id))
    assert (new.tenant, new.tenant_display_name, old.tenant_display_name) == ("plain", xss, xss)
    assert store.set_tenant_display_name(conn, "plain", None).display_name is None
    assert store.find_key(conn, str(new.id)).tenant_display_name is None


def test_a_key_stores_only_its_hash_and_keeps_its_settings(conn: psycopg.Connection) -> None:
    store.create_tenant(conn, "acme")
    settings = KeySettings(
        name="acme-prod",
        models=("chat", "embed"),
        rpm=60,
        tpm=10_000,
        budget=Decimal("500"),
        expires_in=timedelta(days=30),
    )
    key, secret = store.create_key(conn, "acme", settings)
    assert secret.startswith("sk-tw-") and key.prefix == secret[:12]
    assert (key.name, key.models, key.rpm, key.tpm, key.budget, key.budget_period) == (
        "acme-prod",
        ("chat", "embed"),
        60,
        10_000,
        Decimal("500"),
        "monthly",
    )
    assert timedelta(days=29, hours=23) < key.expires_at - key.created_at <= timedelta(days=30)
    assert key.status() == "active" and key.spend == 0
    stored = conn.execute("SELECT key_hash, api_keys::text FROM api_keys").fetchall()
    assert stored[0][0] == hash_key(secret) and secret not in stored[0][1]
    assert store.find_key(conn, secret).id == key.id  # a whole key finds its record by hash
    assert store.find_key(conn, key.prefix[:9]).id == key.id
    assert store.find_key(conn, secret[:16]).id == key.id  # more than the stored prefix: its first 12 count
    with pytest.raises(AccountsError, match="not a key id"):
        store.find_key(conn, "acme")


def test_revoke_and_rotate(conn: psycopg.Connection) -> None:
    store.create_tenant(conn, "acme")
    old, old_secret = store.create_key(
        conn,
        "acme",
        KeySettings(
            models=("chat",), rpm=5, budget=Decimal("10"), budget_period="daily", expires_in=timedelta(hours=12)
        ),
    )
    new, secret, before = store.rotate_key(conn, old.prefix)
    assert secret != old_secret and new.prefix == secret[:12]
    assert before.status() == "revoked" and new.status() == "active"
    assert new.rotated_from == old.id
    assert (new.tenant, new.models, new.rpm, new.budget, new.budget_period, new.expires_at) == (
        old.tenant,
        old.models,
        old.rpm,
        old.budget,
        old.budget_period,
        old.expires_at,
    )
    with pytest.raises(AccountsError, match="is revoked; only active keys are rotated"):
        store.rotate_key(conn, str(old.id))

    # Spend this period counts the key it was rotated from: rotation never resets a budget.
    insert(
        conn,
        [
            (datetime.now(UTC), "a", old.tenant_id, old.id, "chat", 1, 1, Decimal("2.5"), "TWD", 200),
            (datetime.now(UTC), "b", new.tenant_id, new.id, "chat", 1, 1, Decimal("1"), "TWD", 200),
            (datetime.now(UTC) - timedelta(days=2), "c", new.tenant_id, new.id, "chat", 1, 1, Decimal("9"), "TWD", 200),
        ],
    )
    spend = {k.id: k.spend for k in store.list_keys(conn, "acme")}
    assert spend == {new.id: Decimal("3.5"), old.id: Decimal("2.5")}  # daily: yesterday's 9 not counted

    record, changed = store.revoke_key(conn, new.prefix)
    assert changed and record.status() == "revoked"
    record, changed = store.revoke_key(conn, str(new.id))
    assert not changed
    assert [k.status() for k in store.list_keys(conn)] == ["revoked", "revoked"]


def test_concurrent_rotations_of_one_key_make_one_successor(url: str) -> None:
    mig.migrate(url)
    with connect(url) as c:
        store.create_tenant(c, "acme")
        key, _ = store.create_key(c, "acme")

    def rotate(_: int) -> str:
        with connect(url) as c:
            try:
                return store.rotate_key(c, str(key.id))[0].prefix
            except AccountsError:
                return "refused"

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(rotate, range(4)))
    assert outcomes.count("refused") == 3
    with connect(url) as c:
        assert c.execute("SELECT count(*) FROM api_keys WHERE rotated_from = %s", (key.id,)).fetchone() == (1,)
