"""Monitoring artefacts from a plan: Prometheus's scrape config and a Grafana dashboard.

``monitoring_files`` is pure and returns the files' text in a fixed order (prometheus.yml, then
twllm-dashboard.json), byte-identical for the same plan; ``render_monitoring`` writes them. The
gateway's bearer token is only ever named by its file (``authorization.credentials_file``): no
secret is rendered. Metric names: twllm's gateway series (twllm.gateway.metrics), the
supervisor's component series (twllm.runtime.metrics), and vLLM's own ``vllm:*``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from twllm.errors import PlanError
from twllm.files import write_atomic
from twllm.plan.model import MonitoringPlan, Plan, ScrapeTarget
from twllm.plan.monitoring import PROMETHEUS_CONFIG, SUPERVISOR_JOB

DASHBOARD_FILE = "twllm-dashboard.json"
DASHBOARD_SCHEMA_VERSION = 39
DATASOURCE_VAR = "datasource"

PANELS: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    (
        "Requests per second by model",
        "reqps",
        (
            ("sum by (model) (rate(twllm_requests_total[5m]))", "{{model}}"),
            ('sum by (model, status) (rate(twllm_requests_total{status!~"2.."}[5m]))', "{{model}} {{status}}"),
        ),
    ),
    (
        "Time to first token (p50, p95)",
        "s",
        (
            (
                "histogram_quantile(0.5, sum by (le, model) (rate(twllm_time_to_first_token_seconds_bucket[5m])))",
                "p50 {{model}}",
            ),
            (
                "histogram_quantile(0.95, sum by (le, model) (rate(twllm_time_to_first_token_seconds_bucket[5m])))",
                "p95 {{model}}",
            ),
        ),
    ),
    (
        "Request duration (p95)",
        "s",
        (
            (
                "histogram_quantile(0.95, sum by (le, model) (rate(twllm_request_duration_seconds_bucket[5m])))",
                "p95 {{model}}",
            ),
        ),
    ),
    (
        "Output tokens per second",
        "short",
        (
            ('sum by (model) (rate(twllm_tokens_total{direction="output"}[5m]))', "gateway {{model}}"),
            ("sum by (model_name) (rate(vllm:generation_tokens_total[5m]))", "engine {{model_name}}"),
        ),
    ),
    (
        "Spend per tenant (last hour)",
        "short",
        (("sum by (tenant, currency) (increase(twllm_spend_total[1h]))", "{{tenant}} {{currency}}"),),
    ),
    (
        "Guard blocks per second",
        "short",
        (
            (
                'sum by (stage, category) (rate(twllm_guard_verdicts_total{action="block"}[5m]))',
                "{{stage}} {{category}}",
            ),
        ),
    ),
    (
        "Engine KV-cache use",
        "percentunit",
        (("vllm:kv_cache_usage_perc", "{{component}}"),),
    ),
    (
        "Engine queue",
        "short",
        (
            ("vllm:num_requests_waiting", "waiting {{component}}"),
            ("vllm:num_requests_running", "running {{component}}"),
        ),
    ),
    (
        "Components up",
        "short",
        (
            ("twllm_component_up", "{{component}}"),
            ("sum by (component) (increase(twllm_component_restarts_total[1h]))", "restarts/h {{component}}"),
        ),
    ),
    (
        "Ledger",
        "short",
        (
            ("twllm_spool_rows", "spooled rows"),
            ("twllm_ledger_write_lag_seconds", "write lag (s)"),
            ("sum(increase(twllm_spool_write_failures_total[5m]))", "rows not journaled /5m (spool disk)"),
            ("sum by (result) (rate(twllm_key_cache_lookups_total[5m]))", "key cache {{result}}"),
        ),
    ),
)
"""(title, unit, ((PromQL, legend), …)) of every dashboard panel, in display order."""


def _scrape_config(target_group: list[ScrapeTarget], mon: MonitoringPlan) -> dict[str, Any]:
    first = target_group[0]
    config: dict[str, Any] = {"job_name": first.job, "scheme": first.scheme, "metrics_path": first.path}
    if first.job == SUPERVISOR_JOB:
        # Its series name the component they describe; the target's own `component` label must not
        # rename theirs to exported_component.
        config["honor_labels"] = True
    if first.bearer_env:
        config["authorization"] = {"type": "Bearer", "credentials_file": mon.credentials_file}
    if first.scheme == "https":
        config["tls_config"] = {"insecure_skip_verify": True}  # the gateway's own (often self-signed) cert
    config["static_configs"] = [
        {"targets": [t.address], "labels": {"component": t.component, **dict(sorted(t.labels.items()))}}
        for t in target_group
    ]
    return config


def prometheus_config(plan: Plan) -> dict[str, Any]:
    """prometheus.yml as data: one job per kind of target, targets in plan order."""
    mon = _monitoring(plan)
    jobs: dict[str, list[ScrapeTarget]] = {}
    for target in mon.targets:
        jobs.setdefault(target.job, []).append(target)
    interval = f"{mon.scrape_interval_s}s"
    return {
        "global": {
            "scrape_interval": interval,
            "evaluation_interval": interval,
            "external_labels": {"deployment": plan.name},
        },
        "scrape_configs": [_scrape_config(group, mon) for group in jobs.values()],
    }


def dashboard(plan: Plan) -> dict[str, Any]:
    """The Grafana dashboard (schemaVersion 39) with a Prometheus datasource variable."""
    datasource = {"type": "prometheus", "uid": f"${{{DATASOURCE_VAR}}}"}
    panels = []
    for index, (title, unit, queries) in enumerate(PANELS):
        panels.append(
            {
                "id": index + 1,
                "type": "timeseries",
                "title": title,
                "datasource": datasource,
                "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                "targets": [
                    {"refId": chr(ord("A") + n), "datasource": datasource, "expr": expr, "legendFormat": legend}
                    for n, (expr, legend) in enumerate(queries)
                ],
            }
        )
    return {
        "title": f"twllm — {plan.name}",
        "uid": f"twllm-{plan.name}"[:40],
        "tags": ["twllm"],
        "schemaVersion": DASHBOARD_SCHEMA_VERSION,
        "version": 1,
        "editable": True,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "",
        "templating": {
            "list": [
                {
                    "name": DATASOURCE_VAR,
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "regex": "",
                }
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def dashboard_expressions(board: dict[str, Any]) -> list[str]:
    """Every PromQL expression of a dashboard, panel by panel."""
    return [t["expr"] for panel in board["panels"] for t in panel["targets"]]


def monitoring_files(plan: Plan) -> dict[str, str]:
    """{file name: text}, in the order they are written."""
    header = "# Rendered by twllm from the deployment spec; edit the spec, not this file.\n"
    return {
        PROMETHEUS_CONFIG: header + yaml.safe_dump(prometheus_config(plan), sort_keys=False, allow_unicode=True),
        DASHBOARD_FILE: json.dumps(dashboard(plan), indent=2, ensure_ascii=False) + "\n",
    }


def render_monitoring(plan: Plan, out: Path) -> list[Path]:
    """Write prometheus.yml and the dashboard into ``out`` (each 0600, atomically); the paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in monitoring_files(plan).items():
        write_atomic(out / name, text)
        written.append(out / name)
    return written


def _monitoring(plan: Plan) -> MonitoringPlan:
    if plan.monitoring is None:
        raise PlanError("this plan has no monitoring section", hint="deploy (or render) the spec again")
    return plan.monitoring
