"""A short, bounded `twllm bench` run against the real local stack: zero errors, one ledger row per request.

The stack is deployed by the runtime `twllm deploy` uses (``twllm.runtime.control.deploy``): an
embedded PostgreSQL, one vLLM CPU engine serving the demo chat model, the LiteLLM gateway with
twllm's hooks. A tenant key is made with ``twllm.accounting.store`` as `twllm keys create` makes
it; `twllm bench` loads the gateway with it for 10 s over loopback.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from twllm.accounting import store
from twllm.plan.build import make_plan
from twllm.plan.placement import GpuInventory
from twllm.runtime.control import deploy, stop
from twllm.runtime.database_url import database_url
from twllm.runtime.state import StateDir
from twllm.spec.resolve import parse_spec

pytestmark = pytest.mark.integration

MASTER = "sk-locust-smoke-master-0123456789"
LOAD_S = 10
SPEC = """
name: locust-smoke
gateway: {{port: {gateway}, master_key: "${{TWLLM_MASTER_KEY}}", request_timeout_s: 60, num_retries: 0}}
database: {{port: {database}}}
engines: {{port_base: {engine}, start_timeout_s: 300}}
models:
  - name: demo-chat
    source: {{path: {model}}}
    device: cpu
    dtype: float32
    max_model_len: 512
    price: {{input_per_1m: 1, output_per_1m: 2}}
    engine_args: {{enforce-eager: true, kv-cache-memory-bytes: 64M}}
"""


def fixed_port() -> int:
    """A free port below Linux's ephemeral range (32768+): the engine and the proxies open many
    outgoing connections while the stack starts, and one of them could take an ephemeral port
    picked here before its server binds it."""
    for _ in range(500):
        port = random.randint(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port in 20000-32000")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_chat_model: Path):
    root = tmp_path_factory.mktemp("locust-smoke")
    env = {**os.environ, "TWLLM_MASTER_KEY": MASTER}
    text = SPEC.format(gateway=fixed_port(), database=fixed_port(), engine=fixed_port(), model=tiny_chat_model)
    loaded = parse_spec(text, str(root / "smoke.yaml"), env)
    sd = StateDir(root / "state")
    plan = make_plan(loaded, GpuInventory(0), sd.root)
    started = time.monotonic()
    deploy(loaded, plan, sd, watch=lambda _state: None, env=env)
    print(f"\nstack deployed in {time.monotonic() - started:.0f} s")
    try:
        url = database_url(sd)
        with psycopg.connect(url, autocommit=True) as conn:
            store.create_tenant(conn, "smoke")
            key, secret = store.create_key(conn, "smoke")
        yield {"endpoint": plan.gateway.url, "db": url, "key_id": key.id, "secret": secret, "root": root}
    finally:
        stop(sd)


def ledger_rows(url: str, key_id: int) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM spend_ledger WHERE key_id = %s", (key_id,)).fetchone()[0]


def test_bench_run_has_no_errors_and_one_ledger_row_per_request(stack):
    out = stack["root"] / "bench"
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "twllm",
            "bench",
            "--endpoint",
            stack["endpoint"],
            "--model",
            "demo-chat",
            "--users",
            "2",
            "--duration",
            f"{LOAD_S}s",
            "--max-tokens",
            "8",
            "--out",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=LOAD_S + 120,
        env={**os.environ, "TWLLM_BENCH_API_KEY": stack["secret"]},
    )
    print(f"\nbench took {time.monotonic() - started:.1f} s")
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(result.stdout)
    (chat,) = document["models"]
    assert chat["model"] == "demo-chat" and chat["kind"] == "chat"
    assert chat["requests"] > 0 and chat["errors"] == 0, chat["error_examples"]
    assert chat["output_tokens"] > 0
    for metric in ("e2el", "ttft", "itl", "tpot"):
        assert all(chat["latency_ms"][metric][p] > 0 for p in ("p50", "p90", "p99")), metric
    locust = document["locust_counts"]["POST chat demo-chat"]
    assert locust == {"requests": chat["requests"], "failures": 0}
    assert document["locust_counts"]["TTFT demo-chat"]["requests"] == chat["requests"]

    deadline = time.monotonic() + 5  # the ledger writer inserts every 200 ms
    while (rows := ledger_rows(stack["db"], stack["key_id"])) < chat["requests"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert rows == chat["requests"]

    for name in ("summary.txt", "summary.json", "summary.png", "load_stats.csv", "load_samples.jsonl"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for path in out.iterdir():  # the key is never written anywhere
        assert stack["secret"] not in path.read_text(errors="replace"), path
    assert stack["secret"] not in result.stdout + result.stderr
