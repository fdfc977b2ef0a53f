"""Monitoring: the plan's scrape targets and embedded Prometheus, the rendered prometheus.yml and
Grafana dashboard (stable, secret-free, accepted by promtool), the supervisor's component metrics,
`twllm render monitoring`, and the preflight that wants the prometheus binary."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import generate_latest

from twllm.cli.app import main
from twllm.errors import PlanError, RuntimeFailure
from twllm.plan.build import make_plan
from twllm.plan.model import Plan
from twllm.plan.placement import GpuInventory
from twllm.render.monitoring import DASHBOARD_FILE, dashboard_expressions, monitoring_files
from twllm.runtime import prometheus as prometheus_runtime
from twllm.runtime.control import preflight
from twllm.runtime.metrics import ComponentSample, MetricsServer
from twllm.runtime.ports import free_port
from twllm.runtime.state import StateDir
from twllm.spec.resolve import parse_spec

MASTER = "sk-monitoring-unit-master"
ENV = {"TWLLM_MASTER_KEY": MASTER}
STATE = Path("/srv/twllm-state")
MODELS = (
    "models:\n"
    "  - {name: small, model: llama-3.1-8b-instruct, replicas: 2}\n"
    "  - {name: embed, model: bge-m3}\n"
    "  - {name: local, model: llama-3.2-1b-instruct, engine: ollama}\n"
)


def plan_of(monitoring: str = "", models: str = MODELS, state: Path = STATE) -> Plan:
    text = f"name: mon\ngateway: {{port: 4000, master_key: '${{TWLLM_MASTER_KEY}}'}}\n{monitoring}{models}"
    return make_plan(parse_spec(text, "mon.yaml", ENV), GpuInventory(8, None, "test"), state)


# --- plan ----------------------------------------------------------------------------------------


def test_by_default_the_gateway_every_vllm_engine_and_the_supervisor_are_scraped() -> None:
    plan = plan_of()
    mon = plan.monitoring
    assert mon is not None and mon.metrics_enabled and mon.prometheus is None
    assert [(t.job, t.component) for t in mon.targets] == [
        ("twllm-gateway", "gateway"),
        ("vllm", "vllm-small-0"),
        ("vllm", "vllm-small-1"),
        ("vllm", "vllm-embed-0"),
        ("twllm-supervisor", "supervisor"),
    ]  # Ollama serves no /metrics
    gateway = mon.targets[0]
    assert (gateway.address, gateway.bearer_env, gateway.scheme) == ("127.0.0.1:4000", "TWLLM_MASTER_KEY", "http")
    engines = {e.id: e.port for e in plan.engines}
    assert mon.targets[1].address == f"127.0.0.1:{engines['vllm-small-0']}" and mon.targets[1].bearer_env is None
    assert mon.targets[1].labels == {"model": "small"}
    # The supervisor's port comes after every engine's, clashing with none.
    assert mon.supervisor_port is not None and mon.supervisor_port not in {*engines.values(), 4000}
    assert mon.supervisor_port > max(p for name, p in engines.items() if name.startswith("vllm"))
    assert mon.credentials_file == str(STATE / "secrets" / "metrics_bearer")


def test_turning_metrics_on_or_off_moves_no_engine() -> None:
    on, off = plan_of(), plan_of("monitoring: {metrics: {enabled: false}}\n")
    assert [e.port for e in on.engines] == [e.port for e in off.engines]
    assert off.monitoring is not None and off.monitoring.supervisor_port is None
    assert [t.job for t in off.monitoring.targets] == ["vllm", "vllm", "vllm"]


def test_a_metrics_port_is_scraped_without_the_key() -> None:
    mon = plan_of("monitoring: {metrics: {port: 9400}}\n").monitoring
    assert mon is not None
    gateway = mon.targets[0]
    assert (gateway.address, gateway.bearer_env) == ("127.0.0.1:9400", None)


def test_embedded_prometheus_has_its_argv_data_dir_and_port() -> None:
    mon = plan_of("monitoring: {prometheus: embedded, prometheus_port: 9191, retention_days: 7}\n").monitoring
    assert mon is not None and mon.prometheus is not None
    prom = mon.prometheus
    assert prom.argv == (
        "prometheus",
        f"--config.file={STATE}/rendered/prometheus.yml",
        f"--storage.tsdb.path={STATE}/prometheus",
        "--storage.tsdb.retention.time=7d",
        "--web.listen-address=127.0.0.1:9191",
    )
    assert prom.ready_url == "http://127.0.0.1:9191/-/ready"
    assert prom.data_dir == f"{STATE}/prometheus"


def test_a_prometheus_port_that_clashes_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="port 4000 of prometheus is already used by gateway"):
        plan_of("monitoring: {prometheus: embedded, prometheus_port: 4000}\n")


def test_the_monitoring_plan_reads_back_from_plan_json() -> None:
    plan = plan_of("monitoring: {prometheus: embedded}\n")
    assert Plan.from_json(plan.to_json()) == plan
    assert Plan.from_json(plan.to_json()).to_json() == plan.to_json()


# --- rendered files ------------------------------------------------------------------------------


def test_prometheus_yml_scrapes_every_target_with_the_key_only_by_file() -> None:
    files = monitoring_files(plan_of())
    assert list(files) == ["prometheus.yml", DASHBOARD_FILE]
    config = yaml.safe_load(files["prometheus.yml"])
    assert config["global"]["scrape_interval"] == "15s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert list(jobs) == ["twllm-gateway", "vllm", "twllm-supervisor"]
    assert jobs["twllm-gateway"]["authorization"] == {
        "type": "Bearer",
        "credentials_file": str(STATE / "secrets" / "metrics_bearer"),
    }
    assert "authorization" not in jobs["vllm"] and "authorization" not in jobs["twllm-supervisor"]
    assert jobs["twllm-supervisor"]["honor_labels"] is True  # its `component` labels stay theirs
    assert [c["labels"]["component"] for c in jobs["vllm"]["static_configs"]] == [
        "vllm-small-0",
        "vllm-small-1",
        "vllm-embed-0",
    ]
    for text in files.values():
        assert MASTER not in text


def test_rendering_is_stable() -> None:
    assert monitoring_files(plan_of()) == monitoring_files(plan_of())


def test_the_dashboard_has_a_datasource_variable_and_the_panels_asked_for() -> None:
    board = json.loads(monitoring_files(plan_of())[DASHBOARD_FILE])
    assert board["schemaVersion"] == 39
    variable = board["templating"]["list"][0]
    assert (variable["type"], variable["query"], variable["name"]) == ("datasource", "prometheus", "datasource")
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
    exprs = "\n".join(dashboard_expressions(board))
    for needed in (
        "twllm_requests_total",
        "histogram_quantile(0.5, sum by (le, model) (rate(twllm_time_to_first_token_seconds_bucket[5m])))",
        "histogram_quantile(0.95, sum by (le, model) (rate(twllm_time_to_first_token_seconds_bucket[5m])))",
        'rate(twllm_tokens_total{direction="output"}[5m])',
        "vllm:generation_tokens_total",
        "twllm_spend_total",
        'twllm_guard_verdicts_total{action="block"}',
        "vllm:kv_cache_usage_perc",
        "vllm:num_requests_waiting",
        "twllm_component_up",
        "twllm_spool_write_failures_total",
    ):
        assert needed in exprs, needed
    assert "$__" not in exprs  # plain PromQL: evaluates in Prometheus itself, not only in Grafana
    ids = [p["id"] for p in board["panels"]]
    assert ids == sorted(set(ids))


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_rendered_config(tmp_path: Path) -> None:
    plan = plan_of("monitoring: {prometheus: embedded}\n", state=tmp_path)
    assert plan.monitoring is not None
    (tmp_path / "secrets").mkdir()
    Path(plan.monitoring.credentials_file).write_text("token")
    config = tmp_path / "prometheus.yml"
    config.write_text(monitoring_files(plan)["prometheus.yml"])
    check = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


# --- the supervisor's metrics ------------------------------------------------------------------


def test_component_metrics_are_served_from_a_private_registry() -> None:
    samples = [ComponentSample("database", "database", True, 0), ComponentSample("gateway", "gateway", False, 3)]
    server = MetricsServer(lambda: samples)
    text = generate_latest(server.registry).decode()
    assert 'twllm_component_up{component="database",kind="database"} 1.0' in text
    assert 'twllm_component_up{component="gateway",kind="gateway"} 0.0' in text
    assert 'twllm_component_restarts_total{component="gateway",kind="gateway"} 3.0' in text
    assert "python_gc" not in text and "process_" not in text
    port = free_port()
    assert server.start(port)
    try:
        scraped = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5, trust_env=False).text
        assert "twllm_component_restarts_total" in scraped
        samples.append(ComponentSample("prometheus", "monitoring", True, 0))  # read at every scrape
        scraped = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5, trust_env=False).text
        assert 'twllm_component_up{component="prometheus",kind="monitoring"} 1.0' in scraped
        assert not MetricsServer(lambda: []).start(port)  # a busy port is reported, not raised
        moved = free_port()
        assert server.start(moved) and server.port == moved  # a redeploy that moves the port
        assert "twllm_component_up" in httpx.get(f"http://127.0.0.1:{moved}/metrics", timeout=5, trust_env=False).text
    finally:
        server.stop()


# --- CLI and preflight ---------------------------------------------------------------------------


def test_render_monitoring_writes_both_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: mon\ngateway: {master_key: '${TWLLM_MASTER_KEY}'}\n" + MODELS)
    out = tmp_path / "out"
    args = ["-c", str(spec), "--out", str(out), "--gpus", "8", "--state-dir", str(tmp_path / "state")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TWLLM_MASTER_KEY", MASTER)
        assert main(["render", "monitoring", *args]) == 0
        assert sorted(p.name for p in out.iterdir()) == ["prometheus.yml", DASHBOARD_FILE]
        assert main(["render", *args]) == 0  # the plain form still writes the gateway's files
        assert {"litellm_config.yaml", "gateway.json", "plan.json"} <= {p.name for p in out.iterdir()}
        assert main(["render", "dashboards", *args]) != 0
    assert MASTER not in capsys.readouterr().out
    for path in out.iterdir():
        assert MASTER not in path.read_text()


def test_preflight_fails_before_anything_starts_without_prometheus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (
        "name: mon\ngateway: {master_key: '${TWLLM_MASTER_KEY}'}\nmonitoring: {prometheus: embedded}\n"
        "models:\n  - {name: local, model: llama-3.2-1b-instruct, engine: ollama}\n"
    )
    loaded = parse_spec(text, "mon.yaml", ENV)
    plan = make_plan(loaded, GpuInventory(0, None, "test"), tmp_path)
    monkeypatch.setattr(prometheus_runtime, "find_prometheus", lambda: None)
    with pytest.raises(RuntimeFailure) as info:
        preflight(loaded, plan, StateDir(tmp_path))
    assert "`prometheus` is not installed" in info.value.message
    assert "apt install prometheus" in info.value.message
    assert info.value.hint == "nothing was started or changed"
    assert not (tmp_path / "state.json").exists()


def test_deploy_says_where_the_console_the_metrics_and_prometheus_are() -> None:
    from twllm.cli.runtime_cmds import _monitoring_urls

    assert _monitoring_urls(plan_of()) == [
        ("console", "http://127.0.0.1:4000/console"),
        ("metrics", "http://127.0.0.1:4000/metrics"),
    ]
    separate = plan_of("monitoring: {metrics: {port: 9400}, prometheus: embedded, prometheus_port: 9191}\n")
    assert _monitoring_urls(separate) == [
        ("console", "http://127.0.0.1:4000/console"),
        ("metrics", "http://127.0.0.1:9400/metrics"),
        ("prometheus", "http://127.0.0.1:9191/graph"),
    ]
    assert _monitoring_urls(plan_of("monitoring: {metrics: {enabled: false}}\n")) == [
        ("console", "http://127.0.0.1:4000/console")
    ]
