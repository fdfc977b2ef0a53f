"""The files that cross process boundaries, written and read by one class each: plan.json (Plan),
gateway.json (GatewaySettings), and the statuses in state.json (StrEnums written as plain strings)."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from twllm.accounting.gateway_config import GatewayConfig, Price
from twllm.errors import ContractError
from twllm.gateway.asgi import http_settings_from_env
from twllm.gateway.settings import GatewaySettings, HttpSettings
from twllm.guard.policy import GuardPolicies
from twllm.plan.build import make_plan
from twllm.plan.model import Plan
from twllm.plan.placement import GpuInventory
from twllm.render.litellm_config import GATEWAY_SETTINGS, PLAN_FILE, gateway_settings, render
from twllm.runtime.control import status
from twllm.runtime.state import ComponentState, ComponentStatus, DeploymentState, DeploymentStatus, StateDir
from twllm.settings import DATABASE_URL_ENV, GATEWAY_SETTINGS_ENV
from twllm.spec.resolve import parse_spec

MASTER = "sk-contract-master"
ENV = {"TWLLM_MASTER_KEY": MASTER, "ACME_DB_URL": "postgresql://app:pw@db.internal/twllm"}
SPEC = """
name: contracts
gateway:
  master_key: ${TWLLM_MASTER_KEY}
  max_request_bytes: 4096
  cors_origins: [https://app.example.tw, https://admin.example.tw]
  fallbacks: {chat: [small]}
database:
  url: ${ACME_DB_URL}
  ledger_retention_days: 400
guard:
  input: [pii, llama_guard]
  output: [pii, zh_tw]
  llama_guard: {model: guard}
  pii: {action: mask, entities: [tw_national_id, email]}
  zh_tw: {system_prompt: 用臺灣繁體中文回答。}
  policies:
    strict: {pii: {action: block}}
    silent: {input: [], output: []}
models:
  - name: chat
    model: llama-3.1-8b-instruct
    replicas: 2
    price: {input_per_1m: 3.0, output_per_1m: 6.0, currency: TWD}
    rpm: 600
  - name: small
    model: llama-3.2-1b-instruct
    zh_tw: false
    system_prompt: Be brief.
    guard: {pii: {actions: {email: block}}}
    price: {input_per_1m: 0.5, output_per_1m: 1.25, currency: USD}
  - {name: guard, model: llama-guard-3-1b, replicas: 2}
  - {name: local, model: phi-4-mini-instruct, engine: ollama, price: {input_per_1m: 0.2}}
"""


def deployment(tmp_path: Path):
    loaded = parse_spec(SPEC, str(tmp_path / "contracts.yaml"), ENV)
    return loaded, make_plan(loaded, GpuInventory(8, 80, "test"), tmp_path / "state")


# --- plan.json ---------------------------------------------------------------------------------


def test_a_plan_written_and_read_back_is_the_same_plan(tmp_path: Path) -> None:
    loaded, plan = deployment(tmp_path)
    assert plan.engines and plan.routes and plan.database.retention_days == 400  # a plan with every part
    text = plan.to_json()
    assert Plan.from_json(text) == plan
    assert Plan.from_json(text).to_json() == text  # and byte for byte
    paths = render(plan, loaded.spec, tmp_path / "rendered")
    written = next(p for p in paths if p.name == PLAN_FILE)
    assert Plan.read(written) == plan
    sd = StateDir(tmp_path / "sd")
    sd.ensure()
    sd.plan.write_text(text)
    assert sd.read_plan() == plan
    # Tuples stay tuples after reading (a JSON list becomes the field's type, not a list).
    again = Plan.read(written)
    assert isinstance(again.engines, tuple) and isinstance(again.engines[0].argv, tuple)
    assert isinstance(again.gateway.cors_origins, tuple)


def test_plan_json_keeps_its_keys(tmp_path: Path) -> None:
    _, plan = deployment(tmp_path)
    data = json.loads(plan.to_json())
    assert list(data) == [
        "name",
        "spec_file",
        "state_dir",
        "gpus_total",
        "gateway",
        "database",
        "engines",
        "routes",
        "notes",
        "vllm_python",
        "monitoring",
    ]
    assert data["database"] == {
        "embedded": False,
        "data_dir": None,
        "port": None,
        "url_env": "ACME_DB_URL",
        "url": None,
        "retention_days": 400,
    }
    assert data["gateway"]["cors_origins"] == ["https://app.example.tw", "https://admin.example.tw"]
    assert set(data["engines"][0]) >= {"id", "argv", "env", "secret_env", "gpus", "provision"}
    assert MASTER not in plan.to_json() and "pw@" not in plan.to_json()


def test_a_plan_with_an_unknown_key_is_refused_by_name(tmp_path: Path) -> None:
    _, plan = deployment(tmp_path)
    data = plan.to_dict()
    data["gateway"]["surprise"] = 1
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ContractError) as caught:
        Plan.read(path)
    assert str(caught.value) == f"{path} is not a plan this twllm can read: gateway.surprise: unknown key"
    assert "rewrite plan.json" in (caught.value.hint or "")
    del data["gateway"]["surprise"]
    data["engines"][0]["port"] = "not a port"
    with pytest.raises(ContractError, match=r"engines\.0\.port: Input should be a valid integer"):
        Plan.from_json(json.dumps(data))
    with pytest.raises(ContractError, match="is not a plan"):
        Plan.from_json("{not json")


def test_a_plan_is_frozen(tmp_path: Path) -> None:
    _, plan = deployment(tmp_path)
    with pytest.raises(ValueError, match="frozen"):
        plan.name = "other"  # type: ignore[misc]


# --- gateway.json ------------------------------------------------------------------------------


def test_gateway_json_reads_back_through_the_hooks_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded, plan = deployment(tmp_path)
    rendered = tmp_path / "rendered"
    render(plan, loaded.spec, rendered)
    path = rendered / GATEWAY_SETTINGS
    built = gateway_settings(plan, loaded.spec)
    read = GatewaySettings.load(path)
    assert read == built
    assert path.read_text(encoding="utf-8") == built.to_json()

    # what each section holds
    assert sorted(read.guard.policies) == ["silent", "strict"]
    assert read.guard.policies["strict"] == {"pii": {"action": "block"}}
    assert read.guard.models["small"].zh_tw is False and read.guard.models["small"].system_prompt == "Be brief."
    assert read.guard.remote["guard"].api_bases == tuple(r.api_base for r in plan.routes if r.model_name == "guard")
    assert read.http == HttpSettings(
        max_request_bytes=4096, cors_origins=("https://app.example.tw", "https://admin.example.tw")
    )
    assert read.database.url_env == "ACME_DB_URL" and read.database.url is None and not read.database.embedded
    assert read.models["chat"].deployments == ("vllm-chat-0", "vllm-chat-1")
    assert read.models["small"].price.currency == "USD"

    # accounting: prices, master key and database through GatewayConfig
    config = GatewayConfig.from_env({GATEWAY_SETTINGS_ENV: str(path), **ENV})
    assert config.master_key == MASTER
    assert config.database_url == ENV["ACME_DB_URL"]
    assert config.price("chat") == Price(Decimal("0.000003"), Decimal("0.000006"), "TWD")
    assert config.price("small") == Price(Decimal("5E-7"), Decimal("0.00000125"), "USD")
    for route in plan.routes:  # every model at its route's price, the float written as JSON shows it
        assert config.price(route.model_name) == Price(
            Decimal(str(route.input_cost_per_token or 0)),
            Decimal(str(route.output_cost_per_token or 0)),
            route.currency,
        )
    assert GatewayConfig.from_env({GATEWAY_SETTINGS_ENV: str(path), DATABASE_URL_ENV: "postgresql://x"}).database_url
    # guard: the same verdict settings as straight from the spec, plus the served guard model
    from_file = GuardPolicies.from_settings(read.guard)
    from_spec = GuardPolicies.from_spec(loaded.spec)
    for model in ("chat", "small", None):
        for policy in ("strict", "silent", None):
            assert from_file.resolve(model, policy) == from_spec.resolve(model, policy)
    assert from_file.system_prompt("small") == "Be brief."
    assert from_file.remote["guard"].api_bases == read.guard.remote["guard"].api_bases
    # the shield: the http section
    monkeypatch.setenv(GATEWAY_SETTINGS_ENV, str(path))
    assert http_settings_from_env() == read.http
    monkeypatch.delenv(GATEWAY_SETTINGS_ENV)
    assert http_settings_from_env() == HttpSettings()


def test_gateway_json_with_an_unknown_key_is_refused_by_name(tmp_path: Path) -> None:
    loaded, plan = deployment(tmp_path)
    data = gateway_settings(plan, loaded.spec).model_dump(mode="json")
    data["guard"]["remote"]["guard"]["api_base"] = "http://typo"
    path = tmp_path / "gateway.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ContractError) as caught:
        GatewaySettings.load(path)
    message = str(caught.value)
    assert message == f"{path} is not gateway settings this twllm can read: guard.remote.guard.api_base: unknown key"
    # The hooks guard their read with `except (OSError, ValueError)`: a ContractError is one.
    with pytest.raises(ValueError, match="unknown key"):
        GatewayConfig.from_env({GATEWAY_SETTINGS_ENV: str(path)})
    path.write_text(json.dumps({"models": {"chat": {"price": {"input_per_token": 1e-6}}}, "extra": True}))
    with pytest.raises(ContractError, match=r"gateway settings this twllm can read: extra: unknown key$"):
        GatewaySettings.load(path)


def test_a_partial_gateway_json_takes_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "gateway.json"
    path.write_text(json.dumps({"guard": {"policies": {"strict": {}}}}))
    settings = GatewaySettings.load(path)
    assert settings.http == HttpSettings() and settings.models == {} and settings.master_key_env is None
    assert sorted(settings.guard.policies) == ["strict"]


# --- statuses ----------------------------------------------------------------------------------


def test_statuses_are_written_as_their_plain_strings(tmp_path: Path) -> None:
    assert [s.value for s in ComponentStatus] == [
        "waiting",
        "provisioning",
        "starting",
        "ready",
        "restarting",
        "failed",
        "stopped",
    ]
    state = DeploymentState(
        name="d",
        status=DeploymentStatus.DEGRADED,
        components=[ComponentState(name="gateway", kind="gateway", status=ComponentStatus.RESTARTING)],
    )
    data = json.loads(json.dumps(state.to_dict()))
    assert data["status"] == "degraded" and data["components"][0]["status"] == "restarting"
    sd = StateDir(tmp_path)
    sd.ensure()
    sd.write_state(state)
    text = sd.state_file.read_text()
    assert '"status": "degraded"' in text and '"status": "restarting"' in text
    back = sd.read_state()
    assert back is not None
    assert back.status is DeploymentStatus.DEGRADED and back.components[0].status is ComponentStatus.RESTARTING
    # Read from plain strings, compared with plain strings, printed as plain strings.
    assert ComponentState(name="x", kind="engine", status="ready").status is ComponentStatus.READY  # type: ignore[arg-type]
    assert DeploymentStatus.READY == "ready" and f"{DeploymentStatus.READY}" == "ready"
    # `twllm status --json` shows the same strings.
    report = json.loads(json.dumps(status(sd)))
    assert report["status"] == "supervisor dead"  # a degraded stack without its supervisor
    assert report["components"][0]["status"] == "restarting"
