"""Money under concurrency: budgets, RPM and revocation on one gateway of several workers.

One real twllm gateway (``twllm.gateway.serve``: LiteLLM's proxy behind twllm's shield, uvicorn
with ``WORKERS`` worker processes) runs the config twllm renders, every deployment answering from
``mock_response`` (no engine), against a real embedded PostgreSQL. Every chat request here is the
same, so every answered request costs exactly the same (``cost``, measured once from the ledger).
Each test makes its own tenant and key, so rows, spend and windows are counted per key.

Which worker answered a request is read from the operating system: while the client's
connection is still open, the worker process holding the server end of it (local port = the
gateway's, remote port = the client's) is the one that answered. Requests go over fresh
connections (a burst: one connection per concurrent request), which the kernel hands to
whichever worker accepts first.

The bounds asserted, from ``twllm/accounting/limits.py`` and ``auth.py``:

- **Budget** (``limits.BudgetGate``) — a request of a key with a budget is admitted under an
  advisory lock on the key iff ``spent < budget`` and (nothing in flight, or ``spent + held ×
  est < budget``), ``est`` being the most expensive request of the period so far; it holds its
  place until its ledger row is written. With every request costing ``c`` and ``est == c``
  already (the key has spent before), ``spent + held × c`` is ``c ×`` (requests admitted so far),
  so exactly ``ceil(remaining / c)`` requests are admitted whatever the concurrency, and the spend
  ends in ``[budget, budget + c)``: less than one request's cost above the budget.
- **RPM** — one counter row per key and minute (the database's clock), counted under its row
  lock and capped at ``rpm + 1``: exactly ``rpm`` requests of a burst are admitted, however many
  workers take them; the rest get 429 ``rate_limit_exceeded`` with Retry-After.
- **Revocation** — each worker caches a key for ``KEY_CACHE_TTL_S``; a request sent
  ``KEY_CACHE_TTL_S + REVOCATION_MARGIN_S`` after the revocation is refused (401
  ``revoked_api_key``) by every worker.
- **Ledger** — one row per answered request of the key, refusals included: rows' statuses ==
  replies' statuses, distinct request ids, refused rows cost nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import os
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import pytest
import yaml
from pgutil import Postgres, sql
from proxyutil import ProxyHandle, free_port, start_proxy

from twllm.accounting import store
from twllm.accounting.auth import KEY_CACHE_TTL_S
from twllm.accounting.gateway_config import POOL_MAX_SIZE, POOL_TIMEOUT_S, QUERY_TIMEOUT_S, Database
from twllm.accounting.ledger import FLUSH_INTERVAL_S
from twllm.accounting.limits import BUDGET_LOCK_CLASS, BudgetGate, RateDecision, RateLimiter
from twllm.plan.build import ENGINE_KEY_ENV, make_plan
from twllm.plan.placement import GpuInventory
from twllm.render.litellm_config import render
from twllm.spec.resolve import parse_spec

pytestmark = pytest.mark.integration

WORKERS = 2
"""uvicorn worker processes of the one gateway."""
MASTER = "sk-money-test-master"
SPEC = """
name: money
gateway:
  master_key: ${TWLLM_MASTER_KEY}
  num_retries: 0
models:
  - {name: chat, model: llama-3.2-1b-instruct, price: {input_per_1m: 1000, output_per_1m: 1000}}
"""
MOCK_TEXT = "好的，這是模擬的回答。"
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
PRESPENT = 3
"""Requests a budget key spends one by one before its burst (so its requests are priced)."""
BUDGET_BURST = 50
RPM = 10
RPM_BURST = 100
REVOCATION_MARGIN_S = 1.5
"""Beyond KEY_CACHE_TTL_S: a request's latency on a busy 2-core machine."""
REVOCATION_CLIENTS = 4
"""Client threads polling a revoked key, each request on a fresh connection."""


# --- the gateway ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The rendered config, every deployment answering from a mock instead of an engine."""
    out = tmp_path_factory.mktemp("money")
    loaded = parse_spec(SPEC, "money.yaml", {"TWLLM_MASTER_KEY": MASTER})
    render(make_plan(loaded, GpuInventory(8, 80, "test"), out / "state"), loaded.spec, out)
    path = out / "litellm_config.yaml"
    config = yaml.safe_load(path.read_text())
    assert config["general_settings"]["custom_auth"] == "twllm.accounting.hooks.user_api_key_auth"
    for deployment in config["model_list"]:
        deployment["litellm_params"]["mock_response"] = MOCK_TEXT
    config["general_settings"]["background_health_checks"] = False  # nothing to check: no engines
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return out


@pytest.fixture(scope="module")
def gateway(gateway_dir: Path, postgres: Postgres) -> Iterator[ProxyHandle]:
    env = {
        "TWLLM_MASTER_KEY": MASTER,
        ENGINE_KEY_ENV: "sk-engine-test",
        "TWLLM_GATEWAY_SETTINGS": str(gateway_dir / "gateway.json"),
        "TWLLM_DATABASE_URL": postgres.url,
    }
    with start_proxy(gateway_dir / "litellm_config.yaml", env=env, workers=WORKERS, timeout=300) as handle:
        assert len(workers(handle)) == WORKERS, handle.log_tail()
        yield handle


@pytest.fixture(scope="module")
def cost(gateway: ProxyHandle, postgres: Postgres) -> Decimal:
    """What one request of ``CHAT`` costs, as the ledger prices it."""
    key_id, secret = make_key(postgres.url)
    assert send(gateway, secret).status == 200
    [row] = settled_rows(postgres.url, key_id, 1)
    assert row["cost"] > 0, row
    return Decimal(row["cost"])


# --- which worker answered -------------------------------------------------------------------------


def workers(gateway: ProxyHandle) -> set[int]:
    """The gateway's worker processes: its children listening on its port."""
    found = set()
    for proc in psutil.Process(gateway.pid).children(recursive=True):
        try:
            if any(
                c.status == psutil.CONN_LISTEN and c.laddr.port == gateway.port for c in proc.net_connections("tcp")
            ):
                found.add(proc.pid)
        except psutil.Error:  # gone, or not ours to look at: not a worker
            continue
    return found


def owners(gateway: ProxyHandle, client_ports: Iterable[int]) -> dict[int, int]:
    """Client port -> pid of the worker holding the server end of that (still open) connection."""
    wanted = set(client_ports)
    found: dict[int, int] = {}
    for proc in psutil.Process(gateway.pid).children(recursive=True):
        try:
            for c in proc.net_connections("tcp"):
                if c.raddr and c.laddr.port == gateway.port and c.raddr.port in wanted:
                    found[c.raddr.port] = proc.pid
        except psutil.Error:
            continue
    return found


def client_port(reply: httpx.Response) -> int:
    return int(reply.extensions["network_stream"].get_extra_info("client_addr")[1])


# --- requests ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    headers: httpx.Headers
    body: dict[str, Any]
    worker: int | None
    """The pid of the worker that answered (None: its connection was closed before it was seen)."""
    sent: float
    received: float
    """time.monotonic() before sending and after the answer."""


def reply_of(response: httpx.Response, worker: int | None, sent: float, received: float) -> Reply:
    return Reply(response.status_code, response.headers, response.json(), worker, sent, received)


_tenants = iter(range(1, 10_000))


def make_key(url: str, **settings: object) -> tuple[int, str]:
    """A new tenant with one key, as ``twllm keys create`` makes it; (key id, secret)."""
    with psycopg.connect(url, autocommit=True) as conn:
        tenant = store.create_tenant(conn, f"money{next(_tenants)}-{os.getpid()}").name
        record, secret = store.create_key(conn, tenant, store.KeySettings(**settings))  # type: ignore[arg-type]
    return record.id, secret


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def send(gateway: ProxyHandle, secret: str) -> Reply:
    """One request on a fresh connection, and the worker that answered it."""
    with httpx.Client(base_url=gateway.base_url, timeout=60, trust_env=False) as client:
        sent = time.monotonic()
        response = client.post("/v1/chat/completions", headers=auth(secret), json=CHAT)
        received = time.monotonic()
        port = client_port(response)
        return reply_of(response, owners(gateway, [port]).get(port), sent, received)


def burst(gateway: ProxyHandle, secret: str, total: int) -> list[Reply]:
    """``total`` requests released together, each on a connection of its own."""

    async def run() -> list[Reply]:
        limits = httpx.Limits(max_connections=total, max_keepalive_connections=total)
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60, trust_env=False, limits=limits) as client:
            go = asyncio.Event()

            async def one() -> tuple[httpx.Response, float, float]:
                await go.wait()
                sent = time.monotonic()
                response = await client.post("/v1/chat/completions", headers=auth(secret), json=CHAT)
                return response, sent, time.monotonic()

            tasks = [asyncio.create_task(one()) for _ in range(total)]
            await asyncio.sleep(0.05)  # every task is waiting at the start line
            go.set()
            done = await asyncio.gather(*tasks)
            who = owners(gateway, [client_port(r) for r, _, _ in done])  # the connections are still open
            return [reply_of(r, who.get(client_port(r)), sent, got) for r, sent, got in done]

    return asyncio.run(run())


def error(reply: Reply) -> dict[str, Any]:
    """The OpenAI error object of a refusal (the shape checked)."""
    assert set(reply.body) == {"error"}, reply.body
    err = reply.body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and err["param"] is None, err
    return err


# --- the ledger ----------------------------------------------------------------------------------


def ledger_rows(url: str, key_id: int) -> list[dict[str, Any]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute("SELECT * FROM spend_ledger WHERE key_id = %s", (key_id,))
        assert cur.description is not None
        names = [c.name for c in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def settled_rows(url: str, key_id: int, count: int, timeout: float = 30) -> list[dict[str, Any]]:
    """The key's rows once ``count`` are written, and a moment more (a duplicate would show)."""
    deadline = time.monotonic() + timeout
    while len(ledger_rows(url, key_id)) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(FLUSH_INTERVAL_S * 3)
    return ledger_rows(url, key_id)


def check_ledger(url: str, key_id: int, replies: list[Reply], cost: Decimal) -> list[dict[str, Any]]:
    """One row per answered request (refusals of the key included), no duplicates, exact costs."""
    rows = settled_rows(url, key_id, len(replies))
    assert len({r["request_id"] for r in rows}) == len(rows), "a request_id twice in the ledger"
    assert Counter(r["status_code"] for r in rows) == Counter(r.status for r in replies)
    for row in rows:
        assert row["cost"] == (cost if row["status_code"] == 200 else 0), row
    return rows


def per_worker(replies: Iterable[Reply]) -> dict[int | None, Counter[int]]:
    """Worker pid -> statuses it answered."""
    seen: dict[int | None, Counter[int]] = {}
    for r in replies:
        seen.setdefault(r.worker, Counter())[r.status] += 1
    return seen


# --- a) budget -------------------------------------------------------------------------------------


@pytest.mark.parametrize("remaining", [Decimal(5), Decimal("5.5")], ids=["covers-5", "covers-5.5"])
def test_a_burst_overspends_a_budget_by_less_than_one_request(gateway, postgres, cost, remaining):
    """50 concurrent requests on a key whose remaining budget covers ``remaining`` requests:
    exactly ceil(remaining) are answered and the spend ends below budget + one request's cost."""
    budget = (PRESPENT + remaining) * cost
    key_id, secret = make_key(postgres.url, budget=budget, budget_period="total")
    before = [send(gateway, secret) for _ in range(PRESPENT)]  # one by one: the key's price is known
    assert [r.status for r in before] == [200] * PRESPENT
    assert len(settled_rows(postgres.url, key_id, PRESPENT)) == PRESPENT

    began = time.monotonic()
    replies = burst(gateway, secret, BUDGET_BURST)
    took = time.monotonic() - began

    statuses = Counter(r.status for r in replies)
    codes = Counter(error(r)["code"] for r in replies if r.status != 200)
    rows = check_ledger(postgres.url, key_id, before + replies, cost)
    spend = sum((r["cost"] for r in rows), Decimal(0))
    print(
        f"\nbudget {budget} TWD = {PRESPENT} spent + {remaining} requests of {cost} TWD; burst of {BUDGET_BURST} "
        f"over {WORKERS} workers in {took:.2f} s: {statuses[200]} accepted, refused {dict(codes)}; "
        f"spend {spend}, over the budget by {spend - budget} ({(spend - budget) / cost} of a request); "
        f"per worker {per_worker(replies)}"
    )
    assert set(statuses) <= {200, 429}, statuses
    for r in replies:
        if r.status == 429:  # OpenAI's answer for a spent quota; the code tells which rule refused
            err = error(r)
            assert err["type"] == "insufficient_quota", err
            assert err["code"] in {"budget_exceeded", "budget_in_flight"}, err
            if err["code"] == "budget_exceeded":
                assert "retry-after" not in r.headers
            else:  # waited WAIT_S for the requests in flight to be written (a very slow machine)
                assert r.headers["retry-after"] == "1"
    assert statuses[200] == math.ceil(remaining), statuses
    assert spend == (PRESPENT + statuses[200]) * cost
    assert budget <= spend < budget + cost, (spend, budget, cost)  # at most one request's cost beyond
    assert len({r.worker for r in replies} - {None}) == WORKERS, per_worker(replies)  # every worker took part
    assert sql(postgres.url, "SELECT count(*) FROM budget_holds WHERE key_id = %s", (key_id,)) == [(0,)]
    assert sql(postgres.url, "SELECT sum(cost) FROM budget_spend WHERE key_id = %s", (key_id,)) == [(spend,)]

    # Spent: refused at once by whichever worker, nothing to wait for.
    after = [send(gateway, secret) for _ in range(2 * WORKERS)]
    for r in after:
        assert r.status == 429 and error(r)["code"] == "budget_exceeded", r.body
    rows = check_ledger(postgres.url, key_id, before + replies + after, cost)
    assert sum((r["cost"] for r in rows), Decimal(0)) == spend


# --- b) RPM ----------------------------------------------------------------------------------------


def db_minute(url: str) -> object:
    return sql(url, "SELECT date_trunc('minute', now())")[0][0]


def early_in_a_minute(url: str, margin: float = 25) -> None:
    """Wait for the next minute (the database's clock) if fewer than ``margin`` s of this one are left."""
    second = float(sql(url, "SELECT extract(epoch FROM now()) - extract(epoch FROM date_trunc('minute', now()))")[0][0])
    if second > 60 - margin:
        time.sleep(60 - second + 0.3)


def test_rpm_admits_exactly_rpm_of_a_burst_across_all_workers(gateway, postgres, cost):
    for attempt in range(2):  # a burst that straddles a minute boundary is tried once more
        key_id, secret = make_key(postgres.url, rpm=RPM)
        early_in_a_minute(postgres.url)
        window = db_minute(postgres.url)
        began = time.monotonic()
        replies = burst(gateway, secret, RPM_BURST)
        took = time.monotonic() - began
        if db_minute(postgres.url) == window:
            break
        print(f"\nthe burst straddled a minute boundary (attempt {attempt + 1}); again with a new key")
    else:
        pytest.fail("two bursts in a row straddled a minute boundary")

    statuses = Counter(r.status for r in replies)
    by_worker = per_worker(replies)
    print(
        f"\nRPM {RPM}: burst of {RPM_BURST} over {WORKERS} workers in {took:.2f} s: {statuses[200]} accepted, "
        f"{statuses[429]} refused; per worker {by_worker}"
    )
    assert statuses == Counter({200: RPM, 429: RPM_BURST - RPM}), (statuses, by_worker)
    for r in replies:
        if r.status == 429:
            err = error(r)
            assert err["type"] == "requests" and err["code"] == "rate_limit_exceeded", err
            assert 1 <= int(r.headers["retry-after"]) <= 60, r.headers
            assert r.headers["x-ratelimit-limit-requests"] == str(RPM)
            assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert len(set(by_worker) - {None}) == WORKERS, by_worker  # the one limit, whichever worker counted
    # The window's counter stops at rpm + 1 however many were refused.
    assert sql(postgres.url, "SELECT requests FROM rate_windows WHERE key_id = %s", (key_id,)) == [(RPM + 1,)]
    check_ledger(postgres.url, key_id, replies, cost)


# --- c) revocation ----------------------------------------------------------------------------------


def test_a_revoked_key_is_refused_by_every_worker_within_the_cache_ttl(gateway, postgres, cost):
    key_id, secret = make_key(postgres.url)
    every = workers(gateway)
    # Every worker answers the key (and so caches it) before the revocation.
    warm: list[Reply] = []
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        while {r.worker for r in warm} < every:
            assert len(warm) < 200, f"the workers {every} did not all answer: {per_worker(warm)}"
            warm += pool.map(lambda _: send(gateway, secret), range(8))
    assert {r.status for r in warm} == {200}, per_worker(warm)

    with psycopg.connect(postgres.url, autocommit=True) as conn:
        _, was_active = store.revoke_key(conn, str(key_id))  # what `twllm keys revoke` runs
    revoked_at = time.monotonic()
    assert was_active
    deadline = KEY_CACHE_TTL_S + REVOCATION_MARGIN_S
    seen: list[Reply] = []
    lock = threading.Lock()

    def late_by_worker() -> Counter[int | None]:
        return Counter(r.worker for r in seen if r.sent - revoked_at >= deadline)

    def poll() -> None:
        # Until well past the deadline, and until every worker answered several requests after it.
        while time.monotonic() - revoked_at < deadline + 2 or any(late_by_worker()[w] < 3 for w in every):
            assert time.monotonic() - revoked_at < deadline + 60, f"not every worker answered: {late_by_worker()}"
            reply = send(gateway, secret)
            with lock:
                seen.append(reply)
            time.sleep(0.02)

    with concurrent.futures.ThreadPoolExecutor(REVOCATION_CLIENTS) as pool:
        for f in [pool.submit(poll) for _ in range(REVOCATION_CLIENTS)]:
            f.result()

    accepted = [r for r in seen if r.status == 200]
    last_sent = max((r.sent - revoked_at for r in accepted), default=None)
    last_answered = max((r.received - revoked_at for r in accepted), default=None)
    refused_from = {
        w: min((r.sent - revoked_at for r in seen if r.worker == w and r.status == 401), default=None) for w in every
    }
    late = [r for r in seen if r.sent - revoked_at >= deadline]
    print(
        f"\nrevocation, TTL {KEY_CACHE_TTL_S} s, {WORKERS} workers {sorted(every)}: warmed with {len(warm)} requests "
        f"{per_worker(warm)}; after the revoke {len(seen)} requests on fresh connections, "
        f"{len(accepted)} accepted, the last sent {last_sent} s and answered {last_answered} s after the revoke; "
        f"each worker's first 401 (sent at, s) {refused_from}; after {deadline} s: {len(late)} requests {per_worker(late)}"
    )
    assert {r.status for r in seen} <= {200, 401}, per_worker(seen)
    for r in seen:
        if r.status == 401:
            err = error(r)
            assert err["type"] == "invalid_request_error" and err["code"] == "revoked_api_key", err
    assert all(r.status == 401 for r in late), per_worker(late)
    assert set(late_by_worker()) >= every  # every worker refused it once the TTL was over
    assert last_sent is None or last_sent < deadline
    check_ledger(postgres.url, key_id, warm + seen, cost)


# --- regression: a burst of one key is not PostgreSQL being down ---------------------------------

HELD_S = 1.3
"""How long PostgreSQL holds a key's admissions up here (another worker's transaction on the key, a
busy machine): longer than a request waits for a pooled connection, shorter than a query may take."""


def test_a_key_held_up_in_postgres_queues_in_the_worker_not_on_the_pool(postgres):
    """Regression (found by the bursts above on a loaded machine: 31 and 39 of 50 answered on a
    budget for 5, 20 answered at RPM 10). Every admission of a key in a worker took a pooled
    connection and waited on the key's lock in PostgreSQL (the rate row, the budget's advisory
    lock); past ``POOL_MAX_SIZE`` of them the rest timed out on the pool, which counts as
    PostgreSQL down: RPM fell back to each worker's own count and the budget gate to admitting.
    Now a worker's admissions of one key queue in the worker (``limits.KeyLocks``), one at a time."""
    assert POOL_TIMEOUT_S < HELD_S < QUERY_TIMEOUT_S
    many = 3 * POOL_MAX_SIZE
    price = Decimal("0.01")
    key_id, _ = make_key(postgres.url, rpm=RPM, budget=5 * price, budget_period="total")
    # Priced already (the most expensive request so far: ``price``), nothing spent.
    sql(postgres.url, "INSERT INTO budget_spend (key_id, day, max_cost) VALUES (%s, current_date, %s)", (key_id, price))
    early_in_a_minute(postgres.url, margin=10)

    async def one_worker() -> tuple[list[RateDecision], list[bool], int]:
        db = Database(postgres.url)
        limiter, gate = RateLimiter(db), BudgetGate(db, wait_s=0.5)
        holder = await psycopg.AsyncConnection.connect(postgres.url, autocommit=True)
        try:
            async with holder.transaction():  # the key's rate row, locked (uncommitted) for HELD_S
                await holder.execute(
                    "INSERT INTO rate_windows (key_id, window_start) VALUES (%s, date_trunc('minute', now()))",
                    (key_id,),
                )
                rated = [asyncio.create_task(limiter.admit(key_id, RPM, None)) for _ in range(many)]
                await asyncio.sleep(HELD_S)
            decisions = await asyncio.gather(*rated)

            await holder.execute(
                "SELECT pg_advisory_lock(%s, (%s::bigint %% 2147483647)::integer)", (BUDGET_LOCK_CLASS, key_id)
            )
            gated = [asyncio.create_task(gate.admit(key_id, 5 * price, None)) for _ in range(many)]
            await asyncio.sleep(HELD_S)
            await holder.execute("SELECT pg_advisory_unlock_all()")
            verdicts = await asyncio.gather(*gated)  # DatabaseUnavailable here was the bug
            assert all(v.in_flight for v in verdicts if not v.allowed), verdicts
            return decisions, [v.allowed for v in verdicts], len(limiter.locks) + len(gate.locks)
        finally:
            await holder.close()
            await db.close()

    decisions, admitted, locks_left = asyncio.run(one_worker())
    assert [d for d in decisions if not d.shared] == [], "counted by the worker alone: PostgreSQL read as down"
    assert sum(d.allowed for d in decisions) == RPM
    assert sum(admitted) == 5  # spent 0 + 4 in flight × 0.01 < 0.05: the fifth is the last
    assert sql(postgres.url, "SELECT count(*) FROM budget_holds WHERE key_id = %s", (key_id,)) == [(5,)]
    assert locks_left == 0


@contextlib.asynccontextmanager
async def opened(url: str, **kwargs: Any) -> AsyncIterator[Database]:
    """A worker's Database on ``url``, closed afterwards."""
    db = Database(url, **kwargs)
    try:
        yield db
    finally:
        await db.close()


def test_a_pool_all_in_use_is_busy_not_down(postgres):
    """A request that finds every pooled connection in use gives up (DatabaseUnavailable) but
    leaves the circuit breaker closed: the next request still goes to PostgreSQL. Before, a
    restarted gateway's first burst (6 clients, connections slow to open on 2 busy cores) read as
    PostgreSQL down and refused unknown keys with 503 accounts_unavailable for a second."""
    from twllm.accounting.gateway_config import DatabaseUnavailable

    async def go() -> tuple[bool, bool, bool]:
        async with opened(postgres.url, max_size=1) as db:
            async with db.connection() as held:
                await held.execute("SELECT 1")
                with pytest.raises(DatabaseUnavailable):
                    async with db.connection():
                        pass
                busy_then, usable_then = db.busy(), db.usable
            async with db.connection() as conn:  # the breaker never opened
                await conn.execute("SELECT 1")
            return busy_then, usable_then, db.usable

    assert asyncio.run(go()) == (True, True, True)

    async def down() -> bool:
        async with opened(f"postgresql://twllm@127.0.0.1:{free_port()}/twllm", max_size=1) as db:
            with pytest.raises(DatabaseUnavailable):
                async with db.connection():
                    pass
            return db.usable

    assert asyncio.run(down()) is False  # nothing listens: down, callers skip it for a moment


def test_a_slow_query_after_answers_is_slowness_not_an_outage(postgres):
    """A request whose database work runs past its timeout fails (DatabaseUnavailable), but when
    PostgreSQL answered moments before, the breaker stays closed: the next request goes to it.
    Before, one such timeout on a just-restarted gateway (its event loop busy on 2 cores) opened
    the breaker and 13 requests of the next second got 503 ``accounts_unavailable`` (CI chaos run)."""
    from twllm.accounting.gateway_config import DatabaseUnavailable

    async def slow(db: Database) -> bool:
        with pytest.raises(DatabaseUnavailable, match="no answer in 0.3 s"):
            async with db.connection(timeout=0.3) as conn:
                await conn.execute("SELECT pg_sleep(2)")
        return db.usable

    async def go() -> tuple[bool, bool, bool]:
        async with opened(postgres.url) as db:
            async with db.connection() as conn:
                await conn.execute("SELECT 1")
            lately = db.answered_lately()
            usable_after = await slow(db)
            async with db.connection() as conn:  # the breaker never opened
                await conn.execute("SELECT 1")
            return lately, usable_after, db.usable

    assert asyncio.run(go()) == (True, True, True)

    async def never_answered() -> bool:
        async with opened(postgres.url) as db:
            return await slow(db)  # nothing answered yet: it may be hung, callers skip it a moment

    assert asyncio.run(never_answered()) is False
