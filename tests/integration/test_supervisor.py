"""The supervisor's own logic — order, readiness, restart with backoff, stop, redeploy — on real
processes. The components here are plain `python -m http.server` processes standing in for
engines (named as such): the real engines are exercised in the e2e tests."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from proxyutil import free_port

from twllm.errors import EXIT_NOT_READY
from twllm.plan.build import make_plan
from twllm.plan.placement import GpuInventory
from twllm.runtime import supervisor as supervisor_mod
from twllm.runtime.components import Component
from twllm.runtime.engines.base import Launch, RuntimeContext
from twllm.runtime.state import ComponentStatus, DeploymentStatus, StateDir, pid_alive
from twllm.spec.resolve import parse_spec

pytestmark = pytest.mark.integration

SPEC = "name: sup\ngateway: {master_key: '${K}'}\nmodels:\n  - {name: m, model: llama-3.2-1b-instruct, device: cpu}\n"


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def http_server(name: str, kind: str, port: int, *, tag: str = "v1", exit_at_once: bool = False) -> Component:
    """A stand-in component: a real process serving HTTP on ``port`` (or exiting at once)."""
    code = "import sys; sys.exit(3)" if exit_at_once else None
    argv = (
        [sys.executable, "-c", code]
        if code
        else [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    )
    return Component(
        name=name,
        kind=kind,
        port=port,
        start_timeout_s=20,
        launch=lambda: Launch(argv=argv, env={"TAG": tag}),
        ready=lambda: listening(port),
        fingerprint=f"{name}-{tag}",
        stop_timeout_s=5,
    )


class Harness:
    def __init__(self, tmp: Path, factory) -> None:
        self.sd = StateDir(tmp / "state")
        self.sd.ensure()
        plan = make_plan(parse_spec(SPEC, "s.yaml", {"K": "sk-x"}), GpuInventory(0), self.sd.root)
        ctx = RuntimeContext(state_dir=self.sd.root, secrets={})
        self.sup = supervisor_mod.Supervisor(self.sd, plan, ctx, components=factory)
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.code = self.sup.run()

    def start(self) -> Harness:
        self.thread.start()
        return self

    def wait_for(self, predicate, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.sd.read_state()
            if state is not None and predicate(state):
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out; state: {self.sd.read_state()}")

    def stop(self) -> None:
        self.sup.events.put("stop")
        self.thread.join(60)


@pytest.fixture
def ports():
    return [free_port() for _ in range(3)]


def test_order_readiness_restart_and_stop(tmp_path, ports, monkeypatch):
    db, engine, gateway = ports
    stopped: list[int] = []
    real_stop = supervisor_mod.stop_group
    monkeypatch.setattr(
        supervisor_mod,
        "stop_group",
        lambda pgid, t, proc=None, sig=15: (stopped.append(pgid), real_stop(pgid, t, proc, sig)),
    )

    def factory(plan, ctx, rendered):
        return [
            http_server("database", "database", db),
            http_server("vllm-m-0", "engine", engine),
            http_server("gateway", "gateway", gateway),
        ]

    h = Harness(tmp_path, factory).start()
    h.wait_for(lambda s: s.status == DeploymentStatus.READY and s.generation == 1)
    state = h.sd.read_state()
    by = {c.name: c for c in state.components}
    # Each kind starts only once the earlier kinds are ready.
    assert by["database"].ready_at <= by["vllm-m-0"].started_at <= by["vllm-m-0"].ready_at <= by["gateway"].started_at
    assert all(listening(p) for p in ports)

    # kill -9 the engine: the supervisor notices, restarts it after a backoff, and it serves again.
    old_pid = by["vllm-m-0"].pid
    os.kill(old_pid, signal.SIGKILL)
    h.wait_for(
        lambda s: (
            s.component("vllm-m-0").restarts == 1
            and s.component("vllm-m-0").status == ComponentStatus.READY
            and s.component("vllm-m-0").pid != old_pid
        )
    )
    assert listening(engine)
    assert "exited with status -9" in (h.sd.log_of("vllm-m-0")).read_text()

    pids = [c.pid for c in h.sd.read_state().components]
    h.stop()
    assert h.code == 0
    assert stopped == [pids[2], pids[1], pids[0]]  # gateway, engine, database
    assert not any(pid_alive(p) for p in pids)
    assert not any(listening(p) for p in ports)
    assert h.sd.read_state().status == DeploymentStatus.STOPPED


def plain_bindable(port: int) -> bool:
    """Whether a socket without SO_REUSEADDR can bind the port: not while anything is bound to it,
    which is also what keeps the kernel from picking it for an outgoing connection."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_a_components_port_is_held_until_it_is_up_and_while_it_restarts(tmp_path, ports, monkeypatch):
    """CI once lost the gateway's port: found free, then taken in the 40 s the engines loaded
    before the gateway started. The supervisor now holds each port while its component waits or
    restarts; the component (binding with SO_REUSEADDR, as uvicorn, vLLM and PostgreSQL do) still
    gets it, and nothing is held after a stop."""
    monkeypatch.setattr(supervisor_mod, "BACKOFF_BASE_S", 4.0)
    db, engine, gateway = ports
    loaded = tmp_path / "engine-loaded"
    slow = http_server("vllm-m-0", "engine", engine)
    slow.ready = lambda: loaded.exists() and listening(engine)

    h = Harness(
        tmp_path,
        lambda plan, ctx, rendered: [
            http_server("database", "database", db),
            slow,
            http_server("gateway", "gateway", gateway),
        ],
    ).start()
    h.wait_for(lambda s: s.component("vllm-m-0").status == ComponentStatus.STARTING)
    time.sleep(0.5)
    assert h.sd.read_state().component("gateway").status == ComponentStatus.WAITING
    assert not listening(gateway) and not plain_bindable(gateway)  # held, not served

    loaded.touch()
    h.wait_for(lambda s: s.status == DeploymentStatus.READY)
    assert listening(gateway)

    os.kill(h.sd.read_state().component("gateway").pid, signal.SIGKILL)
    h.wait_for(lambda s: s.component("gateway").status == ComponentStatus.RESTARTING)
    assert not listening(gateway) and not plain_bindable(gateway)  # held through the 4 s backoff
    h.wait_for(lambda s: s.component("gateway").status == ComponentStatus.READY)
    assert listening(gateway)

    h.stop()
    assert h.code == 0
    assert all(plain_bindable(port) for port in ports)


def test_a_component_that_never_comes_up_fails_the_deploy_and_stops_the_rest(tmp_path, ports):
    db, engine, gateway = ports

    def factory(plan, ctx, rendered):
        return [
            http_server("database", "database", db),
            http_server("vllm-m-0", "engine", engine, exit_at_once=True),
            http_server("gateway", "gateway", gateway),
        ]

    h = Harness(tmp_path, factory).start()
    h.thread.join(60)
    assert h.code == EXIT_NOT_READY
    state = h.sd.read_state()
    assert state.status == DeploymentStatus.FAILED and state.failed_component == "vllm-m-0"
    assert "exited with status 3 before it was ready" in state.error
    assert state.component("gateway").pid is None and state.component("gateway").started_at is None
    assert not listening(db)


def test_redeploy_restarts_only_what_changed(tmp_path, ports):
    db, engine, gateway = ports
    versions = {"vllm-m-0": "v1"}

    def factory(plan, ctx, rendered):
        return [
            http_server("database", "database", db),
            http_server("vllm-m-0", "engine", engine, tag=versions["vllm-m-0"]),
            http_server("gateway", "gateway", gateway),
        ]

    h = Harness(tmp_path, factory).start()
    h.wait_for(lambda s: s.status == DeploymentStatus.READY and s.generation == 1)
    before = {c.name: c.pid for c in h.sd.read_state().components}
    # Stage an identical plan and rendered files, but a changed engine fingerprint.
    (h.sd.root / "plan.next.json").write_text(h.sd.plan.read_text() if h.sd.plan.exists() else h.sup.plan.to_json())
    (h.sd.root / "rendered.next").mkdir()
    versions["vllm-m-0"] = "v2"
    h.sup.events.put("reload")
    h.wait_for(lambda s: s.generation == 2 and s.status == DeploymentStatus.READY)
    after = {c.name: c.pid for c in h.sd.read_state().components}
    assert after["database"] == before["database"] and after["gateway"] == before["gateway"]
    assert after["vllm-m-0"] != before["vllm-m-0"]
    assert not pid_alive(before["vllm-m-0"])
    h.stop()
