"""A replica that restarts gets no requests until its engine answers again.

A restarted vLLM engine listens on its port long before it serves (90 s on this machine): the
kernel accepts connections that nobody reads. Before ``twllm.gateway.readiness``, once LiteLLM's
cooldown of the failed replica ended, the least-busy router sent requests there and each one
waited for the gateway's request timeout. Here two replicas are the benchmark's fast stand-in
(``benchmarks/fast_openai.py``, named as such: it can restart on demand and ``--loading`` binds
its port at once and answers only later, as a loading vLLM does) behind the real gateway with
twllm's rendered config, cooldown 2 s. One is killed, restarted with 25 s of "loading", and
clients (timeout 15 s, the cooldown seven times over) must see every request answered 200. The
chaos test (tests/e2e/test_chaos.py) does the same with real vLLM engines.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from pgutil import Postgres
from proxyutil import ProxyHandle, free_port, start_proxy

from twllm.gateway.readiness import HEALTH_URL
from twllm.plan.build import ENGINE_KEY_ENV, make_plan
from twllm.plan.placement import GpuInventory
from twllm.render.litellm_config import GATEWAY_SETTINGS, LITELLM_CONFIG, render
from twllm.settings import DATABASE_URL_ENV, GATEWAY_SETTINGS_ENV, SPOOL_DIR_ENV
from twllm.spec.resolve import parse_spec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

STANDIN = Path(__file__).resolve().parents[2] / "benchmarks" / "fast_openai.py"
SPEC = """\
name: readiness
gateway: {{master_key: "${{TWLLM_MASTER_KEY}}", workers: 1, cooldown_s: 2, request_timeout_s: 60, num_retries: 1}}
engines: {{port_base: {port}}}
models:
  - {{name: demo-chat, model: llama-3.2-1b-instruct, replicas: 2}}
"""
LOADING_S = 25.0
CLIENT_TIMEOUT_S = 15.0


def standin(port: int, name: str, loading: float = 0.0) -> subprocess.Popen[bytes]:
    argv = [sys.executable, str(STANDIN), "--port", str(port), "--name", name, "--latency", "0.2"]
    return subprocess.Popen([*argv, "--loading", str(loading)], stdout=subprocess.DEVNULL, start_new_session=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from twllm.accounting.migrate import migrate

    tmp_path = tmp_path_factory.mktemp("readiness")
    master = "sk-readiness-" + secrets.token_hex(8)
    env = {"TWLLM_MASTER_KEY": master}
    loaded = parse_spec(SPEC.format(port=free_port()), "readiness.yaml", env)
    plan = make_plan(loaded, GpuInventory(2), tmp_path / "state")  # a GPU model's plan: the stand-ins serve it
    render(plan, loaded.spec, tmp_path)
    config = yaml.safe_load((tmp_path / LITELLM_CONFIG).read_text())
    ports = [free_port(), free_port()]
    for deployment, port in zip(config["model_list"], ports, strict=True):
        assert deployment["model_info"][HEALTH_URL].endswith("/health")  # what the render gives a replica
        deployment["litellm_params"]["api_base"] = f"http://127.0.0.1:{port}/v1"
        deployment["model_info"][HEALTH_URL] = f"http://127.0.0.1:{port}/health"
    (tmp_path / LITELLM_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    upstreams = [standin(port, f"r{i}") for i, port in enumerate(ports)]
    pg = Postgres(tmp_path)
    pg.start()
    proxy: ProxyHandle | None = None
    try:
        migrate(pg.url)
        ours = {
            **env,
            ENGINE_KEY_ENV: "sk-engine-readiness",
            GATEWAY_SETTINGS_ENV: str(tmp_path / GATEWAY_SETTINGS),
            DATABASE_URL_ENV: pg.url,
            SPOOL_DIR_ENV: str(tmp_path / "spool"),
        }
        proxy = start_proxy(tmp_path / LITELLM_CONFIG, env=ours, timeout=240, log_path=tmp_path / "gateway.log")
        yield {"proxy": proxy, "master": master, "ports": ports, "upstreams": upstreams, "database_url": pg.url}
    finally:
        if proxy is not None:
            proxy.stop()
        for up in upstreams:
            up.kill()
        pg.stop(signal.SIGKILL)


def test_a_fresh_worker_opens_its_database_connections_before_its_first_request(stack) -> None:
    """Before any request: the worker's accounting has made its pool's first connections at
    start-up (``twllm.accounting.hooks.warm``), so a restarted gateway's first burst finds them."""
    import psycopg

    deadline = time.monotonic() + 30
    while True:
        with psycopg.connect(stack["database_url"], autocommit=True) as conn:
            (others,) = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()
        if others >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert others >= 2, f"{others} connections from the gateway before its first request"


def test_a_restarting_replica_gets_no_request_until_it_answers(stack) -> None:
    proxy: ProxyHandle = stack["proxy"]
    base = f"http://{proxy.host}:{proxy.port}"
    records: list[tuple[float, object, str]] = []
    stop = threading.Event()

    def client() -> None:
        headers = {"Authorization": f"Bearer {stack['master']}"}
        body = {"model": "demo-chat", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 4}
        with httpx.Client(base_url=base, headers=headers, timeout=CLIENT_TIMEOUT_S, trust_env=False) as c:
            while not stop.is_set():
                began = time.time()
                try:
                    r = c.post("/v1/chat/completions", json=body)
                    records.append((began, r.status_code, r.json().get("id", "") if r.status_code == 200 else r.text))
                except httpx.HTTPError as e:
                    records.append((began, type(e).__name__, str(e)))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(3)
        stack["upstreams"][0].kill()
        stack["upstreams"][0].wait()
        killed = time.time()
        time.sleep(1)
        stack["upstreams"][0] = standin(stack["ports"][0], "r0-again", loading=LOADING_S)
        serving = killed + 1 + LOADING_S
        while time.time() < serving + 12:
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=CLIENT_TIMEOUT_S + 5)
    outcomes = Counter(str(status) for _, status, _ in records)
    failed = [(round(t - killed, 1), status, text[:200]) for t, status, text in records if status != 200]
    assert not failed, f"{outcomes}: {failed[:5]}"
    during = [text for t, _, text in records if killed + 1 < t < serving]
    assert len(during) >= 20, outcomes  # the other replica kept answering while it loaded
    assert not any(text.startswith("chatcmpl-r0-again") for text in during)
    back = [text for t, _, text in records if t > serving]
    assert any(text.startswith("chatcmpl-r0-again") for text in back), Counter(x.split("-")[1] for x in back)
    log = proxy.log_path.read_text(errors="replace")
    assert "replica vllm-demo-chat-0 is not serving" in log
    assert "replica vllm-demo-chat-0 answers its health probe again" in log
