"""Run a twllm stack for a test module: real vLLM engines and the real gateway, from a spec.

``Stack.start(spec_text, ...)`` plans the spec exactly as ``twllm deploy`` does, launches every
vLLM engine of the plan through ``VllmDriver`` (the CPU build), waits until each lists its model,
renders the gateway's files and starts the gateway with ``gateway_launch`` — the same command the
supervisor runs — against a PostgreSQL URL the caller gives. Everything binds to 127.0.0.1 on
free ports and is stopped (SIGTERM, then SIGKILL) by ``stop()``.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from twllm.plan.build import ENGINE_KEY_ENV, make_plan
from twllm.plan.model import EngineProcess, Plan
from twllm.plan.placement import GpuInventory
from twllm.render.litellm_config import render
from twllm.runtime.engines.base import RuntimeContext
from twllm.runtime.engines.envs import child_env
from twllm.runtime.engines.vllm import VllmDriver
from twllm.runtime.gateway import gateway_launch
from twllm.runtime.ports import ephemeral_range
from twllm.spec.resolve import parse_spec

ENGINE_KEY = "sk-engine-stack-0123456789abcdef"
READY_TIMEOUT_S = 240.0


def _stop(child: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 30.0) -> None:
    if child.poll() is not None:
        return
    try:
        os.killpg(child.pid, sig)
        child.wait(grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.wait()


ENGINE_PORTS = 8
"""Consecutive ports kept for a stack's engines (engines.port_base counts up from the first)."""
PORTS_FROM = 20000
"""The lowest port a test stack is given (above the registered ports most daemons listen on)."""
_random = random.Random()
_TAKEN: set[int] = set()
"""Ports handed out already: the kernel may offer a free port twice, as nothing binds it yet."""


def free_block(count: int) -> int:
    """The first of ``count`` consecutive ports nothing is bound to and no stack was given, below
    the kernel's ephemeral range. A single free port as the engines' base would leave base + 1 …
    to chance (CI once gave the second replica a port already taken), and a port the kernel may
    pick for an outgoing connection can be taken while the engines load before the gateway starts
    (CI once saw exactly that: "address already in use" 40 s after the port was found free)."""
    low, high = ephemeral_range()
    first, last = PORTS_FROM, low - count
    if last < first:  # a host whose ephemeral range starts low: the ports above it, else any
        first, last = (high + 1, 65535 - count) if high + 1 <= 65535 - count else (1024, 65535 - count)
    for _ in range(200):
        base = _random.randint(first, last)
        block = set(range(base, base + count))
        if not block & _TAKEN and all(_bindable(port) for port in block):
            _TAKEN.update(block)
            return base
    raise RuntimeError(f"no {count} free consecutive ports in {first}-{last + count}")


def _bindable(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class Stack:
    plan: Plan
    folder: Path
    master_key: str
    ctx: RuntimeContext
    engines: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    gateway: subprocess.Popen[bytes] | None = None

    @classmethod
    def start(
        cls,
        spec_text: str,
        folder: Path,
        *,
        master_key: str,
        vllm_python: Path,
        database_url: str,
        env: dict[str, str] | None = None,
    ) -> Stack:
        folder.mkdir(parents=True, exist_ok=True)
        spec_env = {"TWLLM_MASTER_KEY": master_key, **(env or {})}
        loaded = parse_spec(
            spec_text.replace("@ENGINE_PORT@", str(free_block(ENGINE_PORTS))).replace(
                "@GATEWAY_PORT@", str(free_block(1))
            ),
            str(folder / "spec.yaml"),
            spec_env,
        )
        plan = make_plan(loaded, GpuInventory(0), folder / "state")
        ctx = RuntimeContext(
            state_dir=folder,
            secrets={ENGINE_KEY_ENV: ENGINE_KEY, "TWLLM_MASTER_KEY": master_key},
            vllm_python=vllm_python,
        )
        stack = cls(plan, folder, master_key, ctx)
        try:
            for proc in plan.engines:
                stack.start_engine(proc)
            for proc in plan.engines:
                stack.wait_engine(proc)
            rendered = folder / "rendered"
            render(plan, loaded.spec, rendered)
            launch = gateway_launch(
                plan.gateway, rendered, ctx.secrets, database_url=database_url, spool_dir=folder / "spool"
            )
            with (folder / "gateway.log").open("wb") as out:
                stack.gateway = subprocess.Popen(
                    launch.argv,
                    env={**child_env(launch.env), "OMP_NUM_THREADS": "1"},
                    cwd=launch.cwd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            stack.wait_gateway()
        except BaseException:
            stack.stop()
            raise
        return stack

    # --- engines ----------------------------------------------------------------------------
    def start_engine(self, proc: EngineProcess) -> None:
        launch = VllmDriver().launch(proc, self.ctx)
        with (self.folder / f"{proc.id}.log").open("ab") as out:
            self.engines[proc.id] = subprocess.Popen(
                launch.argv,
                env={**child_env(launch.env), "OMP_NUM_THREADS": "1"},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_engine(self, proc: EngineProcess) -> None:
        began = time.monotonic()
        while not VllmDriver().ready(proc, self.ctx):
            child = self.engines[proc.id]
            if child.poll() is not None or time.monotonic() - began > READY_TIMEOUT_S:
                raise RuntimeError(f"{proc.id} never became ready:\n{self.engine_log(proc.id)[-3000:]}")
            time.sleep(0.5)

    def kill_engine(self, engine_id: str) -> None:
        """kill -9 an engine's whole process group (the server and its engine core)."""
        child = self.engines[engine_id]
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()

    def engine_log(self, engine_id: str) -> str:
        return (self.folder / f"{engine_id}.log").read_text(errors="replace")

    def engine_url(self, model: str, replica: int = 0) -> str:
        proc = [e for e in self.plan.engines if model in e.models][replica]
        return f"http://127.0.0.1:{proc.port}/v1"

    # --- gateway ----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self.plan.gateway.url

    def gateway_log(self) -> str:
        return (self.folder / "gateway.log").read_text(errors="replace")

    def log_digest(self) -> str:
        """The gateway log's first error (with what follows it) and its last lines: a start that
        failed says why near the top, and the tail alone shows only the shutdown."""
        text = self.gateway_log()
        first = min((i for i in (text.find("Traceback"), text.find("ERROR")) if i >= 0), default=-1)
        head = text[max(0, first - 500) : first + 4000] if first >= 0 else ""
        return f"{head}\n[…]\n{text[-2000:]}" if head else text[-3000:]

    def wait_gateway(self) -> None:
        began = time.monotonic()
        live = self.url.removesuffix("/v1") + "/health/liveliness"
        while True:
            assert self.gateway is not None
            if self.gateway.poll() is not None or time.monotonic() - began > 120:
                raise RuntimeError(f"gateway never became ready (exit {self.gateway.poll()}):\n{self.log_digest()}")
            try:
                if httpx.get(live, timeout=2, trust_env=False, verify=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)

    def stop(self) -> None:
        if self.gateway is not None:
            _stop(self.gateway)
        for child in self.engines.values():
            _stop(child)
