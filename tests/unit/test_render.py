"""Render: the LiteLLM config and gateway settings, their structure, secrets and stability."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from twllm.plan.build import make_plan
from twllm.plan.placement import GpuInventory
from twllm.render.litellm_config import gateway_settings, litellm_config, render
from twllm.spec.resolve import load_spec
from twllm.spec.schema import MetricsSpec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MASTER = "sk-render-master-9f8e7d"
DB_PASSWORD = "db-pw-4c3b2a"
ENV = {"TWLLM_MASTER_KEY": MASTER, "DATABASE_URL": f"postgresql://twllm:{DB_PASSWORD}@db:5432/twllm"}


def prod():
    loaded = load_spec(EXAMPLES / "prod.yaml", ENV)
    return loaded, make_plan(loaded, GpuInventory(8, 80, "test"), Path("/state"))


def test_every_replica_is_one_deployment_with_prices_and_engine_key():
    loaded, plan = prod()
    config = litellm_config(plan)
    deployments = config["model_list"]
    assert len(deployments) == len(plan.routes) == 6
    taide = [d for d in deployments if d["model_name"] == "taide-8b"]
    assert len(taide) == 2
    assert {d["litellm_params"]["api_base"] for d in taide} == {"http://127.0.0.1:8100/v1", "http://127.0.0.1:8101/v1"}
    for d in taide:
        assert d["litellm_params"]["model"] == "hosted_vllm/taide-8b"
        assert d["model_info"]["input_cost_per_token"] == 3.0 / 1e6
        # Not in litellm_params: LiteLLM would re-register the price on every request.
        assert "input_cost_per_token" not in d["litellm_params"]
        assert "output_cost_per_token" not in d["litellm_params"]
        assert d["model_info"]["output_cost_per_token"] == 6.0 / 1e6
        assert d["litellm_params"]["api_key"] == "os.environ/TWLLM_ENGINE_API_KEY"
        assert d["model_info"]["twllm_currency"] == "TWD"
    ids = [d["model_info"]["id"] for d in deployments]
    assert len(ids) == len(set(ids))
    phi = next(d for d in deployments if d["model_name"] == "phi-4-mini")
    assert phi["litellm_params"]["model"] == "ollama_chat/phi4-mini"
    assert phi["litellm_params"]["api_base"] == "http://127.0.0.1:11434"
    assert "api_key" not in phi["litellm_params"]
    bge = next(d for d in deployments if d["model_name"] == "bge-m3")
    assert bge["model_info"]["mode"] == "embedding"


def test_router_settings_replace_litellm_defaults():
    loaded, plan = prod()
    config = litellm_config(plan)
    router = config["router_settings"]
    assert router["timeout"] == 300 and router["num_retries"] == 2
    assert router["routing_strategy"] == "least-busy"
    assert router["fallbacks"] == [{"llama-3.3-70b": ["taide-8b"]}]
    assert router["optional_pre_call_checks"] == ["enforce_model_rate_limits"]  # taide-8b has rpm
    general = config["general_settings"]
    assert general["master_key"] == "os.environ/TWLLM_MASTER_KEY"
    assert general["background_health_checks"] is True


def test_no_secret_value_in_any_rendered_file(tmp_path):
    loaded, plan = prod()
    paths = render(plan, loaded.spec, tmp_path)
    assert sorted(p.name for p in paths) == ["gateway.json", "litellm_config.yaml", "plan.json"]
    for path in paths:
        text = path.read_text()
        assert MASTER not in text and DB_PASSWORD not in text, path.name
    settings = json.loads((tmp_path / "gateway.json").read_text())
    assert settings["database"] == {"embedded": False, "url_env": "DATABASE_URL", "url": None}
    assert settings["master_key_env"] == "TWLLM_MASTER_KEY"


def test_rendering_twice_is_byte_identical(tmp_path):
    loaded, plan = prod()
    render(plan, loaded.spec, tmp_path / "a")
    loaded2, plan2 = prod()
    render(plan2, loaded2.spec, tmp_path / "b")
    for name in ("litellm_config.yaml", "gateway.json", "plan.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_gateway_settings_carry_guard_and_prices_for_the_hooks():
    loaded, plan = prod()
    settings = gateway_settings(plan, loaded.spec)
    assert settings.guard.base["input"] == ["pii", "prompt_guard", "llama_guard"]
    assert settings.guard.base["pii"]["actions"] == {"credit_card": "block"}
    assert settings.models["taide-8b"].deployments == ("vllm-taide-8b-0", "vllm-taide-8b-1")
    assert settings.models["taide-8b"].price.currency == "TWD"


def test_rendered_yaml_round_trips(tmp_path):
    loaded, plan = prod()
    render(plan, loaded.spec, tmp_path)
    assert yaml.safe_load((tmp_path / "litellm_config.yaml").read_text()) == litellm_config(plan, loaded.spec)


def test_a_guard_model_served_here_is_for_the_guard_only(tmp_path):
    from twllm.spec.resolve import parse_spec

    text = """
name: guarded
gateway: {master_key: "${TWLLM_MASTER_KEY}"}
guard: {input: [llama_guard], llama_guard: {model: guard}}
models:
  - {name: guard, model: llama-guard-3-1b, replicas: 2}
  - {name: chat, model: llama-3.2-1b-instruct}
"""
    loaded = parse_spec(text, "guarded.yaml", ENV)
    plan = make_plan(loaded, GpuInventory(8, 80, "test"), tmp_path)
    config = litellm_config(plan, loaded.spec)
    assert [d["model_name"] for d in config["model_list"]] == ["chat"]
    assert config["guardrails"][0]["guardrail_name"] == "twllm-guard"
    remote = gateway_settings(plan, loaded.spec).guard.remote
    assert remote["guard"].api_bases == tuple(r.api_base for r in plan.routes if r.model_name == "guard")
    assert len(remote["guard"].api_bases) == 2
    assert plan.gateway.probe_model == "chat"  # the gateway's readiness probe never asks the guard


def test_metrics_on_by_default_add_litellms_prometheus_logger_and_the_gateway_section():
    loaded, plan = prod()
    settings = litellm_config(plan, loaded.spec)["litellm_settings"]
    assert settings["callbacks"] == ["twllm.accounting.hooks.spend_logger", "prometheus"]
    # No key hash or alias, no client-chosen value as a LiteLLM label.
    assert {"hashed_api_key", "api_key_alias", "end_user", "requested_model"} <= set(
        settings["prometheus_exclude_labels"]
    )
    # Series of features twllm does itself (spend, budgets, limits) are left out, by names LiteLLM
    # knows (it refuses to start on an unknown one); its request, latency and token series stay.
    from typing import get_args

    from litellm.types.integrations.prometheus import DEFINED_PROMETHEUS_METRICS

    excluded = set(settings["prometheus_exclude_metrics"])
    assert excluded <= set(get_args(DEFINED_PROMETHEUS_METRICS))
    assert {"litellm_spend_metric", "litellm_remaining_api_key_budget_metric"} <= excluded
    assert not excluded & {"litellm_requests_metric", "litellm_llm_api_time_to_first_token_metric"}
    metrics = gateway_settings(plan, loaded.spec).metrics
    assert metrics.enabled is True and metrics.port is None
    assert litellm_config(plan)["litellm_settings"]["callbacks"] == ["twllm.accounting.hooks.spend_logger"]


def test_metrics_off_or_on_a_port_of_their_own():
    loaded, plan = prod()
    off = loaded.spec.model_copy(
        update={"monitoring": loaded.spec.monitoring.model_copy(update={"metrics": MetricsSpec(enabled=False)})}
    )
    settings = litellm_config(plan, off)["litellm_settings"]
    assert settings["callbacks"] == ["twllm.accounting.hooks.spend_logger"]
    assert "prometheus_exclude_labels" not in settings
    assert gateway_settings(plan, off).metrics.enabled is False
    apart = loaded.spec.model_copy(
        update={"monitoring": loaded.spec.monitoring.model_copy(update={"metrics": MetricsSpec(port=9464)})}
    )
    assert gateway_settings(plan, apart).metrics.port == 9464
