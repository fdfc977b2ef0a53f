"""The supervisor's own Prometheus metrics: is each component up, and how often it was restarted.

``twllm_component_up{component,kind}`` (1 when ready) and
``twllm_component_restarts_total{component,kind}`` are read, at every scrape, from a snapshot the
supervisor hands in, and served from a private registry on 127.0.0.1 (never the process-wide one,
so nothing else this process imports can leak into them).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


@dataclass(frozen=True)
class ComponentSample:
    """One component as the metrics see it."""

    component: str
    kind: str
    up: bool
    restarts: int


class ComponentCollector(Collector):
    """Turns the supervisor's snapshot into the two component series at scrape time."""

    def __init__(self, snapshot: Callable[[], Iterable[ComponentSample]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "twllm_component_up", "1 when the component is ready, else 0.", labels=["component", "kind"]
        )
        restarts = CounterMetricFamily(
            "twllm_component_restarts",
            "Restarts of the component by the supervisor since it started.",
            labels=["component", "kind"],
        )
        for sample in self.snapshot():
            up.add_metric([sample.component, sample.kind], 1.0 if sample.up else 0.0)
            restarts.add_metric([sample.component, sample.kind], float(sample.restarts))
        yield up
        yield restarts


class MetricsServer:
    """The supervisor's /metrics listener (a busy port is reported, not fatal)."""

    def __init__(self, snapshot: Callable[[], Iterable[ComponentSample]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ComponentCollector(snapshot))
        self._server: Any = None
        self.port: int | None = None

    def start(self, port: int) -> bool:
        """Listen on 127.0.0.1:``port`` (moving there from another port, after a redeploy); False
        (and a line on stderr) when that is impossible."""
        if self._server is not None and self.port == port:
            return True
        self.stop()
        try:
            self._server, _thread = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        except OSError as exc:
            print(f"twllm: cannot serve component metrics on 127.0.0.1:{port}: {exc}", file=sys.stderr, flush=True)
            return False
        self.port = port
        return True

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            self.port = None
