"""The monitoring part of a plan: every /metrics endpoint, and the embedded Prometheus's command.

Pure, like the rest of the plan stage. The gateway's /metrics is on its own port with the master
key as a bearer token, or on ``monitoring.metrics.port`` without one; every vLLM engine serves its
own /metrics (outside the /v1 paths its API key guards); the supervisor serves the component
metrics on a port the plan allocates. Ollama serves no metrics and is not scraped.
"""

from __future__ import annotations

from pathlib import Path

from twllm.plan.model import EngineProcess, GatewayPlan, MonitoringPlan, PrometheusPlan, ScrapeTarget
from twllm.spec.schema import MonitoringSpec

RENDERED_DIR = "rendered"
"""Where deploy writes the rendered files inside the state directory."""
PROMETHEUS_CONFIG = "prometheus.yml"
PROMETHEUS_DATA_DIR = "prometheus"
CREDENTIALS_FILE = "secrets/metrics_bearer"
"""Inside the state directory: the bearer token the embedded Prometheus sends to the gateway."""
GATEWAY_JOB = "twllm-gateway"
ENGINE_JOB = "vllm"
SUPERVISOR_JOB = "twllm-supervisor"


def connect_host(host: str) -> str:
    """The address a local client uses for a listener bound to ``host``."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def monitoring_plan(
    mon: MonitoringSpec,
    gateway: GatewayPlan,
    engines: tuple[EngineProcess, ...],
    state_dir: Path,
    supervisor_port: int | None,
) -> MonitoringPlan:
    """Scrape targets in a fixed order (gateway, engines in plan order, supervisor) and the
    embedded Prometheus when the spec asks for one."""
    targets: list[ScrapeTarget] = []
    if mon.metrics.enabled:
        tls = gateway.tls_cert is not None
        if mon.metrics.port is not None:
            address, bearer, scheme = f"{connect_host(gateway.host)}:{mon.metrics.port}", None, "http"
        else:
            address = f"{connect_host(gateway.host)}:{gateway.port}"
            bearer, scheme = gateway.master_key_env or None, "https" if tls else "http"
        targets.append(
            ScrapeTarget(job=GATEWAY_JOB, component="gateway", scheme=scheme, address=address, bearer_env=bearer)
        )
    for engine in engines:
        if engine.engine != "vllm":
            continue
        targets.append(
            ScrapeTarget(
                job=ENGINE_JOB,
                component=engine.id,
                scheme="http",
                address=f"{connect_host(engine.host)}:{engine.port}",
                labels={"model": engine.models[0]},
            )
        )
    if supervisor_port is not None:
        targets.append(
            ScrapeTarget(
                job=SUPERVISOR_JOB, component="supervisor", scheme="http", address=f"127.0.0.1:{supervisor_port}"
            )
        )
    prometheus = None
    if mon.prometheus == "embedded":
        config_file = str(state_dir / RENDERED_DIR / PROMETHEUS_CONFIG)
        data_dir = str(state_dir / PROMETHEUS_DATA_DIR)
        prometheus = PrometheusPlan(
            port=mon.prometheus_port,
            config_file=config_file,
            data_dir=data_dir,
            retention_days=mon.retention_days,
            argv=(
                "prometheus",
                f"--config.file={config_file}",
                f"--storage.tsdb.path={data_dir}",
                f"--storage.tsdb.retention.time={mon.retention_days}d",
                f"--web.listen-address=127.0.0.1:{mon.prometheus_port}",
            ),
            ready_url=f"http://127.0.0.1:{mon.prometheus_port}/-/ready",
        )
    return MonitoringPlan(
        metrics_enabled=mon.metrics.enabled,
        scrape_interval_s=mon.scrape_interval_s,
        supervisor_port=supervisor_port,
        credentials_file=str(state_dir / CREDENTIALS_FILE),
        targets=tuple(targets),
        prometheus=prometheus,
    )
