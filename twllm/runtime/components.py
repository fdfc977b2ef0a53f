"""Components: the plan's processes (database, engines, gateway) as uniform things to supervise.

Each component knows how to launch itself, how to tell it is ready, what to provision once it
answers, and a fingerprint of everything that would make a running copy stale. The supervisor
treats them all alike, in order: database, engines, gateway, then the embedded Prometheus.
"""

from __future__ import annotations

import hashlib
import json
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from twllm.plan.model import EngineProcess, Plan
from twllm.plan.monitoring import PROMETHEUS_CONFIG
from twllm.render.litellm_config import GATEWAY_SETTINGS, LITELLM_CONFIG
from twllm.runtime.engines.base import Launch, Progress, RuntimeContext
from twllm.runtime.engines.drivers import driver_for
from twllm.runtime.gateway import gateway_launch, gateway_ready
from twllm.runtime.prometheus import launch as prometheus_launch
from twllm.runtime.prometheus import prepare as prometheus_prepare
from twllm.runtime.prometheus import ready as prometheus_ready

DATABASE_START_TIMEOUT_S = 60.0


@dataclass
class Component:
    """One supervised process."""

    name: str
    kind: str
    """database | engine | gateway | monitoring (also the start order)."""
    port: int | None
    start_timeout_s: float
    launch: Callable[[], Launch]
    ready: Callable[[], bool]
    provision: Callable[[Progress], None] = lambda progress: None
    prepare: Callable[[], None] = lambda: None
    """Run once before every launch (e.g. initdb); may raise RuntimeFailure."""
    after_ready: Callable[[], None] = lambda: None
    after_stop: Callable[[], None] = lambda: None
    """Run once the process has stopped (the gateway: store rows it journaled at exit)."""
    fingerprint: str = ""
    stop_timeout_s: float = 15.0
    stop_signal: int = signal.SIGTERM
    log_name: str = field(default="")

    def __post_init__(self) -> None:
        self.log_name = self.log_name or self.name


KIND_ORDER = {"database": 0, "engine": 1, "gateway": 2, "monitoring": 3}


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_components(plan: Plan, ctx: RuntimeContext, rendered: Path) -> list[Component]:
    """Every component of ``plan``, in start order."""
    components: list[Component] = []
    if plan.database.embedded:
        components.append(_database(plan, ctx))
    for proc in plan.engines:
        components.append(_engine(proc, ctx))
    gw = plan.gateway
    master_key = ctx.secrets[gw.master_key_env]
    config_text = [
        (rendered / name).read_text() if (rendered / name).exists() else ""
        for name in (LITELLM_CONFIG, GATEWAY_SETTINGS)
    ]
    components.append(
        Component(
            name="gateway",
            kind="gateway",
            port=gw.port,
            start_timeout_s=gw.start_timeout_s,
            launch=lambda: gateway_launch(
                gw,
                rendered,
                ctx.secrets,
                database_url_for(plan, ctx),
                ctx.state_dir / "spool",
                metrics_dir=ctx.state_dir / "gateway-metrics",
            ),
            prepare=lambda: _migrate(plan, ctx),
            after_stop=lambda: _replay_spool(plan, ctx),
            ready=lambda: gateway_ready(gw, master_key),
            fingerprint=_digest(gw, config_text, hashlib.sha256(master_key.encode()).hexdigest()),
            stop_timeout_s=20.0,
        )
    )
    mon = plan.monitoring
    if mon is not None and mon.prometheus is not None:
        prom = mon.prometheus
        components.append(
            Component(
                name="prometheus",
                kind="monitoring",
                port=prom.port,
                start_timeout_s=prom.start_timeout_s,
                launch=lambda: prometheus_launch(mon),
                prepare=lambda: prometheus_prepare(mon, ctx.secrets),
                ready=lambda: prometheus_ready(prom),
                fingerprint=_digest(
                    mon,
                    (rendered / PROMETHEUS_CONFIG).read_text() if (rendered / PROMETHEUS_CONFIG).exists() else "",
                    hashlib.sha256(master_key.encode()).hexdigest(),
                ),
            )
        )
    return components


def database_url_for(plan: Plan, ctx: RuntimeContext) -> str | None:
    """The URL the gateway's hooks, migrations and maintenance use: the embedded server's (with the
    password from <state_dir>/secrets/db_password; never log it), or the spec's external one."""
    db = plan.database
    if db.embedded:
        from twllm.runtime.database import EmbeddedPostgres

        return EmbeddedPostgres(Path(db.data_dir or ctx.state_dir / "postgres"), db.port or 15432).url
    return db.url or (ctx.secrets.get(db.url_env) if db.url_env else None)


def _replay_spool(plan: Plan, ctx: RuntimeContext) -> None:
    """Rows the gateway journaled at exit reach the ledger now, while PostgreSQL still runs."""
    from twllm.accounting.ledger import replay_folder

    url, spool = database_url_for(plan, ctx), ctx.state_dir / "spool"
    if url and spool.exists():
        try:
            replay_folder(url, spool)
        except Exception:  # noqa: BLE001 - the rows stay journaled and replay at the next start
            pass


def _migrate(plan: Plan, ctx: RuntimeContext) -> None:
    """Bring the accounting schema up to date before the gateway (and its hooks) start."""
    from twllm.accounting.migrate import migrate

    url = database_url_for(plan, ctx)
    if url:
        migrate(url)


def _engine(proc: EngineProcess, ctx: RuntimeContext) -> Component:
    driver = driver_for(proc.engine)
    return Component(
        name=proc.id,
        kind="engine",
        port=proc.port,
        start_timeout_s=proc.start_timeout_s,
        launch=lambda: driver.launch(proc, ctx),
        ready=lambda: driver.ready(proc, ctx),
        provision=lambda progress: driver.provision(proc, ctx, progress),
        fingerprint=_digest(proc.argv, proc.env, proc.secret_env, proc.provision, str(ctx.vllm_python)),
    )


def _database(plan: Plan, ctx: RuntimeContext) -> Component:
    from twllm.runtime.database import STOP_SIGNAL, EmbeddedPostgres

    db = EmbeddedPostgres(Path(plan.database.data_dir or ctx.state_dir / "postgres"), plan.database.port or 15432)
    return Component(
        name="database",
        kind="database",
        port=plan.database.port,
        start_timeout_s=DATABASE_START_TIMEOUT_S,
        launch=db.launch,
        ready=db.ready,
        prepare=db.initialize,
        after_ready=db.ensure_database,
        fingerprint=_digest(plan.database),
        stop_timeout_s=30.0,
        stop_signal=STOP_SIGNAL,  # SIGINT: a fast shutdown that does not wait for clients
    )
