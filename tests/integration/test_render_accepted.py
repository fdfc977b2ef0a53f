"""LiteLLM itself accepts what twllm renders: its Router keeps every deployment and setting, and
the real proxy starts from the rendered file and routes every model name."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from proxyutil import ProxyHandle, start_proxy

from twllm.plan.build import ENGINE_KEY_ENV, make_plan
from twllm.plan.placement import GpuInventory
from twllm.render.litellm_config import litellm_config, render
from twllm.spec.resolve import load_spec, parse_spec

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MASTER = "sk-accept-test-master"
ENV = {"TWLLM_MASTER_KEY": MASTER, "DATABASE_URL": "postgresql://twllm:pw@db/twllm"}

# Every provider twllm renders: vLLM chat with replicas, vLLM embeddings, Ollama chat and
# embeddings, fallbacks and rate limits.
MIXED = """
name: accept
gateway:
  master_key: ${TWLLM_MASTER_KEY}
  request_timeout_s: 42
  num_retries: 3
  routing_strategy: least-busy
  cooldown_s: 7
  allowed_fails: 2
  health_check_interval_s: 45
models:
  - {name: chat-a, model: llama-3.2-1b-instruct, replicas: 2, rpm: 100, price: {input_per_1m: 5, output_per_1m: 10}}
  - {name: chat-b, model: phi-4-mini-instruct, engine: ollama, fallbacks: [chat-a]}
  - {name: emb-v, model: bge-m3}
  - {name: emb-o, model: bge-m3, engine: ollama}
"""


def rendered(text_or_path: str | Path) -> dict:
    if isinstance(text_or_path, Path):
        loaded = load_spec(text_or_path, ENV)
    else:
        loaded = parse_spec(text_or_path, "mixed.yaml", ENV)
    plan = make_plan(loaded, GpuInventory(8, 80, "test"), Path("/tmp/twllm-accept-state"))
    return litellm_config(plan)


@pytest.mark.parametrize(
    "source", [MIXED, EXAMPLES / "prod.yaml", EXAMPLES / "local.yaml"], ids=["mixed", "prod", "local"]
)
def test_router_keeps_every_deployment_and_setting(source, monkeypatch):
    from litellm import Router
    from litellm.constants import ROUTER_SETTINGS_MANAGED_OUTSIDE_CONFIG
    from litellm.types.router import OptionalPreCallChecks
    from pydantic import TypeAdapter

    monkeypatch.setenv("TWLLM_MASTER_KEY", MASTER)
    monkeypatch.setenv(ENGINE_KEY_ENV, "sk-engine-test")
    config = rendered(source)
    settings = config["router_settings"]
    # The proxy silently drops router settings Router.__init__ does not take.
    valid = set(Router.get_valid_args()) - set(ROUTER_SETTINGS_MANAGED_OUTSIDE_CONFIG)
    assert set(settings) <= valid, set(settings) - valid
    assert isinstance(config["general_settings"]["health_check_interval"], int)  # else checks are silently off
    TypeAdapter(OptionalPreCallChecks).validate_python(settings.get("optional_pre_call_checks", []))

    model_list = config["model_list"]
    router = Router(model_list=copy.deepcopy(model_list), **settings)
    try:
        assert len(router.model_list) == len(model_list)
        names = {d["model_name"] for d in model_list}
        assert set(router.get_model_names()) == names
        assert router.timeout == settings["timeout"]
        assert router.num_retries == settings["num_retries"]
        assert router.cooldown_time == settings["cooldown_time"]
        assert router.allowed_fails == settings["allowed_fails"]
        assert router.routing_strategy == settings["routing_strategy"]
        assert router.enable_pre_call_checks is False  # the engine refuses an overlong prompt itself
        for rule in settings.get("fallbacks", []):
            for source_name, targets in rule.items():
                assert {source_name, *targets} <= names
        assert (router.fallbacks or []) == settings.get("fallbacks", [])
        for d in router.model_list:
            assert d["model_info"]["id"] == next(
                m["model_info"]["id"]
                for m in model_list
                if m["litellm_params"]["api_base"] == d["litellm_params"]["api_base"]
                and m["model_name"] == d["model_name"]
            )
    finally:
        router.discard()


@pytest.fixture(scope="module")
def mixed_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHandle]:
    out = tmp_path_factory.mktemp("rendered")
    loaded = parse_spec(MIXED, "mixed.yaml", ENV)
    plan = make_plan(loaded, GpuInventory(8, 80, "test"), out / "state")
    render(plan, loaded.spec, out)
    with start_proxy(
        out / "litellm_config.yaml",
        env={"TWLLM_MASTER_KEY": MASTER, ENGINE_KEY_ENV: "sk-engine-test"},
        # LiteLLM's own command line: what LiteLLM makes of the rendered file, its
        # routing shown by its own errors and /model/info (twllm's gateway hides both)
        timeout=300,
        entry="litellm",
    ) as handle:
        yield handle


def test_proxy_starts_from_the_rendered_file_without_dropping_anything(mixed_proxy):
    log = mixed_proxy.log_text()
    for marker in ("Traceback", "is not a valid argument", "Ignoring this key", "Invalid deployment"):
        assert marker not in log, f"{marker!r} in the proxy log:\n{log[-3000:]}"


def test_proxy_lists_every_model_and_routes_each_to_its_engine_port(mixed_proxy):
    headers = {"Authorization": f"Bearer {MASTER}"}
    listed = httpx.get(f"{mixed_proxy.base_url}/v1/models", headers=headers, timeout=30, trust_env=False)
    assert listed.status_code == 200
    assert {m["id"] for m in listed.json()["data"]} == {"chat-a", "chat-b", "emb-v", "emb-o"}
    # No engine runs here (that is the runtime's job), so the proof of routing is where the proxy
    # tried to connect: the port the plan gave each model's engine.
    for name, ports in (("chat-a", (8100, 8101)), ("chat-b", (11434,))):
        reply = httpx.post(
            f"{mixed_proxy.base_url}/v1/chat/completions",
            headers=headers,
            timeout=60,
            trust_env=False,
            json={"model": name, "messages": [{"role": "user", "content": "你好"}]},
        )
        if reply.status_code == 429:
            # a failed replica of a model with several is cooled down at once (REPLICA_DOWN_POLICY): the
            # retries tried every replica, which the cooldown list names
            assert "cooldown" in reply.text and all(f"vllm-{name}-{i}" in reply.text for i in range(len(ports)))
            continue
        assert reply.status_code >= 500, reply.text
        assert any(f":{p}" in reply.text or f", {p})" in reply.text for p in ports), reply.text
    unknown = httpx.post(
        f"{mixed_proxy.base_url}/v1/chat/completions",
        headers=headers,
        timeout=30,
        trust_env=False,
        json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert unknown.status_code == 400


def test_proxy_model_info_carries_prices_and_no_secret(mixed_proxy):
    headers = {"Authorization": f"Bearer {MASTER}"}
    info = httpx.get(f"{mixed_proxy.base_url}/model/info", headers=headers, timeout=30, trust_env=False)
    assert info.status_code == 200
    data = info.json()["data"]
    chat_a = [d for d in data if d["model_name"] == "chat-a"]
    assert len(chat_a) == 2
    assert {d["model_info"]["id"] for d in chat_a} == {"vllm-chat-a-0", "vllm-chat-a-1"}
    for d in chat_a:
        assert d["model_info"]["input_cost_per_token"] == pytest.approx(5e-6)
        assert d["model_info"]["output_cost_per_token"] == pytest.approx(1e-5)
    text = json.dumps(info.json())
    assert "sk-engine-test" not in text and MASTER not in text


def test_rendered_file_on_disk_is_what_litellm_loaded(tmp_path):
    loaded = parse_spec(MIXED, "mixed.yaml", ENV)
    plan = make_plan(loaded, GpuInventory(8, 80, "test"), tmp_path / "state")
    render(plan, loaded.spec, tmp_path)
    on_disk = yaml.safe_load((tmp_path / "litellm_config.yaml").read_text())
    assert on_disk == litellm_config(plan, loaded.spec)
    assert MASTER not in (tmp_path / "litellm_config.yaml").read_text()
