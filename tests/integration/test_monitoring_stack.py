"""`monitoring.prometheus: embedded` on a real deployment: Prometheus's counts are the ledger's.

`twllm deploy` a small CPU stack (the demo chat model on the vLLM CPU build, the embedded
PostgreSQL, the gateway) with the host's `prometheus` as one more supervised component, scraping
every second. Two tenants' keys send a known load; through Prometheus's HTTP API the per-tenant
request and token counts must equal the tenants' rows in the ledger, every target must be up
(the gateway with the master key from the credentials file), and every PromQL expression of the
rendered Grafana dashboard must evaluate.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from twllm.accounting import store
from twllm.plan.model import Plan
from twllm.render.monitoring import dashboard_expressions
from twllm.runtime.database import EmbeddedPostgres

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("prometheus") is None, reason="needs the prometheus binary (apt install prometheus)"
    ),
]

MASTER = "sk-monitoring-master-0123456789"
SENT = {"alpha": 3, "beta": 2}
SPEC = """
name: monitored
gateway: {{port: {gateway}, master_key: "${{TWLLM_MASTER_KEY}}", request_timeout_s: 60, num_retries: 0}}
database: {{port: {database}}}
engines: {{port_base: {engines}, start_timeout_s: 300}}
monitoring: {{prometheus: embedded, prometheus_port: {prometheus}, scrape_interval_s: 1}}
models:
  - name: demo-chat
    source: {{path: {models}/twllm-demo-chat}}
    device: cpu
    dtype: float32
    max_model_len: 512
    price: {{input_per_1m: 1, output_per_1m: 2}}
    engine_args: {{enforce-eager: true, kv-cache-memory-bytes: 64M}}
"""


_TAKEN: set[int] = set()
"""Ports this module handed out: the kernel may offer a free port twice, as nothing binds it yet."""


def free_block(count: int) -> int:
    """The first of ``count`` consecutive ports nothing listens on (and not handed out before)."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            base = sock.getsockname()[1]
        block = set(range(base, base + count))
        if base + count < 65000 and not block & _TAKEN and all(_bindable(p) for p in block):
            _TAKEN.update(block)
            return base
    raise RuntimeError("no free port block")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def twllm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWLLM_")}
    return subprocess.run(
        [sys.executable, "-m", "twllm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**env, "TWLLM_MASTER_KEY": MASTER, "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, vllm_cpu_env: Any, demo_models: Path) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("monitored")
    ports = {"gateway": free_block(1), "database": free_block(1), "engines": free_block(3), "prometheus": free_block(1)}
    spec = root / "monitored.yaml"
    spec.write_text(SPEC.format(models=demo_models, **ports))
    state = root / "state"
    deployed = twllm("deploy", "--config", str(spec), "--state-dir", str(state), timeout=900)
    try:
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        plan = Plan.read(state / "plan.json")
        yield {"state": state, "plan": plan, "ports": ports, "url": f"http://127.0.0.1:{ports['gateway']}"}
    finally:
        twllm("stop", "--state-dir", str(state), timeout=180)


def database_url(plan: Plan) -> str:
    assert plan.database.data_dir and plan.database.port
    return EmbeddedPostgres(Path(plan.database.data_dir), plan.database.port).url


def query(stack: dict[str, Any], expr: str) -> dict[str, Any]:
    response = httpx.get(
        f"http://127.0.0.1:{stack['ports']['prometheus']}/api/v1/query",
        params={"query": expr},
        timeout=10,
        trust_env=False,
    )
    body: dict[str, Any] = response.json()
    return body


def vector(stack: dict[str, Any], expr: str, *by: str) -> dict[tuple[str, ...], float]:
    body = query(stack, expr)
    assert body["status"] == "success", body
    return {tuple(r["metric"].get(label, "") for label in by): float(r["value"][1]) for r in body["data"]["result"]}


def wait_for(check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def test_prometheus_is_a_supervised_component_and_every_target_is_up(stack: dict[str, Any]) -> None:
    status = json.loads(twllm("status", "--state-dir", str(stack["state"]), "--json").stdout)
    components = {c["name"]: c for c in status["components"]}
    assert components["prometheus"]["kind"] == "monitoring"
    assert components["prometheus"]["status"] == "ready"
    assert components["prometheus"]["port"] == stack["ports"]["prometheus"]

    jobs = ("twllm-gateway", "vllm", "twllm-supervisor")
    up = wait_for(lambda: (v := vector(stack, "up", "job")) and all(v.get((j,)) == 1 for j in jobs) and v, 30)
    assert up and all(up[(job,)] == 1 for job in jobs), up

    names = {"database", "vllm-demo-chat-0", "gateway", "prometheus"}
    component_up = wait_for(
        lambda: (v := vector(stack, "twllm_component_up", "component", "kind")) and len(v) == 4 and v, 30
    )
    assert {c for c, _ in component_up} == names
    assert all(value == 1 for value in component_up.values()), component_up
    restarts = vector(stack, "twllm_component_restarts_total", "component")
    assert set(restarts.values()) == {0.0}

    # The rendered scrape config names the key's file, never the key; promtool accepts it.
    rendered = stack["state"] / "rendered" / "prometheus.yml"
    assert MASTER not in rendered.read_text()
    assert "credentials_file" in rendered.read_text()
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "config", str(rendered)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_per_tenant_counts_in_prometheus_are_the_ledgers(stack: dict[str, Any]) -> None:
    url = database_url(stack["plan"])
    keys: dict[str, tuple[int, str]] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        for tenant in SENT:
            store.create_tenant(conn, tenant)
            record, secret = store.create_key(conn, tenant, store.KeySettings())
            keys[tenant] = (record.id, secret)
    for tenant, count in SENT.items():
        for n in range(count):
            reply = httpx.post(
                stack["url"] + "/v1/chat/completions",
                headers={"Authorization": f"Bearer {keys[tenant][1]}"},
                json={"model": "demo-chat", "messages": [{"role": "user", "content": f"hi {n}"}], "max_tokens": 4},
                timeout=60,
                trust_env=False,
            )
            assert reply.status_code == 200, reply.text

    def ledger() -> dict[str, tuple[int, int, int]]:
        with psycopg.connect(url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT t.name, count(*), sum(l.prompt_tokens), sum(l.completion_tokens)"
                " FROM spend_ledger l JOIN tenants t ON t.id = l.tenant_id"
                " WHERE t.name = ANY(%s) GROUP BY t.name",
                (list(SENT),),
            ).fetchall()
        return {name: (int(n), int(p), int(c)) for name, n, p, c in rows}

    rows = wait_for(lambda: (r := ledger()) and sum(n for n, _, _ in r.values()) == sum(SENT.values()) and r, 30)
    assert {name: n for name, (n, _, _) in rows.items()} == SENT

    def prometheus_matches() -> bool:
        requests = vector(stack, "sum by (tenant) (twllm_requests_total)", "tenant")
        tokens = vector(stack, "sum by (tenant, direction) (twllm_tokens_total)", "tenant", "direction")
        return all(
            requests.get((t,)) == n and tokens.get((t, "input")) == p and tokens.get((t, "output")) == c
            for t, (n, p, c) in rows.items()
        )

    assert wait_for(prometheus_matches, 30), (
        rows,
        vector(stack, "sum by (tenant) (twllm_requests_total)", "tenant"),
        vector(stack, "sum by (tenant, direction) (twllm_tokens_total)", "tenant", "direction"),
    )
    generated = vector(stack, "sum(vllm:generation_tokens_total)")
    assert generated[()] >= sum(c for _, _, c in rows.values())


def test_every_dashboard_expression_evaluates(stack: dict[str, Any]) -> None:
    board = json.loads((stack["state"] / "rendered" / "twllm-dashboard.json").read_text())
    assert board["schemaVersion"] == 39
    assert board["templating"]["list"][0]["type"] == "datasource"
    expressions = dashboard_expressions(board)
    assert len(expressions) >= 10
    failures = {expr: body for expr in expressions if (body := query(stack, expr))["status"] != "success"}
    assert not failures, failures
    # The series the panels read exist (not just parse): vLLM's own and the supervisor's.
    for expr in ("vllm:kv_cache_usage_perc", "vllm:num_requests_waiting", "twllm_component_up"):
        assert query(stack, expr)["data"]["result"], expr
