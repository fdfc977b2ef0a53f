"""The accounting hooks in the real gateway: keys, limits and budgets, and a ledger that loses nothing.

One real LiteLLM proxy (uvicorn, 2 workers) runs the config twllm renders, with every deployment
answering from ``mock_response`` (no engine), against a real embedded PostgreSQL migrated by
``twllm.accounting.migrate``. Keys are made with ``twllm.accounting.store`` as the CLI makes
them. Each test uses its own tenant and keys, so ledger rows are counted per key.

The last tests stop PostgreSQL while requests flow (and the proxy itself), then count rows.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import psycopg
import pytest
import yaml
from pgutil import Postgres, sql
from proxyutil import ProxyHandle, start_proxy

from twllm.accounting import store
from twllm.accounting.auth import KEY_CACHE_TTL_S
from twllm.accounting.ledger import replay_folder
from twllm.plan.build import ENGINE_KEY_ENV, make_plan
from twllm.plan.placement import GpuInventory
from twllm.render.litellm_config import render
from twllm.spec.resolve import parse_spec

pytestmark = pytest.mark.integration

MASTER = "sk-accounting-test-master"
SPEC = """
name: acct
gateway:
  master_key: ${TWLLM_MASTER_KEY}
  num_retries: 0
models:
  - {name: chat-a, model: llama-3.2-1b-instruct, price: {input_per_1m: 5, output_per_1m: 10}}
  - {name: chat-b, model: phi-4-mini-instruct, engine: ollama}
"""
MOCK_TEXT = "你好，這是模擬的回答。"
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


# --- the gateway ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The rendered config, every deployment answering from a mock instead of an engine."""
    out = tmp_path_factory.mktemp("gateway")
    env = {"TWLLM_MASTER_KEY": MASTER}
    loaded = parse_spec(SPEC, "acct.yaml", env)
    plan = make_plan(loaded, GpuInventory(8, 80, "test"), out / "state")
    render(plan, loaded.spec, out)
    path = out / "litellm_config.yaml"
    config = yaml.safe_load(path.read_text())
    assert config["general_settings"]["custom_auth"] == "twllm.accounting.hooks.user_api_key_auth"
    # The spend ledger first; LiteLLM's Prometheus logger with it (monitoring.metrics is on by default).
    assert config["litellm_settings"]["callbacks"] == ["twllm.accounting.hooks.spend_logger", "prometheus"]
    for deployment in config["model_list"]:
        deployment["litellm_params"]["mock_response"] = MOCK_TEXT
    config["model_list"].append(
        {  # a model whose every call fails (not in the spec: no price)
            "model_name": "chat-broken",
            "litellm_params": {
                "model": "openai/broken",
                "api_key": "unused",
                "mock_response": "litellm.InternalServerError",
            },
            "model_info": {"id": "broken-0"},
        }
    )
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
    with start_proxy(gateway_dir / "litellm_config.yaml", env=env, workers=2, server="uvicorn", timeout=300) as handle:
        yield handle


@pytest.fixture
def client(gateway: ProxyHandle) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.base_url, timeout=30, trust_env=False) as c:
        yield c


_tenants = iter(range(1, 1000))


def make_key(url: str, **settings: object) -> tuple[int, str]:
    """A new tenant with one key; (key id, secret)."""
    with psycopg.connect(url, autocommit=True) as conn:
        tenant = store.create_tenant(conn, f"t{next(_tenants)}-{os.getpid()}").name
        record, secret = store.create_key(conn, tenant, store.KeySettings(**settings))  # type: ignore[arg-type]
    return record.id, secret


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def chat(client: httpx.Client, secret: str, model: str = "chat-a", **extra: object) -> httpx.Response:
    return client.post("/v1/chat/completions", headers=auth(secret), json={"model": model, **CHAT, **extra})


def ledger_rows(url: str, key_id: int) -> list[dict]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute("SELECT * FROM spend_ledger WHERE key_id = %s ORDER BY ts", (key_id,))
        names = [c.name for c in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def wait_rows(url: str, key_id: int, count: int, timeout: float = 15) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = ledger_rows(url, key_id)
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def not_near_minute_end(margin: float = 12) -> None:
    """Wait for a fresh minute if this one is about to end (rate windows are calendar minutes)."""
    second = time.time() % 60
    if second > 60 - margin:
        time.sleep(60 - second + 0.2)


def error(reply: httpx.Response) -> dict:
    body = reply.json()
    assert set(body) == {"error"}, body
    return body["error"]


# --- auth outcomes -----------------------------------------------------------------------------


def test_missing_unknown_revoked_and_expired_keys_are_401(client, postgres):
    assert error(client.post("/v1/chat/completions", json={"model": "chat-a", **CHAT}))["code"] == "missing_api_key"
    reply = chat(client, "sk-tw-" + "x" * 40)
    assert reply.status_code == 401 and error(reply)["code"] == "invalid_api_key"

    revoked_id, revoked = make_key(postgres.url)
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        store.revoke_key(conn, str(revoked_id))
    reply = chat(client, revoked)
    assert reply.status_code == 401 and error(reply)["code"] == "revoked_api_key"

    expired_id, expired = make_key(postgres.url)
    sql(postgres.url, "UPDATE api_keys SET expires_at = now() - interval '1 s' WHERE id = %s", (expired_id,))
    reply = chat(client, expired)
    assert reply.status_code == 401 and error(reply)["code"] == "expired_api_key"
    assert error(reply)["type"] == "invalid_request_error"


def test_master_key_may_do_everything(client):
    reply = chat(client, MASTER, model="chat-b")
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == MOCK_TEXT
    # LiteLLM's management routes are not served, not even to the master key
    assert client.get("/model/info", headers=auth(MASTER)).status_code == 404


def test_a_key_sees_and_uses_only_its_models(client, postgres):
    key_id, secret = make_key(postgres.url, models=("chat-a",))
    listed = client.get("/v1/models", headers=auth(secret))
    assert listed.status_code == 200 and [m["id"] for m in listed.json()["data"]] == ["chat-a"]
    assert chat(client, secret).status_code == 200
    denied = chat(client, secret, model="chat-b")
    assert denied.status_code == 403 and error(denied)["code"] == "model_not_allowed"
    sneaky = chat(client, secret, fallbacks=["chat-b"])  # client-side fallbacks count as asking
    assert sneaky.status_code == 403
    admin_route = client.get("/model/info", headers=auth(secret))
    assert admin_route.status_code == 404 and "twllm" in error(admin_route)["message"]

    _, every = make_key(postgres.url)
    listed = client.get("/v1/models", headers=auth(every))
    assert {m["id"] for m in listed.json()["data"]} == {"chat-a", "chat-b", "chat-broken"}


def test_rpm_is_shared_by_both_workers_and_answers_429_with_retry_after(client, postgres, gateway_dir):
    key_id, secret = make_key(postgres.url, rpm=5)
    not_near_minute_end()
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        replies = list(
            pool.map(
                lambda _: httpx.post(  # one connection each: spread over the workers
                    f"{client.base_url}/v1/chat/completions",
                    headers=auth(secret),
                    json={"model": "chat-a", **CHAT},
                    timeout=30,
                    trust_env=False,
                ),
                range(10),
            )
        )
    statuses = sorted(r.status_code for r in replies)
    assert statuses == [200] * 5 + [429] * 5, statuses
    limited = next(r for r in replies if r.status_code == 429)
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert limited.headers["x-ratelimit-limit-requests"] == "5"
    assert error(limited) | {"message": ""} == {
        "message": "",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    # Both workers have served by now (each locks its spool file on its first request).
    assert len(list((gateway_dir / "spool").glob("ledger-*.lock"))) == 2
    rows = wait_rows(postgres.url, key_id, 10)
    assert sorted(r["status_code"] for r in rows) == statuses


def test_tpm_counts_the_tokens_of_finished_requests(client, postgres):
    not_near_minute_end(20)
    key_id, secret = make_key(postgres.url, tpm=40)
    replies: list[httpx.Response] = []
    while len(replies) < 6 and (not replies or replies[-1].status_code == 200):
        replies.append(chat(client, secret))
        wait_rows(postgres.url, key_id, len(replies))
        time.sleep(0.3)  # a finished request's tokens join its window with the ledger batch
    tokens = replies[0].json()["usage"]["total_tokens"]
    assert 0 < tokens < 40
    statuses = [r.status_code for r in replies]
    assert statuses == [200] * -(-40 // tokens) + [429], statuses  # ceil(40 / tokens) fit in the window
    assert error(replies[-1])["type"] == "tokens" and "retry-after" in replies[-1].headers


def test_a_spent_budget_answers_429_insufficient_quota(client, postgres):
    key_id, secret = make_key(postgres.url, budget=Decimal("0.0001"), budget_period="daily")
    assert chat(client, secret).status_code == 200
    [row] = wait_rows(postgres.url, key_id, 1)
    assert row["cost"] > Decimal("0.0001") and row["currency"] == "TWD"
    for _ in range(4):  # whichever worker answers
        reply = chat(client, secret)
        assert reply.status_code == 429, reply.text
        assert error(reply)["type"] == "insufficient_quota" and error(reply)["code"] == "budget_exceeded"
        assert "retry-after" not in reply.headers


def test_revocation_takes_effect_within_the_cache_ttl(client, postgres):
    key_id, secret = make_key(postgres.url)
    for _ in range(4):  # both workers cache the key
        assert chat(client, secret).status_code == 200
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        store.revoke_key(conn, str(key_id))
    revoked_at = time.monotonic()
    seen: list[tuple[float, int]] = []
    while time.monotonic() - revoked_at < KEY_CACHE_TTL_S + 1.5:
        seen.append((time.monotonic() - revoked_at, chat(client, secret).status_code))
        time.sleep(0.1)
    late = [status for after, status in seen if after > KEY_CACHE_TTL_S + 0.2]
    assert late and set(late) == {401}, seen  # every worker, once its cached copy is TTL old
    assert {status for _, status in seen} <= {200, 401}


# --- the ledger ----------------------------------------------------------------------------------


def test_one_row_per_answered_request_streams_and_failures_included(client, postgres):
    key_id, secret = make_key(postgres.url)
    answered = [chat(client, secret) for _ in range(3)]
    answered.append(client.post("/v1/chat/completions", headers=auth(secret), json={"model": "no-such-model", **CHAT}))
    answered.append(chat(client, secret, model="chat-broken"))
    streamed = 0
    for _ in range(2):
        with client.stream(
            "POST", "/v1/chat/completions", headers=auth(secret), json={"model": "chat-a", "stream": True, **CHAT}
        ) as reply:
            assert reply.status_code == 200
            assert "[DONE]" in reply.read().decode()
            streamed += 1
    statuses = sorted([r.status_code for r in answered] + [200] * streamed)
    # an unknown model is 404 model_not_found; a model whose engine fails, 5xx
    assert statuses.count(200) == 5 and 404 in statuses and max(statuses) >= 500

    rows = wait_rows(postgres.url, key_id, len(statuses))
    time.sleep(0.5)
    rows = ledger_rows(postgres.url, key_id)
    assert sorted(r["status_code"] for r in rows) == statuses
    assert len({r["request_id"] for r in rows}) == len(rows)
    tenant_id = sql(postgres.url, "SELECT tenant_id FROM api_keys WHERE id = %s", (key_id,))[0][0]
    ok = [r for r in rows if r["status_code"] == 200]
    for r in ok:
        assert r["tenant_id"] == tenant_id and r["model"] == "chat-a" and r["deployment"]
        assert r["prompt_tokens"] > 0 and r["completion_tokens"] > 0 and r["latency_ms"] is not None
        # Our price: 5 and 10 TWD per million tokens.
        assert r["cost"] == (Decimal(5) * r["prompt_tokens"] + Decimal(10) * r["completion_tokens"]) / 10**6
    streams = [r for r in ok if r["stream"]]
    assert len(streams) == 2 and all(r["ttft_ms"] is not None for r in streams)
    assert all(r["ttft_ms"] is None for r in ok if not r["stream"])
    failed = {r["status_code"]: r for r in rows if r["status_code"] != 200}
    assert failed[max(failed)]["error_class"] and failed[max(failed)]["cost"] == 0


def test_refusals_of_a_known_key_are_in_the_ledger_unknown_keys_are_not(client, postgres):
    key_id, secret = make_key(postgres.url, models=("chat-a",))
    assert chat(client, secret, model="chat-b").status_code == 403
    assert chat(client, "sk-tw-" + "y" * 40).status_code == 401
    [row] = wait_rows(postgres.url, key_id, 1)
    assert row["status_code"] == 403 and row["model"] == "chat-b"


def test_master_key_requests_are_rows_without_a_tenant(client, postgres):
    before = sql(postgres.url, "SELECT count(*) FROM spend_ledger WHERE key_id IS NULL")[0][0]
    assert chat(client, MASTER).status_code == 200
    deadline = time.monotonic() + 10
    while sql(postgres.url, "SELECT count(*) FROM spend_ledger WHERE key_id IS NULL")[0][0] == before:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    row = sql(postgres.url, "SELECT tenant_id, model FROM spend_ledger WHERE key_id IS NULL ORDER BY ts DESC LIMIT 1")
    assert row == [(None, "chat-a")]


def test_no_row_is_lost_while_postgres_is_down(client, postgres, gateway_dir, gateway):
    key_id, secret = make_key(postgres.url)
    # Every worker reads the key before the database goes away (cached keys keep working).
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        warm = list(
            pool.map(
                lambda _: httpx.post(
                    f"{client.base_url}/v1/chat/completions",
                    headers=auth(secret),
                    json={"model": "chat-a", **CHAT},
                    timeout=30,
                    trust_env=False,
                ),
                range(16),
            )
        )
    statuses: list[int | str] = [r.status_code for r in warm]

    def send_for(seconds: float) -> list[int | str]:
        got: list[int | str] = []
        end = time.monotonic() + seconds
        with httpx.Client(base_url=client.base_url, timeout=30, trust_env=False) as c:
            while time.monotonic() < end:
                try:
                    got.append(chat(c, secret, stream=len(got) % 3 == 0).status_code)
                except httpx.TransportError as exc:  # a dropped connection fails the test, with the log
                    got.append(f"{type(exc).__name__}: {exc}")
        return got

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        flows = [pool.submit(send_for, 7.0) for _ in range(3)]
        time.sleep(1.5)
        postgres.stop()  # SIGINT to the process group: a fast shutdown, sessions cut
        down_at = time.monotonic()
        time.sleep(3.0)
        spooled = [p for p in (gateway_dir / "spool").glob("ledger-*.jsonl") if p.stat().st_size]
        postgres.start()  # same data folder, same port
        outage = time.monotonic() - down_at
        for flow in flows:
            statuses += flow.result()
    assert spooled, "nothing was spooled while PostgreSQL was down"
    assert outage > 2.5
    assert set(statuses) == {200}, (sorted(set(map(str, statuses))), gateway.log_tail(80))
    rows = wait_rows(postgres.url, key_id, len(statuses), timeout=30)
    assert len(rows) == len(statuses)
    deadline = time.monotonic() + 10
    while any(p.stat().st_size for p in (gateway_dir / "spool").glob("ledger-*.jsonl")):
        assert time.monotonic() < deadline, "the spool was not emptied after the replay"
        time.sleep(0.2)


def test_a_running_worker_adopts_rows_a_dead_process_left(client, postgres, gateway_dir):
    key_id, secret = make_key(postgres.url)
    assert chat(client, secret).status_code == 200
    [row] = wait_rows(postgres.url, key_id, 1)
    dead_pid = 4_000_000  # above any pid_max: no process holds its lock
    copies = [
        dict(row, ts=row["ts"].isoformat(), cost=str(row["cost"]), request_id=f"left-behind-{i}") for i in range(5)
    ]
    segment = gateway_dir / "spool" / f"ledger-{dead_pid}-1.jsonl"
    segment.write_text("".join(json.dumps(c) + "\n" for c in copies) + '{"torn": ')  # a crash mid-line
    assert len(wait_rows(postgres.url, key_id, 6)) == 6
    deadline = time.monotonic() + 5
    while segment.exists() or (gateway_dir / "spool" / f"ledger-{dead_pid}.lock").exists():
        assert time.monotonic() < deadline
        time.sleep(0.1)


# Our hooks with a ledger writer that never flushes by itself: rows stay in the journal.
HOLDING_HOOKS = """
from twllm.accounting import ledger
from twllm.accounting.hooks import spend_logger, user_api_key_auth  # noqa: F401

ledger.FLUSH_INTERVAL_S = 3600.0
"""


def test_rows_a_stopped_gateway_still_held_are_journaled_and_replayed(gateway_dir, postgres, tmp_path):
    config = yaml.safe_load((gateway_dir / "litellm_config.yaml").read_text())
    config["general_settings"]["custom_auth"] = "holding_hooks.user_api_key_auth"
    config["litellm_settings"]["callbacks"] = ["holding_hooks.spend_logger"]
    (tmp_path / "litellm_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    (tmp_path / "holding_hooks.py").write_text(HOLDING_HOOKS)
    spool = tmp_path / "spool"
    env = {
        "TWLLM_MASTER_KEY": MASTER,
        ENGINE_KEY_ENV: "sk-engine-test",
        "TWLLM_DATABASE_URL": postgres.url,
        "TWLLM_GATEWAY_SETTINGS": str(gateway_dir / "gateway.json"),
        "TWLLM_SPOOL_DIR": str(spool),
        "PYTHONPATH": str(tmp_path),
    }
    key_id, secret = make_key(postgres.url)
    with start_proxy(tmp_path / "litellm_config.yaml", env=env, workers=2, server="uvicorn", timeout=300) as proxy:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            statuses = list(
                pool.map(
                    lambda _: (
                        httpx.post(
                            f"{proxy.base_url}/v1/chat/completions",
                            headers=auth(secret),
                            json={"model": "chat-a", **CHAT},
                            timeout=30,
                            trust_env=False,
                        ).status_code
                    ),
                    range(20),
                )
            )
        assert statuses == [200] * 20
        time.sleep(1)
        assert ledger_rows(postgres.url, key_id) == []  # not written yet, as the hooks above want
    # SIGTERM: gunicorn's workers are killed by the signal after their graceful shutdown.
    journaled = sum(len(p.read_text().splitlines()) for p in spool.glob("ledger-*.jsonl"))
    assert journaled == 20
    assert replay_folder(postgres.url, spool) == 20  # what the supervisor runs after the gateway stops
    assert len(ledger_rows(postgres.url, key_id)) == 20
    assert sorted(p.name for p in spool.iterdir()) == []
