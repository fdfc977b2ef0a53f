"""Metrics overhead benchmark: the twllm gateway with /metrics on vs off, side by side in one run.

Two twllm gateways (``twllm.gateway.serve``, the shield, our hooks, ``--workers`` uvicorn
workers each) run the config twllm renders from one spec, the only difference being
``monitoring.metrics.enabled`` (on: LiteLLM's Prometheus logger and twllm's own series, in a
multiprocess folder). Every deployment answers from ``mock_response``, so what is measured is
the gateway's own work per request, not an engine's. Both write to one real embedded PostgreSQL
and are called with a tenant key.

Each round sends ``--requests`` chat completions from ``--concurrency`` clients (keep-alive) to
each gateway in turn, alternating the order every round to cancel drift, after ``--warmup``
uncounted requests. While the metrics-on gateway is loaded, /metrics is scraped every
``--scrape-interval`` seconds with the master key, as Prometheus would. Reported: p50, p95 and
requests/s per target over all rounds, the CPU time the gateway's processes (master and workers,
from psutil) spent per request, and on/off ratios, pooled and as the median of the rounds' ratios.

On a 2-core machine the load generator, PostgreSQL and the gateway share the cores, so wall-clock
figures swing by tens of percent from round to round; CPU per request is what the metrics add to
the gateway's own work and is the steadier figure. Run many short rounds:

    .venv/bin/python benchmarks/metrics_overhead.py --requests 200 --rounds 8
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import psycopg
import yaml

from twllm.accounting import store
from twllm.accounting.migrate import migrate
from twllm.plan.build import ENGINE_KEY_ENV, make_plan
from twllm.plan.placement import GpuInventory
from twllm.render.litellm_config import GATEWAY_SETTINGS, LITELLM_CONFIG, render
from twllm.settings import DATABASE_URL_ENV, GATEWAY_SETTINGS_ENV, MASTER_KEY_ENV, PROMETHEUS_MULTIPROC_DIR_ENV
from twllm.spec.resolve import parse_spec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from pgutil import Postgres  # the tests' embedded PostgreSQL (tests/ is not a package)
from proxyutil import ProxyHandle, start_proxy  # the tests' proxy starter

MASTER = "sk-bench-metrics-master"
SPEC = """\
name: bench-metrics
gateway: {{master_key: "${{TWLLM_MASTER_KEY}}", num_retries: 0}}
monitoring: {{metrics: {{enabled: {enabled}}}}}
models:
  - {{name: chat, model: llama-3.2-1b-instruct, price: {{input_per_1m: 5, output_per_1m: 10}}}}
"""
TARGETS = ("metrics-off", "metrics-on")


def gateway_folder(work: Path, enabled: bool) -> Path:
    """The rendered config of one target, its deployment answering from a mock."""
    out = work / ("on" if enabled else "off")
    loaded = parse_spec(SPEC.format(enabled=str(enabled).lower()), "bench.yaml", {MASTER_KEY_ENV: MASTER})
    render(make_plan(loaded, GpuInventory(8, 80, "bench"), out / "state"), loaded.spec, out)
    path = out / LITELLM_CONFIG
    config = yaml.safe_load(path.read_text())
    for deployment in config["model_list"]:
        deployment["litellm_params"]["mock_response"] = "模擬的回答，約十個字。"
    config["general_settings"]["background_health_checks"] = False
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return out


def load(url: str, key: str, requests: int, concurrency: int) -> tuple[list[float], float]:
    """Latencies (s) of ``requests`` chat completions from ``concurrency`` clients, and the wall time."""
    body = {"model": "chat", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 16}
    per_client = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]

    def client(count: int) -> list[float]:
        out = []
        with httpx.Client(base_url=url, timeout=60, trust_env=False, headers={"Authorization": f"Bearer {key}"}) as c:
            for _ in range(count):
                start = time.perf_counter()
                response = c.post("/v1/chat/completions", json=body)
                out.append(time.perf_counter() - start)
                if response.status_code != 200:
                    raise RuntimeError(f"{url}: {response.status_code} {response.text[:200]}")
        return out

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        latencies = [x for part in pool.map(client, per_client) for x in part]
    return latencies, time.perf_counter() - start


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its children (the gateway's master and workers)."""
    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def scraper(url: str, interval: float, stop: threading.Event, sizes: list[int]) -> None:
    """Scrape /metrics as Prometheus would, until ``stop``."""
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as client:
        while not stop.wait(interval):
            response = client.get("/metrics", headers={"Authorization": f"Bearer {MASTER}"})
            if response.status_code != 200:
                raise RuntimeError(f"/metrics answered {response.status_code}")
            sizes.append(len(response.content))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="per target and round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2, help="uvicorn workers per gateway")
    parser.add_argument("--scrape-interval", type=float, default=1.0)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    with tempfile.TemporaryDirectory(prefix="twllm-bench-metrics-") as tmp:
        work = Path(tmp)
        pg = Postgres(work / "pg")
        pg.start()
        handles: dict[str, ProxyHandle] = {}
        try:
            migrate(pg.url)
            with psycopg.connect(pg.url, autocommit=True) as conn:
                tenant = store.create_tenant(conn, "bench").name
                _, key = store.create_key(conn, tenant, store.KeySettings())
            for target in TARGETS:
                folder = gateway_folder(work, target == "metrics-on")
                env = {
                    MASTER_KEY_ENV: MASTER,
                    ENGINE_KEY_ENV: "sk-engine-bench",
                    GATEWAY_SETTINGS_ENV: str(folder / GATEWAY_SETTINGS),
                    DATABASE_URL_ENV: pg.url,
                }
                if target == "metrics-on":
                    env[PROMETHEUS_MULTIPROC_DIR_ENV] = str(folder / "prom")
                handles[target] = start_proxy(folder / LITELLM_CONFIG, env=env, workers=args.workers, timeout=300)
                load(handles[target].base_url, key, args.warmup, min(args.concurrency, args.warmup))
            latencies: dict[str, list[float]] = {t: [] for t in TARGETS}
            walls: dict[str, float] = dict.fromkeys(TARGETS, 0.0)
            cpus: dict[str, float] = dict.fromkeys(TARGETS, 0.0)
            per_round: list[dict[str, tuple[float, float, float]]] = []
            sizes: list[int] = []
            for round_no in range(args.rounds):
                order = TARGETS if round_no % 2 == 0 else tuple(reversed(TARGETS))
                this_round: dict[str, tuple[float, float, float]] = {}
                for target in order:
                    stop = threading.Event()
                    thread = None
                    if target == "metrics-on":
                        thread = threading.Thread(
                            target=scraper, args=(handles[target].base_url, args.scrape_interval, stop, sizes)
                        )
                        thread.start()
                    cpu_before = tree_cpu(handles[target].pid)
                    lat, wall = load(handles[target].base_url, key, args.requests, args.concurrency)
                    cpu = tree_cpu(handles[target].pid) - cpu_before
                    stop.set()
                    if thread is not None:
                        thread.join()
                    latencies[target] += lat
                    walls[target] += wall
                    cpus[target] += cpu
                    this_round[target] = (statistics.median(lat), len(lat) / wall, cpu / len(lat))
                    print(
                        f"round {round_no + 1} {target:12s} p50 {statistics.median(lat) * 1000:7.1f} ms  "
                        f"{len(lat) / wall:7.1f} req/s  {cpu / len(lat) * 1000:6.2f} CPU ms/request",
                        flush=True,
                    )
                per_round.append(this_round)
        finally:
            for handle in handles.values():
                handle.stop()
            pg.stop()

    print(
        f"\n{args.rounds} rounds x {args.requests} requests, concurrency {args.concurrency}, "
        f"{args.workers} workers per gateway, {os.cpu_count()} CPUs; /metrics scraped {len(sizes)} times "
        f"(last {sizes[-1] if sizes else 0} bytes)"
    )
    summary = {}
    for target in TARGETS:
        lat = sorted(latencies[target])
        p50, p95 = statistics.median(lat), lat[int(0.95 * (len(lat) - 1))]
        rps = len(lat) / walls[target]
        cpu_ms = cpus[target] / len(lat) * 1000
        summary[target] = (p50, rps, cpu_ms)
        print(
            f"{target:12s} p50 {p50 * 1000:7.1f} ms  p95 {p95 * 1000:7.1f} ms  {rps:7.1f} req/s  "
            f"{cpu_ms:6.2f} gateway CPU ms/request"
        )
    (off_p50, off_rps, off_cpu), (on_p50, on_rps, on_cpu) = summary["metrics-off"], summary["metrics-on"]
    print(
        f"on/off pooled: p50 x{on_p50 / off_p50:.3f}, throughput x{on_rps / off_rps:.3f}, CPU/request x{on_cpu / off_cpu:.3f}"
    )

    def median_ratio(index: int) -> float:
        return statistics.median(r["metrics-on"][index] / r["metrics-off"][index] for r in per_round)

    print(
        f"on/off median of {len(per_round)} rounds: p50 x{median_ratio(0):.3f}, "
        f"throughput x{median_ratio(1):.3f}, CPU/request x{median_ratio(2):.3f}"
    )


if __name__ == "__main__":
    main()
