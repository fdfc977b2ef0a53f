"""Plan: GPU packing, port allocation, registry inheritance, engine argv and env."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from twllm.errors import PlanError
from twllm.plan.build import ENGINE_KEY_ENV, engine_flags, make_plan
from twllm.plan.placement import GpuInventory
from twllm.spec.resolve import parse_spec

ENV = {"TWLLM_MASTER_KEY": "sk-plan-test"}
STATE = Path("/srv/twllm-state")


def plan_of(models_yaml: str, gpus: int = 8, memory: float | None = None, extra: str = ""):
    text = f"name: t\ngateway: {{master_key: '${{TWLLM_MASTER_KEY}}'}}\n{extra}models:\n{models_yaml}"
    loaded = parse_spec(text, "t.yaml", ENV)
    return make_plan(loaded, GpuInventory(gpus, memory, "test"), STATE)


def engine(plan, engine_id):
    return plan.engine(engine_id)


def flag(argv, name):
    argv = list(argv)
    return argv[argv.index(name) + 1]


def test_tensor_parallel_groups_are_aligned_and_single_gpu_replicas_fill_the_rest():
    plan = plan_of(
        "  - {name: small, model: llama-3.1-8b-instruct, replicas: 2}\n"
        "  - {name: big, model: llama-3.3-70b-instruct, tensor_parallel: 4}\n"
        "  - {name: mid, model: mistral-small-24b-instruct-2501, tensor_parallel: 2}\n"
    )
    assert engine(plan, "vllm-big-0").gpus == (0, 1, 2, 3)
    assert engine(plan, "vllm-mid-0").gpus == (4, 5)
    assert {engine(plan, "vllm-small-0").gpus, engine(plan, "vllm-small-1").gpus} == {(6,), (7,)}
    assert engine(plan, "vllm-big-0").env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    assert flag(engine(plan, "vllm-big-0").argv, "--tensor-parallel-size") == "4"
    used = [g for e in plan.engines for g in e.gpus]
    assert len(used) == len(set(used)) == 8


def test_fleet_that_does_not_fit_lists_what_each_model_needs():
    with pytest.raises(PlanError) as info:
        plan_of(
            "  - {name: small, model: llama-3.1-8b-instruct, replicas: 3}\n"
            "  - {name: big, model: llama-3.3-70b-instruct, tensor_parallel: 4}\n",
            gpus=4,
        )
    message = info.value.message
    assert "need 7 GPU(s) but 4 are available" in message
    assert "small: 3 replica(s) × 1 GPU(s) = 3" in message
    assert "big: 1 replica(s) × 4 GPU(s) = 4" in message


def test_fragmented_fleet_is_reported():
    # 1 + 2 + 2 fits 5 GPUs only if the pairs are packed: aligned first-fit must still succeed.
    plan = plan_of(
        "  - {name: a, model: llama-3.1-8b-instruct}\n"
        "  - {name: b, model: mistral-small-24b-instruct-2501, tensor_parallel: 2, replicas: 2}\n",
        gpus=5,
    )
    assert sorted(e.gpus for e in plan.engines) == [(0, 1), (2, 3), (4,)]


def test_weights_that_do_not_fit_gpu_memory_suggest_tensor_parallel():
    with pytest.raises(PlanError) as info:
        plan_of("  - {name: big, model: llama-3.3-70b-instruct, gpus: 1}\n", memory=80)
    assert "131.5 GiB of weights" in info.value.message
    assert "tensor_parallel: 2" in info.value.hint
    # fp8 quantisation halves the weights: 65.7 GiB fits 80 GiB × 0.9.
    plan = plan_of("  - {name: big, model: llama-3.3-70b-instruct, quantization: fp8}\n", memory=80)
    assert flag(plan.engines[0].argv, "--quantization") == "fp8"


def test_ports_count_up_skip_the_gateway_and_fixed_ports_and_are_deterministic():
    models = (
        "  - {name: a, model: llama-3.1-8b-instruct, replicas: 2}\n"
        "  - {name: b, model: llama-3.2-1b-instruct, port: 8101}\n"
        "  - {name: c, model: llama-3.2-3b-instruct}\n"
    )
    extra = "engines: {port_base: 8099}\n"
    text_gateway = "name: t\ngateway: {master_key: '${TWLLM_MASTER_KEY}', port: 8100}\n" + extra + "models:\n" + models
    loaded = parse_spec(text_gateway, "t.yaml", ENV)
    plan = make_plan(loaded, GpuInventory(8), STATE)
    ports = {e.id: e.port for e in plan.engines}
    assert ports == {"vllm-a-0": 8099, "vllm-a-1": 8102, "vllm-b-0": 8101, "vllm-c-0": 8103}
    again = make_plan(parse_spec(text_gateway, "t.yaml", ENV), GpuInventory(8), STATE)
    assert json.dumps(again.to_dict()) == json.dumps(plan.to_dict())


def test_fixed_port_clash_is_an_error():
    with pytest.raises(PlanError, match="port 4000 of vllm-a-0 is already used by gateway"):
        plan_of("  - {name: a, model: llama-3.1-8b-instruct, port: 4000}\n")


def test_registry_defaults_are_inherited_and_spec_overrides_them():
    plan = plan_of(
        "  - {name: m, model: mistral-7b-instruct-v0.3}\n"
        "  - name: m2\n    model: mistral-7b-instruct-v0.3\n"
        "    engine_args: {tool-call-parser: hermes, enable-auto-tool-choice: false}\n"
    )
    argv = engine(plan, "vllm-m-0").argv
    assert argv[:3] == ("vllm", "serve", "mistralai/Mistral-7B-Instruct-v0.3")
    assert flag(argv, "--tokenizer-mode") == "mistral"
    assert flag(argv, "--tool-call-parser") == "mistral"
    assert "--enable-auto-tool-choice" in argv
    argv2 = engine(plan, "vllm-m2-0").argv
    assert flag(argv2, "--tool-call-parser") == "hermes"
    assert "--no-enable-auto-tool-choice" in argv2 and "--enable-auto-tool-choice" not in argv2
    assert flag(argv2, "--tokenizer-mode") == "mistral"  # untouched defaults stay


def test_max_model_len_defaults_to_registry_context_in_routes():
    plan = plan_of(
        "  - {name: m, model: llama-3.1-8b-instruct}\n  - {name: n, model: llama-3.1-8b-instruct, max_model_len: 4096}\n"
    )
    routes = {r.model_name: r for r in plan.routes}
    assert routes["m"].max_input_tokens == 131072
    assert routes["n"].max_input_tokens == 4096
    assert "--max-model-len" not in engine(plan, "vllm-m-0").argv
    assert flag(engine(plan, "vllm-n-0").argv, "--max-model-len") == "4096"


def test_embedding_models_use_the_pooling_runner_and_embedding_routes():
    plan = plan_of("  - {name: e, model: bge-m3}\n")
    e = plan.engines[0]
    assert flag(e.argv, "--runner") == "pooling"
    assert "--enable-prefix-caching" not in e.argv
    assert plan.routes[0].task == "embed"


def test_cpu_engines_get_the_cpu_target_and_a_kv_cache_size_and_no_gpus():
    plan = plan_of("  - {name: c, model: llama-3.2-1b-instruct, device: cpu, dtype: float32}\n", gpus=0)
    e = plan.engines[0]
    assert e.env["VLLM_TARGET_DEVICE"] == "cpu" and e.env["CUDA_VISIBLE_DEVICES"] == ""
    assert e.gpus == ()
    assert flag(e.argv, "--kv-cache-memory-bytes") == "1G"
    assert flag(e.argv, "--dtype") == "float32"


def test_engines_keep_idle_connections_longer_than_the_gateway_does():
    """The server must close idle connections last: the gateway's LiteLLM reuses one for
    AIOHTTP_KEEPALIVE_TIMEOUT, and a request sent on one the engine was closing failed with a
    500 the engine never logged (and put a serving replica in cooldown in a CI chaos run)."""
    from litellm.constants import AIOHTTP_KEEPALIVE_TIMEOUT

    plan = plan_of(
        "  - {name: a, model: llama-3.1-8b-instruct}\n  - {name: c, model: llama-3.2-1b-instruct, device: cpu}\n"
    )
    assert len(plan.engines) == 2
    for e in plan.engines:
        assert int(e.env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"]) > AIOHTTP_KEEPALIVE_TIMEOUT + 30


def test_engine_api_key_is_a_reference_never_a_value():
    plan = plan_of("  - {name: a, model: llama-3.1-8b-instruct}\n")
    e = plan.engines[0]
    assert e.secret_env == {"VLLM_API_KEY": ENGINE_KEY_ENV}
    assert "--api-key" not in e.argv
    assert plan.routes[0].api_key_env == ENGINE_KEY_ENV
    assert "sk-plan-test" not in json.dumps(plan.to_dict())
    assert plan.gateway.master_key_env == "TWLLM_MASTER_KEY"


def test_ollama_models_share_one_server_with_provisioning_and_provider_prefixes():
    plan = plan_of(
        "  - {name: phi, model: phi-4-mini-instruct, engine: ollama}\n"
        "  - {name: emb, model: bge-m3, engine: ollama}\n"
        "  - {name: local, source: {gguf: ./w/model.gguf}}\n",
        extra="ollama: {port: 11500, num_parallel: 4, keep_alive: 10m}\n",
    )
    assert [e.id for e in plan.engines] == ["ollama"]
    o = plan.engines[0]
    assert o.argv == ("ollama", "serve")
    assert o.env["OLLAMA_HOST"] == "127.0.0.1:11500"
    assert o.env["OLLAMA_NUM_PARALLEL"] == "4" and o.env["OLLAMA_KEEP_ALIVE"] == "10m"
    assert o.env["OLLAMA_MODELS"] == str(STATE / "ollama" / "models")
    assert o.ready_url == "http://127.0.0.1:11500/api/tags"
    assert o.provision[0] == {"name": "phi4-mini", "pull": "phi4-mini"}
    assert o.provision[2]["name"] == "twllm-local" and o.provision[2]["gguf"].endswith("w/model.gguf")
    routes = {r.model_name: r for r in plan.routes}
    assert routes["phi"].provider_model == "ollama_chat/phi4-mini"
    assert routes["emb"].provider_model == "ollama/bge-m3"
    assert routes["phi"].api_base == "http://127.0.0.1:11500"


def test_prices_become_per_token_costs_and_limits_split_across_replicas():
    plan = plan_of(
        "  - {name: a, model: llama-3.1-8b-instruct, replicas: 2, rpm: 100, tpm: 9000, "
        "price: {input_per_1m: 3, output_per_1m: 6}}\n"
    )
    for route in plan.routes:
        assert route.input_cost_per_token == pytest.approx(3e-6)
        assert route.output_cost_per_token == pytest.approx(6e-6)
        assert route.currency == "TWD"
        assert (route.rpm, route.tpm) == (50, 4500)


def test_fallbacks_merge_gateway_and_model_level():
    text = (
        "name: t\ngateway: {master_key: '${TWLLM_MASTER_KEY}', fallbacks: {a: [b]}}\nmodels:\n"
        "  - {name: a, model: llama-3.1-8b-instruct}\n  - {name: b, model: llama-3.2-1b-instruct, fallbacks: [a]}\n"
    )
    plan = make_plan(parse_spec(text, "t.yaml", ENV), GpuInventory(2), STATE)
    assert plan.gateway.fallbacks == {"a": ["b"], "b": ["a"]}


def test_embedded_database_lives_in_the_state_dir_and_external_is_referenced():
    plan = plan_of("  - {name: a, model: llama-3.1-8b-instruct}\n")
    assert plan.database.embedded and plan.database.data_dir == str(STATE / "postgres")
    text = (
        "name: t\ngateway: {master_key: '${TWLLM_MASTER_KEY}'}\ndatabase: {url: '${DATABASE_URL}'}\n"
        "models:\n  - {name: a, model: llama-3.1-8b-instruct}\n"
    )
    env = {**ENV, "DATABASE_URL": "postgresql://u:pw-s3cr3t-xyz@db/x"}
    plan = make_plan(parse_spec(text, "t.yaml", env), GpuInventory(1), STATE)
    assert not plan.database.embedded and plan.database.url_env == "DATABASE_URL"
    assert "pw-s3cr3t-xyz" not in json.dumps(plan.to_dict())


def test_gated_models_get_a_note():
    plan = plan_of("  - {name: a, model: llama-3.1-8b-instruct}\n  - {name: p, model: phi-4}\n")
    assert any("a:" in n and "gated" in n for n in plan.notes)
    assert not any(n.startswith("p:") for n in plan.notes)


def test_engine_flags_are_sorted_and_typed():
    assert engine_flags({"z": False, "a": True, "m": 3, "l": ["x", "y"]}) == [
        "--a",
        "--l",
        "x",
        "y",
        "--m",
        "3",
        "--no-z",
    ]


def test_examples_plan(monkeypatch):
    env = {**ENV, "DATABASE_URL": "postgresql://u:p@db/twllm"}
    root = Path(__file__).resolve().parents[2] / "examples"
    from twllm.spec.resolve import load_spec

    prod = make_plan(load_spec(root / "prod.yaml", env), GpuInventory(8, 80, "test"), STATE)
    assert sum(len(e.gpus) for e in prod.engines) == 8
    local = make_plan(load_spec(root / "local.yaml", env), GpuInventory(0), STATE)
    assert {e.device for e in local.engines} == {"cpu"}
    assert {r.task for r in local.routes} == {"chat", "embed"}


def test_plan_round_trips_through_json():
    from twllm.plan.model import Plan

    plan = plan_of(
        "  - {name: a, model: llama-3.1-8b-instruct, replicas: 2}\n"
        "  - {name: phi, model: phi-4-mini-instruct, engine: ollama}\n"
    )
    assert Plan.from_json(plan.to_json()) == plan


def test_ledger_retention_reaches_the_plan():
    plan = plan_of("  - {name: a, model: llama-3.1-8b-instruct}\n", extra="database: {ledger_retention_days: 400}\n")
    assert plan.database.retention_days == 400
    assert plan_of("  - {name: a, model: llama-3.1-8b-instruct}\n").database.retention_days is None


def test_gateway_workers_default_to_the_usable_cores_at_most_eight(monkeypatch):
    from twllm.plan import build

    for cores, workers in ((1, 1), (2, 2), (6, 6), (64, build.MAX_DEFAULT_WORKERS)):
        monkeypatch.setattr(build.os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert plan_of("  - {name: a, model: llama-3.2-1b-instruct}").gateway.workers == workers
    # A spec that names the number gets it, whatever the machine.
    spec = 'name: w\ngateway: {master_key: "${K}", workers: 3}\nmodels:\n  - {name: a, model: llama-3.2-1b-instruct}\n'
    loaded = parse_spec(spec, "w.yaml", {"K": "sk-test-0123456789"})
    assert make_plan(loaded, GpuInventory(8), Path("/tmp/s")).gateway.workers == 3
