"""Supervisor: starts a plan's components in order, keeps them up, applies redeploys, stops them.

It runs as its own background process (`python -m twllm.runtime.supervisor --state-dir D`) or
inside `twllm deploy --foreground`. Signals become events on a queue handled by the main loop
(SIGTERM/SIGINT: stop; SIGHUP: apply the plan staged by a redeploy). Children run in their own
process groups with their output pumped into one rotated log each; state.json is rewritten
whenever something changes.

Everything it and its children create is private to the deploying user: the supervisor process
runs with umask 077 and starts every child with umask 077 (see twllm.runtime.state).
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from twllm.errors import EXIT_NOT_READY, TwllmError
from twllm.plan.model import Plan
from twllm.runtime.components import KIND_ORDER, Component, build_components
from twllm.runtime.engines.base import RuntimeContext
from twllm.runtime.logs import RotatingLog
from twllm.runtime.metrics import ComponentSample, MetricsServer
from twllm.runtime.ports import hold
from twllm.runtime.state import (
    ComponentState,
    ComponentStatus,
    DeploymentState,
    DeploymentStatus,
    StateDir,
    write_atomic,
)
from twllm.settings import ENGINE_KEY_ENV

UMASK = 0o077
"""Of the supervisor and every process it starts: what they create is readable by this user only."""
TICK_S = 0.25
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0
MAINTENANCE_EVERY_S = 24 * 3600.0
"""Ledger partitions ahead and retention: once after each deploy settles, then daily."""
PROBE_EVERY_S = 1.0
STABLE_AFTER_S = 60.0
"""A component up this long gets its backoff reset."""
_RUNNING = (ComponentStatus.STARTING, ComponentStatus.PROVISIONING, ComponentStatus.READY)
"""Phases with a live process to watch."""


@dataclass
class _Run:
    """A component and its live process."""

    comp: Component
    state: ComponentState
    proc: subprocess.Popen | None = None
    phase: ComponentStatus = ComponentStatus.WAITING
    """What the supervisor is doing with it; also its status in state.json (RESTARTING: waiting
    out a backoff before the next launch)."""
    deadline: float = 0.0
    restart_at: float = 0.0
    failures_in_row: int = 0
    ever_ready: bool = False
    provision_thread: threading.Thread | None = None
    provision_error: str | None = None
    log: RotatingLog | None = None
    next_probe: float = 0.0
    held: socket.socket | None = None
    """The component's port, bound by the supervisor while no process of the component listens
    on it (see twllm.runtime.ports.hold): the engines load for a minute before the gateway
    starts, and their outgoing connections could otherwise take its port."""


def runtime_context(sd: StateDir, plan: Plan, env: dict[str, str] | None = None) -> RuntimeContext:
    """Secrets from the environment (master key, external database URL) and the state dir."""
    env = dict(os.environ if env is None else env)
    secrets = {ENGINE_KEY_ENV: sd.engine_key()}
    for var in (plan.gateway.master_key_env, plan.database.url_env):
        if var and var in env:
            secrets[var] = env[var]
    vllm_python = Path(plan.vllm_python) if plan.vllm_python else None
    return RuntimeContext(state_dir=sd.root, secrets=secrets, vllm_python=vllm_python)


class Supervisor:
    """Runs one deployment until told to stop."""

    def __init__(
        self,
        sd: StateDir,
        plan: Plan,
        ctx: RuntimeContext,
        components: Callable[[Plan, RuntimeContext, Path], list[Component]] = build_components,
    ) -> None:
        self.build = components
        self.sd = sd
        self.plan = plan
        self.ctx = ctx
        self.events: queue.Queue[str] = queue.Queue()
        self.runs: list[_Run] = []
        self.state = DeploymentState(name=plan.name, supervisor_pid=os.getpid(), gateway_url=plan.gateway.url)
        previous = sd.read_state()
        if previous is not None:  # written by the deploy that started us
            self.state.secret_digest = previous.secret_digest
        self.initial = True
        self.settling = True
        self.next_maintenance = 0.0
        self.metrics = MetricsServer(self._samples)

    # ---- lifecycle -------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.events.put("stop"))
        signal.signal(signal.SIGINT, lambda *_: self.events.put("stop"))
        signal.signal(signal.SIGHUP, lambda *_: self.events.put("reload"))

    def run(self) -> int:
        """Start everything, then supervise until a stop event; returns the exit code."""
        self.sd.ensure()
        write_atomic(self.sd.supervisor_pid, str(os.getpid()))
        try:
            self._serve_metrics()
            self._adopt(self.build(self.plan, self.ctx, self.sd.rendered))
            self._save()
            while True:
                try:
                    event = self.events.get(timeout=TICK_S)
                except queue.Empty:
                    event = None
                if event == "stop":
                    self._stop_all()
                    self.state.status = DeploymentStatus.STOPPED
                    self._save()
                    return 0
                if event == "reload":
                    self._reload()
                if not self._tick():
                    self._stop_all()
                    self.state.status = DeploymentStatus.FAILED
                    self._save()
                    return EXIT_NOT_READY
        finally:
            self.metrics.stop()
            self.sd.supervisor_pid.unlink(missing_ok=True)

    def _serve_metrics(self) -> None:
        """The component metrics, on the plan's port (moved when a redeploy moves it)."""
        mon = self.plan.monitoring
        if mon is not None and mon.supervisor_port is not None:
            self.metrics.start(mon.supervisor_port)

    def _samples(self) -> list[ComponentSample]:
        return [
            ComponentSample(r.comp.name, r.comp.kind, r.phase == ComponentStatus.READY, r.state.restarts)
            for r in list(self.runs)
        ]

    # ---- the loop --------------------------------------------------------------------------

    def _tick(self) -> bool:
        """Advance every component one step; False when an initial deploy has failed."""
        now = time.monotonic()
        changed = False
        for run in self.runs:
            changed |= self._step(run, now)
        if self.initial and any(r.phase == ComponentStatus.FAILED for r in self.runs):
            failed = next(r for r in self.runs if r.phase == ComponentStatus.FAILED)
            self.state.status = DeploymentStatus.FAILED
            self.state.failed_component = failed.comp.name
            self.state.error = f"{failed.comp.name}: {failed.state.detail}"
            return False
        settled = (ComponentStatus.READY, ComponentStatus.FAILED, ComponentStatus.STOPPED)
        if self.settling and all(r.phase in settled for r in self.runs):
            self.settling = False
            self.initial = False
            failed_runs = [r for r in self.runs if r.phase == ComponentStatus.FAILED]
            self.state.status = DeploymentStatus.FAILED if failed_runs else DeploymentStatus.READY
            self.state.error = "; ".join(f"{r.comp.name}: {r.state.detail}" for r in failed_runs) or None
            self.state.failed_component = failed_runs[0].comp.name if failed_runs else None
            self.state.generation += 1
            changed = True
        elif not self.settling:
            if now >= self.next_maintenance:
                self.next_maintenance = now + MAINTENANCE_EVERY_S
                threading.Thread(target=self._maintain, daemon=True, name="maintenance").start()
            ready = all(r.phase == ComponentStatus.READY for r in self.runs)
            status = DeploymentStatus.READY if ready else DeploymentStatus.DEGRADED
            if status != self.state.status and not (
                self.state.status == DeploymentStatus.FAILED and status == DeploymentStatus.DEGRADED
            ):
                self.state.status = status
                changed = True
        if changed:
            self._save()
        return True

    def _maintain(self) -> None:
        """Ledger partitions for the months ahead, and retention when the spec sets it."""
        from twllm.accounting.migrate import maintain
        from twllm.runtime.components import database_url_for

        url = database_url_for(self.plan, self.ctx)
        if not url:
            return
        try:
            maintain(url, self.plan.database.retention_days)
        except Exception as exc:  # noqa: BLE001 - retried tomorrow; visible in the supervisor log
            print(f"twllm: ledger maintenance failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)

    def _may_start(self, run: _Run) -> bool:
        """Initial order: a component starts once every earlier kind is ready."""
        mine = KIND_ORDER[run.comp.kind]
        return all(r.phase == ComponentStatus.READY for r in self.runs if KIND_ORDER[r.comp.kind] < mine)

    def _step(self, run: _Run, now: float) -> bool:
        phase = run.phase
        if phase == ComponentStatus.WAITING and self._may_start(run):
            self._launch(run, now)
        elif phase in _RUNNING and run.proc is not None and run.proc.poll() is not None:
            self._exited(run, now)
        elif phase == ComponentStatus.PROVISIONING:
            if run.provision_thread is not None and not run.provision_thread.is_alive():
                if run.provision_error:
                    self._fail_start(run, now, run.provision_error)
                else:
                    self._set(run, ComponentStatus.STARTING)
            elif now > run.deadline:
                self._fail_start(run, now, f"not provisioned within {run.comp.start_timeout_s:g} s")
        elif phase == ComponentStatus.STARTING and now >= run.next_probe:
            run.next_probe = now + PROBE_EVERY_S
            if run.comp.ready():
                try:
                    run.comp.after_ready()
                except TwllmError as exc:
                    self._fail_start(run, now, exc.message)
                    return True
                run.ever_ready = True
                run.state.ready_at = time.time()
                self._set(run, ComponentStatus.READY, "")
            elif now > run.deadline:
                self._fail_start(run, now, f"not ready within {run.comp.start_timeout_s:g} s")
        elif (
            phase == ComponentStatus.READY
            and run.failures_in_row
            and time.time() - (run.state.ready_at or 0) > STABLE_AFTER_S
        ):
            run.failures_in_row = 0
        elif phase == ComponentStatus.RESTARTING and now >= run.restart_at:
            self._launch(run, now)
        return phase != run.phase

    def _launch(self, run: _Run, now: float) -> None:
        comp = run.comp
        try:
            comp.prepare()
            launch = comp.launch()
        except TwllmError as exc:
            self._fail_start(run, now, exc.message + (f" (hint: {exc.hint})" if exc.hint else ""))
            return
        run.log = run.log or RotatingLog(self.sd.log_of(comp.log_name))
        run.log.note(f"twllm: starting {comp.name}: {' '.join(launch.argv)}")
        env = {**os.environ, **launch.env}
        try:
            run.proc = subprocess.Popen(
                launch.argv,
                env=env,
                cwd=launch.cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                umask=UMASK,
            )
        except OSError as exc:
            self._fail_start(run, now, f"cannot run {launch.argv[0]}: {exc.strerror}")
            return
        run.log.pump(run.proc.stdout)
        run.state.pid = run.proc.pid
        run.state.started_at = time.time()
        run.deadline = now + comp.start_timeout_s
        run.provision_error = None

        def provision() -> None:
            try:
                comp.provision(lambda line: self._detail(run, line))
            except TwllmError as exc:
                run.provision_error = exc.message
            except Exception as exc:  # noqa: BLE001 - reported as the component's failure
                run.provision_error = f"{type(exc).__name__}: {exc}"

        run.provision_thread = threading.Thread(target=provision, daemon=True, name=f"provision-{comp.name}")
        run.provision_thread.start()
        self._set(run, ComponentStatus.PROVISIONING, "")

    def _exited(self, run: _Run, now: float) -> None:
        code = run.proc.returncode if run.proc else None
        if run.log:
            run.log.note(f"twllm: {run.comp.name} exited with status {code}")
        run.state.pid = None
        if not run.ever_ready and self.initial:
            self._set(run, ComponentStatus.FAILED, f"exited with status {code} before it was ready")
            return
        self._schedule_restart(run, now, f"exited with status {code}")

    def _fail_start(self, run: _Run, now: float, why: str) -> None:
        self._kill(run)
        if self.initial or not run.ever_ready:
            self._set(run, ComponentStatus.FAILED, why)
        else:
            self._schedule_restart(run, now, why)

    def _schedule_restart(self, run: _Run, now: float, why: str) -> None:
        run.failures_in_row += 1
        run.state.restarts += 1
        delay = min(BACKOFF_BASE_S * 2 ** (run.failures_in_row - 1), BACKOFF_MAX_S)
        run.restart_at = now + delay
        self._set(run, ComponentStatus.RESTARTING, f"{why}; restart {run.state.restarts} in {delay:g} s")

    # ---- redeploy --------------------------------------------------------------------------

    def _reload(self) -> None:
        """Apply the plan a redeploy staged: restart only components whose fingerprint changed."""
        staged_plan = self.sd.root / "plan.next.json"
        staged_rendered = self.sd.root / "rendered.next"
        if not staged_plan.exists() or not staged_rendered.exists():
            return
        plan = Plan.read(staged_plan)
        old_rendered = self.sd.root / "rendered.old"
        shutil.rmtree(old_rendered, ignore_errors=True)
        self.sd.rendered.rename(old_rendered)
        staged_rendered.rename(self.sd.rendered)
        staged_plan.replace(self.sd.plan)
        shutil.rmtree(old_rendered, ignore_errors=True)
        self.plan = plan
        self.ctx = runtime_context(self.sd, plan)
        self.state.gateway_url = plan.gateway.url
        self._serve_metrics()
        new = self.build(plan, self.ctx, self.sd.rendered)
        keep = {
            c.name
            for c in new
            if (r := self._run(c.name)) and r.comp.fingerprint == c.fingerprint and r.phase == ComponentStatus.READY
        }
        for run in [r for r in reversed(self.runs) if r.comp.name not in keep]:
            self._stop(run)
        self.runs = [r for r in self.runs if r.comp.name in keep]
        self._adopt([c for c in new if c.name not in keep])
        self.runs.sort(key=lambda r: KIND_ORDER[r.comp.kind])
        self.state.status = DeploymentStatus.RELOADING
        self.initial = False
        self.settling = True
        self._save()

    def _adopt(self, components: list[Component]) -> None:
        for comp in components:
            old = self.state.component(comp.name)
            state = ComponentState(
                name=comp.name,
                kind=comp.kind,
                port=comp.port,
                fingerprint=comp.fingerprint,
                restarts=old.restarts if old else 0,
            )
            run = _Run(comp=comp, state=state)
            self.runs.append(run)
            self._hold(run)

    def _run(self, name: str) -> _Run | None:
        return next((r for r in self.runs if r.comp.name == name), None)

    # ---- stopping --------------------------------------------------------------------------

    def _stop_all(self) -> None:
        """The embedded Prometheus first, then the gateway, the engines, the database."""
        self.state.status = DeploymentStatus.STOPPING
        self._save()
        for run in sorted(self.runs, key=lambda r: -KIND_ORDER[r.comp.kind]):
            self._stop(run)
        self._save()

    def _stop(self, run: _Run) -> None:
        had_process = run.proc is not None
        self._kill(run)
        if had_process:
            run.comp.after_stop()
        if run.phase != ComponentStatus.FAILED:  # keep why it failed visible in status
            self._set(run, ComponentStatus.STOPPED, "")

    def _kill(self, run: _Run) -> None:
        proc = run.proc
        if proc is None:
            return
        stop_group(proc.pid, run.comp.stop_timeout_s, proc, run.comp.stop_signal)
        run.proc = None
        run.state.pid = None
        if run.log:
            run.log.note(f"twllm: stopped {run.comp.name}")

    # ---- state -----------------------------------------------------------------------------

    def _set(self, run: _Run, phase: ComponentStatus, detail: str | None = None) -> None:
        run.phase = phase
        run.state.status = phase
        if detail is not None:
            run.state.detail = detail
        if phase == ComponentStatus.RESTARTING:
            self._hold(run)
        elif phase in (ComponentStatus.READY, ComponentStatus.STOPPED, ComponentStatus.FAILED):
            self._release(run)

    @staticmethod
    def _hold(run: _Run) -> None:
        """Keep the port from the kernel's picks until the component is up (its servers bind with
        SO_REUSEADDR, as the hold does, so they bind while it is held)."""
        if run.held is None and run.comp.port:
            run.held = hold(run.comp.port)

    @staticmethod
    def _release(run: _Run) -> None:
        if run.held is not None:
            run.held.close()
            run.held = None

    def _detail(self, run: _Run, line: str) -> None:
        run.state.detail = line
        self._save()

    def _save(self) -> None:
        self.state.components = [r.state for r in self.runs]
        self.sd.write_state(self.state)


def stop_group(pgid: int, timeout: float, proc: subprocess.Popen | None = None, sig: int = signal.SIGTERM) -> None:
    """Signal a process group (SIGTERM unless told), SIGKILL it after ``timeout``; reap ``proc``."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            proc.poll()
        if not _group_alive(pgid):
            break
        time.sleep(0.1)
    else:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc is not None:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies still count for killpg; look for a live member.
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twllm.runtime.supervisor")
    parser.add_argument("--state-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    os.umask(UMASK)
    sd = StateDir(args.state_dir)
    plan = Plan.read(sd.plan)
    supervisor = Supervisor(sd, plan, runtime_context(sd, plan))
    supervisor.install_signal_handlers()
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
