"""/metrics on the real gateway: one scrape adds up every worker, and its counts are the ledger's.

The gateway twllm runs (``twllm.gateway.serve``: the shield, uvicorn, 2 workers) from the config
twllm renders, every deployment answering from ``mock_response``, against a real embedded
PostgreSQL. Two tenants send a known number of requests over fresh connections (so both workers
serve); the scrape's per-tenant request and token counts must equal the tenants' ledger rows.
A second gateway (1 worker) puts /metrics on a port of its own, served without a key.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
import yaml
from pgutil import Postgres
from prometheus_client.parser import text_string_to_metric_families
from proxyutil import ProxyHandle, start_proxy

from twllm.accounting import store
from twllm.plan.build import ENGINE_KEY_ENV, make_plan
from twllm.plan.placement import GpuInventory
from twllm.render.litellm_config import render
from twllm.runtime.ports import free_port
from twllm.spec.resolve import parse_spec

pytestmark = pytest.mark.integration

MASTER = "sk-metrics-test-master"
SPEC = """
name: metered
gateway:
  master_key: ${{TWLLM_MASTER_KEY}}
  num_retries: 0
{monitoring}
models:
  - {{name: chat-a, model: llama-3.2-1b-instruct, price: {{input_per_1m: 5, output_per_1m: 10}}}}
"""
SENT = {"alpha": 9, "beta": 5}
"""Requests per tenant."""


def rendered(out: Path, monitoring: str = "") -> Path:
    env = {"TWLLM_MASTER_KEY": MASTER}
    loaded = parse_spec(SPEC.format(monitoring=monitoring), "metered.yaml", env)
    render(make_plan(loaded, GpuInventory(8, 80, "test"), out / "state"), loaded.spec, out)
    path = out / "litellm_config.yaml"
    config = yaml.safe_load(path.read_text())
    assert config["litellm_settings"]["callbacks"] == ["twllm.accounting.hooks.spend_logger", "prometheus"]
    for deployment in config["model_list"]:
        deployment["litellm_params"]["mock_response"] = "模擬的回答。"
    config["general_settings"]["background_health_checks"] = False  # no engines to check
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return path


def gateway_env(out: Path, postgres: Postgres, folder: Path) -> dict[str, str]:
    return {
        "TWLLM_MASTER_KEY": MASTER,
        ENGINE_KEY_ENV: "sk-engine-test",
        "TWLLM_GATEWAY_SETTINGS": str(out / "gateway.json"),
        "TWLLM_DATABASE_URL": postgres.url,
        "PROMETHEUS_MULTIPROC_DIR": str(folder),
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prom")
    (path / "counter_1.db").write_bytes(b"a file of an earlier gateway: emptied at start")
    return path


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, postgres: Postgres, folder: Path) -> Iterator[ProxyHandle]:
    out = tmp_path_factory.mktemp("gateway")
    config = rendered(out)
    with start_proxy(config, env=gateway_env(out, postgres, folder), workers=2, timeout=300) as handle:
        yield handle


def make_key(url: str, tenant: str) -> tuple[int, str]:
    with psycopg.connect(url, autocommit=True) as conn:
        name = store.create_tenant(conn, f"{tenant}-{os.getpid()}").name
        record, secret = store.create_key(conn, name, store.KeySettings())
    return record.id, secret


def send(base_url: str, secret: str) -> int:
    # A fresh connection per request: the kernel spreads them over both workers' accept queue.
    with httpx.Client(base_url=base_url, timeout=60, trust_env=False) as client:
        body = {"model": "chat-a", "messages": [{"role": "user", "content": "hi"}]}
        return client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"}, json=body).status_code


def ledger(url: str, key_ids: list[int]) -> dict[int, tuple[int, int, int]]:
    """key id -> (rows, prompt tokens, completion tokens)."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT key_id, count(*), sum(prompt_tokens), sum(completion_tokens) FROM spend_ledger"
            " WHERE key_id = ANY(%s) GROUP BY key_id",
            (key_ids,),
        ).fetchall()
    return {key: (int(n), int(p), int(c)) for key, n, p, c in rows}


def scrape(base_url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    with httpx.Client(base_url=base_url, timeout=30, trust_env=False) as client:
        return client.get("/metrics", headers=headers or {})


def per_tenant(text: str) -> dict[str, dict[str, float]]:
    """tenant -> requests, input and output tokens, from twllm's series in one scrape."""
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "twllm_requests_total":
                totals[sample.labels["tenant"]]["requests"] += sample.value
            elif sample.name == "twllm_tokens_total":
                totals[sample.labels["tenant"]][sample.labels["direction"]] += sample.value
    return totals


def test_one_scrape_counts_every_workers_requests_as_the_ledger_does(
    gateway: ProxyHandle, postgres: Postgres, folder: Path
) -> None:
    keys = {tenant: make_key(postgres.url, tenant) for tenant in SENT}
    jobs = [(tenant, keys[tenant][1]) for tenant, count in SENT.items() for _ in range(count)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda job: send(gateway.base_url, job[1]), jobs))
    assert statuses == [200] * len(jobs)

    ids = [key_id for key_id, _ in keys.values()]
    deadline = time.monotonic() + 20
    while sum(n for n, _, _ in ledger(postgres.url, ids).values()) < len(jobs) and time.monotonic() < deadline:
        time.sleep(0.2)
    rows = ledger(postgres.url, ids)

    assert scrape(gateway.base_url).status_code == 401
    refused = scrape(gateway.base_url, {"Authorization": "Bearer sk-not-the-master"})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"

    # Several scrapes over fresh connections land on either worker; each must show all of them.
    seen = []
    for _ in range(6):
        response = scrape(gateway.base_url, {"Authorization": f"Bearer {MASTER}"})
        assert response.status_code == 200
        seen.append(response.text)
    pids = {p.name.rsplit("_", 1)[-1] for p in folder.glob("counter_*.db")}
    assert len(pids) >= 2, f"series of one worker only: {sorted(folder.iterdir())}"
    assert not (folder / "counter_1.db").exists()
    for text in seen:
        totals = per_tenant(text)
        for tenant, (key_id, _) in keys.items():
            name = f"{tenant}-{os.getpid()}"
            n, prompt, completion = rows[key_id]
            assert n == SENT[tenant]
            assert totals[name]["requests"] == n
            assert totals[name]["input"] == prompt and totals[name]["output"] == completion
        families = {f.name for f in text_string_to_metric_families(text)}
        assert {"twllm_request_duration_seconds", "twllm_key_cache_lookups", "twllm_spool_rows"} <= families
        assert any(name.startswith("litellm_") for name in families), "LiteLLM's Prometheus series are missing"
        # Bounded labels: no key, hash or alias of one anywhere in the scrape.
        for _, secret in keys.values():
            assert secret not in text and secret[:12] not in text
        assert "hashed_api_key" not in text and "api_key_alias" not in text


def test_a_metrics_port_serves_metrics_alone_without_a_key(
    tmp_path_factory: pytest.TempPathFactory, postgres: Postgres
) -> None:
    out = tmp_path_factory.mktemp("separate")
    port = free_port("127.0.0.1")
    config = rendered(out, f"monitoring: {{metrics: {{port: {port}}}}}")
    folder = out / "prom"
    with start_proxy(config, env=gateway_env(out, postgres, folder), workers=1, timeout=300) as handle:
        _, secret = make_key(postgres.url, "gamma")
        assert send(handle.base_url, secret) == 200
        listener = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while True:
            served = scrape(listener)
            if "gamma" in served.text or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert served.status_code == 200
        assert per_tenant(served.text)[f"gamma-{os.getpid()}"]["requests"] == 1
        with httpx.Client(base_url=listener, timeout=10, trust_env=False) as client:
            for path in ("/", "/v1/models", "/health/liveliness"):
                assert client.get(path).status_code == 404
            assert client.post("/v1/chat/completions", json={}).status_code in (404, 501)
        # ... and the gateway's own port no longer serves it, not even for the master key.
        assert scrape(handle.base_url, {"Authorization": f"Bearer {MASTER}"}).status_code == 404
