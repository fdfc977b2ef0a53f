"""The embedded Prometheus: the host's ``prometheus`` binary, run by the supervisor after the gateway.

It reads the rendered prometheus.yml; the gateway's bearer token (the master key) is written,
0600, to the plan's credentials file just before each start, so the key is never in a rendered
file. Ready when ``/-/ready`` answers 200.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import httpx

from twllm.errors import RuntimeFailure
from twllm.files import write_atomic
from twllm.plan.model import MonitoringPlan, PrometheusPlan
from twllm.runtime.engines.base import Launch
from twllm.runtime.state import mkdir_private

BINARY = "prometheus"
INSTALL_HINT = "install it (Debian/Ubuntu: apt install prometheus) or set monitoring.prometheus: off"


def find_prometheus() -> str | None:
    """The ``prometheus`` executable on PATH, or None."""
    return shutil.which(BINARY)


def prepare(mon: MonitoringPlan, secrets: Mapping[str, str]) -> None:
    """The data folder (0700) and the bearer-token file the scrape config names (0600)."""
    prom = _embedded(mon)
    mkdir_private(Path(prom.data_dir))
    bearer = next((t.bearer_env for t in mon.targets if t.bearer_env), None)
    if bearer:
        credentials = Path(mon.credentials_file)
        mkdir_private(credentials.parent)
        write_atomic(credentials, secrets.get(bearer, ""))


def launch(mon: MonitoringPlan) -> Launch:
    prom = _embedded(mon)
    binary = find_prometheus()
    if binary is None:
        raise RuntimeFailure(f"`{BINARY}` is not installed", hint=INSTALL_HINT)
    return Launch(argv=[binary, *prom.argv[1:]], cwd=Path(prom.data_dir))


def ready(prom: PrometheusPlan) -> bool:
    try:
        return httpx.get(prom.ready_url, timeout=2.0, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def _embedded(mon: MonitoringPlan) -> PrometheusPlan:
    if mon.prometheus is None:
        raise RuntimeFailure("this plan runs no embedded Prometheus")
    return mon.prometheus
