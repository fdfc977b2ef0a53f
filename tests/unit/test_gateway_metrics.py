"""The gateway's /metrics: twllm's series from a ledger row, their label rules, and where they are served.

In-process (no multiprocess folder): values are read from prometheus_client's default registry,
before and after, since the series are process-wide.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from twllm.accounting.gateway_config import Database
from twllm.accounting.ledger import LedgerRow, LedgerWriter
from twllm.accounting.spool import Spool
from twllm.gateway import metrics, scrape
from twllm.gateway.asgi import HttpSettings, Shield
from twllm.gateway.settings import MetricsSettings
from twllm.guard.gateway import METRIC_CATEGORIES
from twllm.runtime.ports import free_port

KNOWN = {"chat-a", "embed"}


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def row(**changes: object) -> LedgerRow:
    base: dict[str, object] = {
        "ts": datetime(2026, 1, 1, tzinfo=UTC),
        "request_id": "call-1",
        "tenant_id": 3,
        "key_id": 7,
        "model": "chat-a",
        "deployment": "chat-a-0",
        "prompt_tokens": 11,
        "completion_tokens": 5,
        "cost": Decimal("0.000105"),
        "currency": "TWD",
        "latency_ms": 1500,
        "ttft_ms": 120,
        "status_code": 200,
        "error_class": None,
        "stream": True,
    }
    base.update(changes)
    return LedgerRow(**base)  # type: ignore[arg-type]


# --- series from a ledger row -----------------------------------------------------------------


def test_a_ledger_row_counts_a_request_its_tokens_spend_and_latencies() -> None:
    labels = {"tenant": "acme", "key": "7", "model": "chat-a"}
    before = {
        "req": value("twllm_requests_total", **labels, status="2xx"),
        "in": value("twllm_tokens_total", **labels, direction="input"),
        "out": value("twllm_tokens_total", **labels, direction="output"),
        "spend": value("twllm_spend_total", **labels, currency="TWD"),
        "dur": value("twllm_request_duration_seconds_count", model="chat-a"),
        "dur_sum": value("twllm_request_duration_seconds_sum", model="chat-a"),
        "ttft": value("twllm_time_to_first_token_seconds_count", model="chat-a"),
    }
    metrics.observe_row(row(), "acme", KNOWN)
    assert value("twllm_requests_total", **labels, status="2xx") == before["req"] + 1
    assert value("twllm_tokens_total", **labels, direction="input") == before["in"] + 11
    assert value("twllm_tokens_total", **labels, direction="output") == before["out"] + 5
    assert value("twllm_spend_total", **labels, currency="TWD") == pytest.approx(before["spend"] + 0.000105)
    assert value("twllm_request_duration_seconds_count", model="chat-a") == before["dur"] + 1
    assert value("twllm_request_duration_seconds_sum", model="chat-a") == pytest.approx(before["dur_sum"] + 1.5)
    assert value("twllm_time_to_first_token_seconds_count", model="chat-a") == before["ttft"] + 1


def test_master_key_failures_and_unknown_models_keep_labels_bounded() -> None:
    failed = row(key_id=None, tenant_id=None, model="gpt-made-up", status_code=503, ttft_ms=None, latency_ms=None)
    labels = {"tenant": "", "key": "master", "model": "other", "status": "5xx"}
    before = value("twllm_requests_total", **labels)
    ttft_before = value("twllm_time_to_first_token_seconds_count", model="other")
    metrics.observe_row(failed, "", KNOWN)
    assert value("twllm_requests_total", **labels) == before + 1
    assert value("twllm_time_to_first_token_seconds_count", model="other") == ttft_before  # no TTFT: not counted
    assert REGISTRY.get_sample_value("twllm_requests_total", {**labels, "model": "gpt-made-up"}) is None


def test_label_rules() -> None:
    assert metrics.model_label("chat-a", KNOWN) == "chat-a"
    assert metrics.model_label("chat-a ", KNOWN) == metrics.model_label("sk-secret", KNOWN) == "other"
    assert metrics.key_label(None) == "master" and metrics.key_label(42) == "42"
    assert [metrics.status_label(s) for s in (200, 201, 400, 429, 500, 503, 0, 999)] == [
        "2xx",
        "2xx",
        "4xx",
        "4xx",
        "5xx",
        "5xx",
        "5xx",
        "5xx",
    ]


def test_known_models_come_from_gateway_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from twllm.gateway.settings import GatewaySettings, ModelSettings
    from twllm.settings import GATEWAY_SETTINGS_ENV

    path = tmp_path / "gateway.json"
    path.write_text(GatewaySettings(models={"m1": ModelSettings()}).to_json())
    monkeypatch.setenv(GATEWAY_SETTINGS_ENV, str(path))
    monkeypatch.setattr(metrics, "_known_models", None)
    assert metrics.model_label("m1") == "m1" and metrics.model_label("m2") == "other"


def test_guard_verdicts_count_categories_never_text() -> None:
    before = value("twllm_guard_verdicts_total", stage="input", category="S1", action="block")
    allow = value("twllm_guard_verdicts_total", stage="output", category="", action="allow")
    metrics.observe_guard("input", ["S1"], "block")
    metrics.observe_guard("output", [], "allow")
    assert value("twllm_guard_verdicts_total", stage="input", category="S1", action="block") == before + 1
    assert value("twllm_guard_verdicts_total", stage="output", category="", action="allow") == allow + 1
    assert {"S1", "S14", "prompt_injection", "tw_national_id", "email"} <= METRIC_CATEGORIES
    assert "S15" not in METRIC_CATEGORIES


def test_the_guard_notes_its_verdicts_as_metrics() -> None:
    from twllm.guard.gateway import GuardState
    from twllm.guard.pipeline import GuardResult
    from twllm.guard.policy import GuardPolicies

    state = GuardState(GuardPolicies.from_settings(None))
    labels = {"stage": "input", "action": "mask"}
    before = value("twllm_guard_verdicts_total", **labels, category="email")
    other = value("twllm_guard_verdicts_total", **labels, category="other")
    state.note("call-x", "input", GuardResult("mask", ["email", "賴清德的電話"], "masked text"))
    assert value("twllm_guard_verdicts_total", **labels, category="email") == before + 1
    assert value("twllm_guard_verdicts_total", **labels, category="other") == other + 1


def test_key_cache_lookups_count_hits_and_misses() -> None:
    from twllm.accounting.auth import KeyCache

    cache = KeyCache(Database(None))
    hits, misses = (
        value("twllm_key_cache_lookups_total", result="hit"),
        value("twllm_key_cache_lookups_total", result="miss"),
    )

    from twllm.accounting import auth

    async def lookups() -> None:
        async def fake(key_hash: bytes) -> None:
            cache._entries[key_hash] = auth._Entry(None, time.monotonic())
            return None

        cache._read = fake  # type: ignore[method-assign]
        await cache.get(b"k")  # miss: read
        await cache.get(b"k")  # hit

    asyncio.run(lookups())
    assert value("twllm_key_cache_lookups_total", result="miss") == misses + 1
    assert value("twllm_key_cache_lookups_total", result="hit") == hits + 1


# --- the ledger's backlog -----------------------------------------------------------------------


def test_rows_not_yet_in_postgresql_and_their_age(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    writer = LedgerWriter(Database(None), spool)
    assert writer.unwritten() == (0, 0.0)
    writer.enqueue(row(request_id="a"))
    writer.enqueue(row(request_id="b"))
    rows, lag = writer.unwritten()
    assert rows == 2 and lag >= 0
    asyncio.run(writer.flush())  # no database: the rows are left to the replay, still unwritten
    rows, lag_later = writer.unwritten()
    assert rows == 2 and lag_later >= lag
    metrics.set_ledger_backlog(rows, lag_later)
    assert value("twllm_spool_rows") == 2
    metrics.set_ledger_backlog(0, 12.0)
    assert value("twllm_spool_rows") == 0 and value("twllm_ledger_write_lag_seconds") == 0
    spool.close()


# --- where /metrics is served -------------------------------------------------------------------


class Proxy:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        self.calls += 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"litellm's own"})


def run(app, method: str, path: str, **kwargs) -> httpx.Response:  # type: ignore[no-untyped-def]
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_the_shield_serves_metrics_for_the_master_key_only() -> None:
    proxy = Proxy()
    shield = Shield(proxy, HttpSettings(), scrape.route(MetricsSettings(enabled=True), "sk-master"))
    metrics.observe_key_lookup(hit=True)
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "sk-master"}):
        refused = run(shield, "GET", "/metrics", headers=headers)
        assert refused.status_code == 401
        assert (
            refused.json()["error"]["code"] == "invalid_api_key" and "master key" in refused.json()["error"]["message"]
        )
    served = run(shield, "GET", "/metrics", headers={"Authorization": "Bearer sk-master"})
    assert served.status_code == 200 and served.headers["content-type"].startswith("text/plain")
    names = {family.name for family in text_string_to_metric_families(served.text)}
    assert {"twllm_key_cache_lookups", "twllm_spool_rows"} <= names
    assert run(shield, "POST", "/metrics", headers={"Authorization": "Bearer sk-master"}).status_code == 405
    assert proxy.calls == 0  # LiteLLM's unauthenticated /metrics is never reached


@pytest.mark.parametrize("settings", [MetricsSettings(enabled=False), MetricsSettings(enabled=True, port=9464)])
def test_metrics_not_on_the_gateway_port_is_a_plain_404(settings: MetricsSettings) -> None:
    proxy = Proxy()
    shield = Shield(proxy, HttpSettings(), scrape.route(settings, "sk-master"))
    response = run(shield, "GET", "/metrics", headers={"Authorization": "Bearer sk-master"})
    assert response.status_code == 404 and json.loads(response.text)["error"]["code"] == "not_found"
    assert proxy.calls == 0


def test_an_empty_master_key_opens_nothing() -> None:
    assert not scrape.authorized("Bearer ", "")
    assert not scrape.authorized(None, "k")
    assert scrape.authorized("bearer k", "k")


def test_the_separate_listener_serves_metrics_only_without_a_key() -> None:
    port = free_port("127.0.0.1")
    server = scrape.start_listener("127.0.0.1", port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=5) as client:
            served = client.get("/metrics")
            assert served.status_code == 200
            assert "twllm_spool_rows" in {f.name for f in text_string_to_metric_families(served.text)}
            for path in ("/", "/v1/models", "/metrics/x", "/health/liveliness"):
                assert client.get(path).status_code == 404
    finally:
        server.shutdown()
        server.server_close()


def test_the_multiprocess_folder_is_emptied_and_private(tmp_path: Path) -> None:
    folder = tmp_path / "gateway-metrics"
    folder.mkdir()
    (folder / "counter_123.db").write_bytes(b"old")
    scrape.prepare_folder(folder)
    assert list(folder.iterdir()) == [] and folder.stat().st_mode & 0o777 == 0o700


def test_the_runtime_gives_the_gateway_its_metrics_folder(tmp_path: Path) -> None:
    from twllm.plan.build import ENGINE_KEY_ENV, make_plan
    from twllm.plan.placement import GpuInventory
    from twllm.runtime.gateway import gateway_launch
    from twllm.settings import PROMETHEUS_MULTIPROC_DIR_ENV
    from twllm.spec.resolve import parse_spec

    spec = "name: m\ngateway: {master_key: '${TWLLM_MASTER_KEY}'}\nmodels: [{name: c, model: llama-3.2-1b-instruct}]\n"
    loaded = parse_spec(spec, str(tmp_path / "s.yaml"), {"TWLLM_MASTER_KEY": "sk-m"})
    plan = make_plan(loaded, GpuInventory(8, 80, "test"), tmp_path / "state")
    secrets = {"TWLLM_MASTER_KEY": "sk-m", ENGINE_KEY_ENV: "sk-e"}
    launch = gateway_launch(plan.gateway, tmp_path, secrets, metrics_dir=tmp_path / "state" / "gateway-metrics")
    assert launch.env[PROMETHEUS_MULTIPROC_DIR_ENV] == str(tmp_path / "state" / "gateway-metrics")


def test_a_dead_workers_backlog_is_forgotten_its_counters_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two workers in one multiprocess folder: one exits (as a killed worker would) after setting
    its spool backlog, the other stays. The scrape adds up only the live worker's backlog, and
    the dead worker's counted requests stay in the counter."""
    import subprocess
    import sys

    folder = tmp_path / "prom"
    folder.mkdir()
    writer = (
        "import sys, time\n"
        "from twllm.gateway import metrics\n"
        "metrics.SPOOL_ROWS.set(int(sys.argv[1]))\n"
        "metrics.REQUESTS.labels(tenant='t', key='1', model='chat-a', status='200').inc()\n"
        "print('set', flush=True)\n"
        "time.sleep(float(sys.argv[2]))\n"
    )
    env = {"PROMETHEUS_MULTIPROC_DIR": str(folder), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", writer, "7", "0"], env=env, check=True, timeout=60)
    live = subprocess.Popen([sys.executable, "-c", writer, "3", "60"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout is not None and live.stdout.readline().strip() == "set"
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
        families = {f.name: f for f in text_string_to_metric_families(scrape.latest().decode())}
        assert [s.value for s in families["twllm_spool_rows"].samples] == [3.0]
        requests = [s for s in families["twllm_requests"].samples if s.name == "twllm_requests_total"]
        assert sum(s.value for s in requests) == 2.0
    finally:
        live.kill()
        live.wait()
