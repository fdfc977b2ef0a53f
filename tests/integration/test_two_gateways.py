"""Limits hold across two gateway processes, as across the gateway replicas of a Kubernetes deployment.

Two twllm gateways (``twllm.gateway.serve``, one worker each, the spec's default) run from the
same rendered config — one config folder, one gateway.json, one ``TWLLM_DATABASE_URL`` to one
embedded PostgreSQL, one upstream engine — each with its own spool folder, as replicas each have
their own disk. One tenant key is used on both at once: half the client threads on each gateway.

The engine is ``echo_upstream`` — a stand-in, named as such, not a model — for speed: these
tests send about 150 requests, which the real vLLM CPU engine (tested in the other accounting
tests, e.g. test_gateway_fidelity.py) would take minutes to answer on a small machine. Its
answers are deterministic (5 prompt and 3 completion tokens), so every request costs exactly
``COST``. No ``mock_response``: the gateways call a real OpenAI-compatible HTTP engine.

The bounds asserted, from ``twllm/accounting/limits.py`` and ``auth.py``:

- **RPM** — one row per key and calendar minute on the database's clock, counted under its row
  lock: exactly ``rpm`` requests are admitted per window whatever the number of processes. The
  burst starts early in a minute; if it still straddled a boundary (database clock before and
  after), the documented bound ``2 × rpm`` is asserted instead.
- **Budget** — admissions of a key queue on an advisory lock in PostgreSQL, whichever process
  takes them; a request runs while the period's spend plus (requests in flight × the most
  expensive request so far) stays below the budget, and holds its place until its ledger row is
  written (``limits.BudgetGate``). Every request here costs ``COST``, so the spend ends at most
  one request's cost above the budget: ``budget ≤ spend < budget + COST``, i.e. exactly
  ``k = budget / COST`` requests answered. Both gateways refuse the key at once afterwards
  (429 insufficient_quota / budget_exceeded), with no refresh to wait for.
- **Revocation** — each process caches a key for ``KEY_CACHE_TTL_S``: both refuse a revoked key
  (401 revoked_api_key) within that TTL of the revocation (plus a request's latency).
- **Ledger** — one row per answered request of the key, refusals of a known key included (429,
  401 revoked), written by whichever gateway answered: rows' statuses == replies' statuses,
  distinct ``request_id``s. Each gateway's own /metrics (counted from the rows it queued) shows
  the requests that gateway answered, per status class.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import psycopg
import pytest
import yaml
from echo_upstream import EchoUpstream
from pgutil import Postgres, sql
from prometheus_client.parser import text_string_to_metric_families
from proxyutil import ProxyHandle, start_proxy

from twllm.accounting import store
from twllm.accounting.auth import KEY_CACHE_TTL_S
from twllm.accounting.ledger import FLUSH_INTERVAL_S
from twllm.plan.build import ENGINE_KEY_ENV, make_plan
from twllm.plan.placement import GpuInventory
from twllm.render.litellm_config import render
from twllm.spec.resolve import parse_spec

pytestmark = pytest.mark.integration

MASTER = "sk-two-gateways-master"
SPEC = """
name: replicas
gateway:
  master_key: ${TWLLM_MASTER_KEY}
  num_retries: 0
models:
  - {name: chat, model: llama-3.2-1b-instruct, price: {input_per_1m: 1000, output_per_1m: 1000}}
"""
PROMPT_TOKENS, COMPLETION_TOKENS = 5, 3
"""What echo_upstream reports for a chat completion answered "好的。"."""
COST = Decimal(1000) * (PROMPT_TOKENS + COMPLETION_TOKENS) / 10**6
"""0.008 TWD a request, at the spec's price."""
PROCESSES = 2
"""Gateway processes: two gateways of one worker each."""
CLIENTS = 10
"""Client threads of a burst, half on each gateway."""
RPM = 10
BUDGET_REQUESTS = 5
REVOCATION_MARGIN_S = 1.5
"""Beyond KEY_CACHE_TTL_S: a request's latency on a busy 2-core machine."""
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


# --- two gateways, one config -------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[EchoUpstream]:
    with EchoUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory, upstream: EchoUpstream) -> Path:
    """The config twllm renders, its deployment pointed at the echo stand-in."""
    out = tmp_path_factory.mktemp("replicas")
    loaded = parse_spec(SPEC, "replicas.yaml", {"TWLLM_MASTER_KEY": MASTER})
    render(make_plan(loaded, GpuInventory(8, 80, "test"), out / "state"), loaded.spec, out)
    path = out / "litellm_config.yaml"
    config = yaml.safe_load(path.read_text())
    assert config["general_settings"]["custom_auth"] == "twllm.accounting.hooks.user_api_key_auth"
    for deployment in config["model_list"]:
        deployment["litellm_params"].update({"model": "openai/echo", "api_base": upstream.base_url})
    config["general_settings"]["background_health_checks"] = False
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return out


@pytest.fixture(scope="module")
def gateways(config_dir: Path, postgres: Postgres) -> Iterator[list[ProxyHandle]]:
    """Two gateways from the one config folder, started side by side; both stopped at the end."""

    def start(index: int) -> ProxyHandle:
        env = {
            "TWLLM_MASTER_KEY": MASTER,
            ENGINE_KEY_ENV: "sk-engine-test",
            "TWLLM_GATEWAY_SETTINGS": str(config_dir / "gateway.json"),
            "TWLLM_DATABASE_URL": postgres.url,
            "TWLLM_SPOOL_DIR": str(config_dir / f"spool-{index}"),
        }
        return start_proxy(config_dir / "litellm_config.yaml", env=env, workers=1, timeout=300)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        starting = [pool.submit(start, i) for i in range(2)]
        concurrent.futures.wait(starting)
    handles = [f.result() for f in starting if f.exception() is None]
    try:
        for f in starting:
            if f.exception() is not None:
                raise f.exception()  # type: ignore[misc]
        assert handles[0].base_url != handles[1].base_url
        yield handles
    finally:
        for handle in handles:
            handle.stop()


# --- helpers -------------------------------------------------------------------------------------

_tenants = iter(range(1, 1000))


def make_key(url: str, **settings: object) -> tuple[int, str]:
    """A new tenant with one key, as ``twllm keys create`` makes it; (key id, secret)."""
    with psycopg.connect(url, autocommit=True) as conn:
        tenant = store.create_tenant(conn, f"replica{next(_tenants)}-{os.getpid()}").name
        record, secret = store.create_key(conn, tenant, store.KeySettings(**settings))  # type: ignore[arg-type]
    return record.id, secret


def post(client: httpx.Client, secret: str) -> httpx.Response:
    return client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"}, json=CHAT)


def send(gateway: ProxyHandle, secret: str) -> httpx.Response:
    with httpx.Client(base_url=gateway.base_url, timeout=60, trust_env=False) as client:
        return post(client, secret)


Reply = tuple[int, httpx.Response]
"""(index of the gateway that answered, its reply)."""


def burst(gateways: list[ProxyHandle], secret: str, total: int, clients: int = CLIENTS) -> list[Reply]:
    """``total`` requests from ``clients`` threads started together, thread t on gateway t % 2."""
    start = threading.Barrier(clients)

    def client(t: int) -> list[Reply]:
        gateway = t % len(gateways)
        count = total // clients + (t < total % clients)
        with httpx.Client(base_url=gateways[gateway].base_url, timeout=60, trust_env=False) as c:
            start.wait()
            return [(gateway, post(c, secret)) for _ in range(count)]

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        return [reply for part in pool.map(client, range(clients)) for reply in part]


def error(reply: httpx.Response) -> dict:
    body = reply.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["param"] is None
    return body["error"]


def ledger_rows(url: str, key_id: int) -> list[dict]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute("SELECT * FROM spend_ledger WHERE key_id = %s", (key_id,))
        names = [c.name for c in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def settled_rows(url: str, key_id: int, count: int, timeout: float = 20) -> list[dict]:
    """The key's rows once ``count`` are written, and a moment more (a duplicate would show)."""
    deadline = time.monotonic() + timeout
    while len(ledger_rows(url, key_id)) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(FLUSH_INTERVAL_S * 3)
    return ledger_rows(url, key_id)


def requests_on(gateway: ProxyHandle, key_id: int) -> Counter[str]:
    """Status class -> requests of the key in this gateway's own /metrics (one per row it queued)."""
    with httpx.Client(base_url=gateway.base_url, timeout=30, trust_env=False) as client:
        scraped = client.get("/metrics", headers={"Authorization": f"Bearer {MASTER}"})
    assert scraped.status_code == 200
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(scraped.text):
        for sample in family.samples:
            if sample.name == "twllm_requests_total" and sample.labels["key"] == str(key_id):
                counts[sample.labels["status"]] += int(sample.value)
    return counts


def check_ledger(url: str, key_id: int, gateways: list[ProxyHandle], replies: list[Reply]) -> list[dict]:
    """One row per reply (refusals included), no duplicates; each gateway counted its own."""
    rows = settled_rows(url, key_id, len(replies))
    assert len({r["request_id"] for r in rows}) == len(rows), "a request_id twice in the ledger"
    assert Counter(r["status_code"] for r in rows) == Counter(reply.status_code for _, reply in replies)
    for r in rows:
        expected = COST if r["status_code"] == 200 else Decimal(0)
        assert r["cost"] == expected, r
    for index, gateway in enumerate(gateways):
        answered = Counter(f"{reply.status_code // 100}xx" for g, reply in replies if g == index)
        assert requests_on(gateway, key_id) == answered, f"gateway {index}"
    return rows


def db_minute(url: str) -> object:
    return sql(url, "SELECT date_trunc('minute', now())")[0][0]


def early_in_a_minute(url: str, margin: float = 20) -> None:
    """Wait for the next minute (the database's clock) if fewer than ``margin`` s of this one are left."""
    second = float(sql(url, "SELECT extract(epoch FROM now()) - extract(epoch FROM date_trunc('minute', now()))")[0][0])
    if second > 60 - margin:
        time.sleep(60 - second + 0.3)


# --- the limits ------------------------------------------------------------------------------------


def test_rpm_admits_exactly_rpm_per_window_across_both_gateways(gateways, postgres):
    key_id, secret = make_key(postgres.url, rpm=RPM)
    early_in_a_minute(postgres.url)
    before = db_minute(postgres.url)
    began = time.monotonic()
    replies = burst(gateways, secret, 4 * RPM)
    took = time.monotonic() - began
    after = db_minute(postgres.url)

    statuses = Counter(reply.status_code for _, reply in replies)
    assert set(statuses) <= {200, 429}, statuses
    per_gateway = [sum(1 for g, r in replies if g == i and r.status_code == 200) for i in range(2)]
    print(f"\nRPM {RPM}: {statuses[200]} of {len(replies)} accepted in {took:.2f} s (per gateway {per_gateway})")
    if before == after:
        assert statuses[200] == RPM, (statuses, per_gateway)
    else:  # straddled a window boundary after all: the documented bound
        assert RPM <= statuses[200] <= 2 * RPM, (statuses, per_gateway)
    for _, reply in replies:
        if reply.status_code == 429:
            assert error(reply)["type"] == "requests" and error(reply)["code"] == "rate_limit_exceeded"
            assert 1 <= int(reply.headers["retry-after"]) <= 60
            assert reply.headers["x-ratelimit-limit-requests"] == str(RPM)
    check_ledger(postgres.url, key_id, gateways, replies)


def test_budget_overshoot_is_bounded_across_both_gateways(gateways, postgres):
    budget = BUDGET_REQUESTS * COST
    key_id, secret = make_key(postgres.url, budget=budget, budget_period="total")
    began = time.monotonic()
    replies = burst(gateways, secret, 50)
    took = time.monotonic() - began
    statuses = Counter(reply.status_code for _, reply in replies)
    assert set(statuses) <= {200, 429}, statuses
    for _, reply in replies:
        if reply.status_code == 429:
            assert error(reply)["type"] == "insufficient_quota" and error(reply)["code"] == "budget_exceeded"
            assert "retry-after" not in reply.headers
    rows = check_ledger(postgres.url, key_id, gateways, replies)
    spend = sum((r["cost"] for r in rows), Decimal(0))
    print(
        f"\nbudget {budget} ({BUDGET_REQUESTS} requests): {statuses[200]} of 50 accepted in {took:.2f} s, spend {spend}"
    )
    assert spend == statuses[200] * COST
    assert budget <= spend < budget + COST, (spend, statuses)  # at most one request's cost beyond
    assert statuses[200] == BUDGET_REQUESTS

    # Both refuse the key at once: the shared spend is current, nothing to wait for.
    after: list[Reply] = []
    for index, gateway in enumerate(gateways):
        for _ in range(2):
            reply = send(gateway, secret)
            after.append((index, reply))
            assert reply.status_code == 429, (index, reply.text)
            assert error(reply)["code"] == "budget_exceeded"
    check_ledger(postgres.url, key_id, gateways, replies + after)
    assert sum((r["cost"] for r in ledger_rows(postgres.url, key_id)), Decimal(0)) == spend


def test_a_revoked_key_is_refused_by_both_gateways_within_the_cache_ttl(gateways, postgres):
    key_id, secret = make_key(postgres.url)
    replies: list[Reply] = []
    for index, gateway in enumerate(gateways):  # both have the key cached, and accept it
        replies.append((index, send(gateway, secret)))
        assert replies[-1][1].status_code == 200, replies[-1][1].text
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        _, was_active = store.revoke_key(conn, str(key_id))  # what `twllm keys revoke` runs
    revoked_at = time.monotonic()
    assert was_active
    refused_after: dict[int, float] = {}
    clients = [httpx.Client(base_url=g.base_url, timeout=30, trust_env=False) for g in gateways]
    try:
        while len(refused_after) < len(gateways) and time.monotonic() - revoked_at < KEY_CACHE_TTL_S + 5:
            for index, client in enumerate(clients):
                reply = post(client, secret)
                replies.append((index, reply))
                if index in refused_after:  # once refused, never accepted again
                    assert reply.status_code == 401, (index, reply.text)
                elif reply.status_code == 401:
                    refused_after[index] = time.monotonic() - revoked_at
                else:
                    assert reply.status_code == 200, (index, reply.text)
            time.sleep(0.05)
    finally:
        for client in clients:
            client.close()
    print(f"\nrevocation refused after {refused_after} s (TTL {KEY_CACHE_TTL_S} s)")
    assert sorted(refused_after) == [0, 1], refused_after
    assert max(refused_after.values()) <= KEY_CACHE_TTL_S + REVOCATION_MARGIN_S, refused_after
    for _, reply in replies:
        if reply.status_code == 401:
            assert error(reply)["type"] == "invalid_request_error" and error(reply)["code"] == "revoked_api_key"
    check_ledger(postgres.url, key_id, gateways, replies)
