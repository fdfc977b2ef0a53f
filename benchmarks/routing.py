"""Routing benchmark: how each of the gateway's routing strategies spreads load over two replicas
of unequal speed, and what that does to latency (p50, p95) and to each replica's share.

Two stand-in engines (not models: OpenAI-compatible servers named as such, ``standin``) serve
the one model ``chat`` of a spec with ``replicas: 2``. Each works like a vLLM engine's scheduler
at the level that matters here: at most ``max_num_seqs`` requests run at once, each for
``service_ms``; the others wait in its queue. Three setups (``--setup``):

  capacity  replica 0 max_num_seqs 8, replica 1 max_num_seqs 2, both 500 ms a request (the
            issue's setup: one replica with a smaller max_num_seqs);
  speed     both max_num_seqs 8, replica 0 500 ms and replica 1 1250 ms a request (a slower GPU);
  equal     both max_num_seqs 4, 500 ms a request: the control (the usual case of identical
            replicas, where no replica can take the whole load alone).

For every strategy the real twllm gateway (``python -m twllm.gateway.serve`` on the rendered
LiteLLM config, our auth and hooks, one worker, no database: the master key and the ledger off)
is started on a config rendered from the spec with ``gateway.routing_strategy`` set, and gets a
closed-loop load: ``--concurrency`` clients sending ``--requests`` chat completions after
``--warmup`` that are not counted (latency-based routing learns from them). Each replica counts
the requests it served. Strategies run in alternating order over ``--rounds`` rounds.

    .venv/bin/python benchmarks/routing.py [--setup capacity|speed|equal|all] [--requests N]
        [--concurrency C] [--rounds R] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from twllm.plan.build import ENGINE_KEY_ENV, make_plan
from twllm.plan.placement import GpuInventory
from twllm.render.litellm_config import LITELLM_CONFIG, render
from twllm.runtime.ports import free_port
from twllm.settings import GATEWAY_SETTINGS_ENV
from twllm.spec.resolve import parse_spec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from proxyutil import start_proxy  # the tests' proxy starter (tests/ is not a package)

MASTER = "sk-routing-bench-master-0123"
STRATEGIES = ("simple-shuffle", "least-busy", "latency")
SETUPS: dict[str, tuple[tuple[int, float], tuple[int, float]]] = {
    # (max_num_seqs, service_ms) of replica 0 and replica 1
    "capacity": ((8, 500.0), (2, 500.0)),
    "speed": ((8, 500.0), (8, 1250.0)),
    "equal": ((4, 500.0), (4, 500.0)),
}
SPEC = """\
name: bench-routing
gateway: {{master_key: "${{TWLLM_MASTER_KEY}}", routing_strategy: {strategy}, num_retries: 0}}
models:
  - {{name: chat, model: llama-3.2-1b-instruct, replicas: 2}}
"""


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


# ---- the stand-in engine ------------------------------------------------------------------------


def standin_app(max_num_seqs: int, service_ms: float) -> Any:
    """An ASGI app: /v1/chat/completions answers after ``service_ms``, ``max_num_seqs`` at a time;
    /v1/models, /health; GET /stats gives how many requests it served."""
    running = asyncio.Semaphore(max_num_seqs)
    served = 0

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal served
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        if path.endswith("/chat/completions"):
            async with running:
                await asyncio.sleep(service_ms / 1000)
                served += 1
            data: dict[str, Any] = {
                "id": "chatcmpl-standin",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": "chat",
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "好的。"}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 8, "completion_tokens": 3, "total_tokens": 11},
            }
        elif path == "/stats":
            data = {"served": served}
        else:
            data = {"object": "list", "data": [{"id": "chat", "object": "model"}]}
        payload = json.dumps(data, ensure_ascii=False).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    return app


def serve_standin(port: int, max_num_seqs: int, service_ms: float) -> None:
    import uvicorn

    uvicorn.run(standin_app(max_num_seqs, service_ms), host="127.0.0.1", port=port, log_level="warning")


class Standin:
    def __init__(self, max_num_seqs: int, service_ms: float) -> None:
        self.port = free_port("127.0.0.1")
        self.max_num_seqs, self.service_ms = max_num_seqs, service_ms
        self.child = subprocess.Popen(
            [sys.executable, __file__, "standin", str(self.port), str(max_num_seqs), str(service_ms)],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{self.base}/stats", timeout=1).raise_for_status()
                return
            except httpx.HTTPError:
                if time.monotonic() > deadline or self.child.poll() is not None:
                    raise RuntimeError(f"stand-in engine on {self.port} did not start") from None
                time.sleep(0.1)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def served(self) -> int:
        return int(httpx.get(f"{self.base}/stats", timeout=5).json()["served"])

    def stop(self) -> None:
        self.child.terminate()
        self.child.wait(10)


# ---- the gateway and the load -------------------------------------------------------------------


def render_gateway(strategy: str, replicas: list[Standin], out: Path) -> Path:
    env = {"TWLLM_MASTER_KEY": MASTER}
    loaded = parse_spec(SPEC.format(strategy=strategy), "routing.yaml", env)
    plan = make_plan(loaded, GpuInventory(8, 80, "bench"), out / "state")
    render(plan, loaded.spec, out)
    path = out / LITELLM_CONFIG
    config = yaml.safe_load(path.read_text())
    for deployment, replica in zip(config["model_list"], replicas, strict=True):
        deployment["litellm_params"]["api_base"] = f"{replica.base}/v1"
    config["general_settings"]["background_health_checks"] = False  # their calls would count as load
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return path


async def load(base: str, requests: int, concurrency: int) -> list[float]:
    """Closed loop: ``concurrency`` clients until ``requests`` are answered; latencies in ms."""
    latencies: list[float] = []
    left = requests
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    headers = {"Authorization": f"Bearer {MASTER}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits, trust_env=False) as client:

        async def one_client() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                began = time.perf_counter()
                response = await client.post("/v1/chat/completions", json=body, headers=headers)
                response.raise_for_status()
                latencies.append((time.perf_counter() - began) * 1000)

        await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def run_one(strategy: str, replicas: list[Standin], args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    out = folder / strategy
    out.mkdir(parents=True, exist_ok=True)
    config = render_gateway(strategy, replicas, out)
    env = {"TWLLM_MASTER_KEY": MASTER, ENGINE_KEY_ENV: "sk-standin", GATEWAY_SETTINGS_ENV: str(out / "gateway.json")}
    with start_proxy(config, env=env, workers=1, timeout=180) as proxy:
        asyncio.run(load(proxy.base_url, args.warmup, args.concurrency))
        before = [r.served() for r in replicas]
        began = time.perf_counter()
        latencies = asyncio.run(load(proxy.base_url, args.requests, args.concurrency))
        took = time.perf_counter() - began
        served = [r.served() - b for r, b in zip(replicas, before, strict=True)]
    total = sum(served) or 1
    return {
        "strategy": strategy,
        "requests": len(latencies),
        "p50_ms": round(statistics.median(latencies), 1),
        "p95_ms": round(percentile(latencies, 95), 1),
        "mean_ms": round(statistics.fmean(latencies), 1),
        "rps": round(len(latencies) / took, 2),
        "share": [round(s / total, 3) for s in served],
        "_latencies": latencies,
        "_served": served,
    }


def bench_setup(name: str, args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    replicas = [Standin(*spec) for spec in SETUPS[name]]
    try:
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in STRATEGIES}
        for round_no in range(args.rounds):
            order = STRATEGIES if round_no % 2 == 0 else tuple(reversed(STRATEGIES))
            for strategy in order:
                result = run_one(strategy, replicas, args, folder / f"{name}-{round_no}")
                say(
                    f"{name} round {round_no + 1} {strategy}: p50 {result['p50_ms']} ms, p95 {result['p95_ms']} ms, "
                    f"{result['rps']} req/s, share {result['share']}"
                )
                runs[strategy].append(result)
    finally:
        for replica in replicas:
            replica.stop()
    pooled = []
    for strategy, results in runs.items():
        latencies = [x for r in results for x in r["_latencies"]]
        served = [sum(r["_served"][i] for r in results) for i in range(2)]
        pooled.append(
            {
                "setup": name,
                "strategy": strategy,
                "requests": len(latencies),
                "p50_ms": round(statistics.median(latencies), 1),
                "p95_ms": round(percentile(latencies, 95), 1),
                "mean_ms": round(statistics.fmean(latencies), 1),
                "rps": round(statistics.fmean(r["rps"] for r in results), 2),
                "share": [round(s / (sum(served) or 1), 3) for s in served],
                "p95_by_round_ms": [r["p95_ms"] for r in results],
            }
        )
    return pooled


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "standin":
        serve_standin(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", choices=(*SETUPS, "all"), default="all")
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--warmup", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    args = parser.parse_args()
    setups = list(SETUPS) if args.setup == "all" else [args.setup]
    with tempfile.TemporaryDirectory(prefix="twllm-routing-") as tmp:
        results = [row for name in setups for row in bench_setup(name, args, Path(tmp))]
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "setups": {name: SETUPS[name] for name in setups},
        "requests": args.requests,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "results": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print("| setup | strategy | p50 ms | p95 ms | mean ms | req/s | share replica 0 / 1 | p95 by round |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['setup']} | {r['strategy']} | {r['p50_ms']} | {r['p95_ms']} | {r['mean_ms']} | {r['rps']} | "
            f"{r['share'][0]:.0%} / {r['share'][1]:.0%} | {', '.join(str(p) for p in r['p95_by_round_ms'])} |"
        )


if __name__ == "__main__":
    main()
