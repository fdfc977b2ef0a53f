"""Aliases, fallbacks, context-window fallbacks and routing, from the spec to the ledger row.

Pure: the spec's rules, the plan and the rendered files, the allow-list semantics of aliases
(``twllm.accounting.names``), the spend logger's choice of the one failure event that is a
request's outcome (``twllm.accounting.outcomes``), and the ledger row's two model names. The
real proxy and engines are in tests/integration/test_aliases_fallbacks.py.
"""

from __future__ import annotations

import asyncio
import os
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from twllm.accounting import hooks
from twllm.accounting.auth import Authenticator, KeyInfo, Rejection
from twllm.accounting.gateway_config import GatewayConfig, Price
from twllm.accounting.keys import hash_key
from twllm.accounting.ledger import row_from_logging
from twllm.accounting.names import ModelNames
from twllm.accounting.outcomes import FailureHold
from twllm.accounting.usage import UsageFilter, build_query
from twllm.errors import SpecError
from twllm.plan.build import make_plan
from twllm.plan.placement import GpuInventory
from twllm.render.litellm_config import gateway_settings, litellm_config
from twllm.spec.resolve import parse_spec

MASTER = "sk-alias-unit-master"
ENV = {"TWLLM_MASTER_KEY": MASTER}
BASE = """
name: t
gateway:
  master_key: ${TWLLM_MASTER_KEY}
%s
models:
  - {name: taide-8b, model: llama-3.1-8b-instruct, replicas: 2, price: {input_per_1m: 3, output_per_1m: 6}}
  - {name: small, model: llama-3.2-1b-instruct, price: {input_per_1m: 1, output_per_1m: 1}}
  - {name: long, model: llama-3.2-1b-instruct}
  - {name: emb, model: bge-m3}
"""


def spec(gateway: str = "", extra_models: str = "") -> str:
    return BASE % "\n".join("  " + line for line in gateway.strip().splitlines()) + extra_models


def issues(text: str) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as caught:
        parse_spec(text, "t.yaml", ENV)
    return [(i.path, i.message) for i in caught.value.issues]


def planned(text: str):
    loaded = parse_spec(text, "t.yaml", ENV)
    return loaded, make_plan(loaded, GpuInventory(8, 80, "test"), Path("/state"))


# --- spec -------------------------------------------------------------------------------------


def test_aliases_and_fallbacks_that_name_what_clients_can_call_validate():
    planned(
        spec("""
aliases: {gpt-4o-mini: taide-8b, gpt-4o: long}
fallbacks: {taide-8b: [small, gpt-4o], gpt-4o-mini: [small]}
context_window_fallbacks: {small: [long]}
routing_strategy: latency
""")
    )


@pytest.mark.parametrize(
    "gateway, path, message",
    [
        ("aliases: {small: taide-8b}", "gateway.aliases.small", "already the name of a model"),
        ("aliases: {gpt: nothing}", "gateway.aliases.gpt", "no model named 'nothing'"),
        ("aliases: {a: taide-8b, b: a}", "gateway.aliases.b", "'a' is an alias itself"),
        ("fallbacks: {taide-8b: [nothing]}", "gateway.fallbacks.taide-8b[0]", "no model named 'nothing'"),
        ("context_window_fallbacks: {x: [long]}", "gateway.context_window_fallbacks.x", "no model named 'x'"),
        ("fallbacks: {taide-8b: [emb]}", "gateway.fallbacks.taide-8b[0]", "'emb' is a embed model"),
        ("aliases: {e: emb}\nfallbacks: {small: [e]}", "gateway.fallbacks.small[0]", "cannot stand in for the chat"),
    ],
)
def test_names_that_clients_cannot_call_are_spec_errors(gateway, path, message):
    found = issues(spec(gateway))
    assert any(p == path and message in m for p, m in found), found


def test_an_alias_of_a_guard_model_served_for_the_guard_is_refused():
    text = (
        spec("aliases: {guardian: lg}").replace(
            "gateway:\n", "guard: {input: [llama_guard], llama_guard: {model: lg}}\ngateway:\n"
        )
        + "  - {name: lg, model: llama-guard-3-1b}\n"
    )
    assert any("answers the guard only" in m for _, m in issues(text))


def test_routing_takes_the_issue_short_names_and_litellm_names():
    for given, litellm_name in (
        ("latency", "latency-based-routing"),
        ("least-busy", "least-busy"),
        ("simple-shuffle", "simple-shuffle"),
        ("latency-based-routing", "latency-based-routing"),
        ("usage-based-routing-v2", "usage-based-routing-v2"),
    ):
        _, plan = planned(spec(f"routing_strategy: {given}"))
        assert plan.gateway.routing_strategy == litellm_name
    assert any("routing_strategy" in p for p, _ in issues(spec("routing_strategy: fastest")))


# --- plan and render --------------------------------------------------------------------------


def test_an_alias_falls_back_as_its_model_unless_it_has_its_own():
    _, plan = planned(
        spec("""
aliases: {gpt-4o-mini: taide-8b, gpt-4o: taide-8b}
fallbacks: {taide-8b: [small], gpt-4o: [long]}
context_window_fallbacks: {taide-8b: [long]}
""")
    )
    gw = plan.gateway
    assert gw.aliases == {"gpt-4o": "taide-8b", "gpt-4o-mini": "taide-8b"}
    assert gw.fallbacks == {"gpt-4o": ["long"], "gpt-4o-mini": ["small"], "taide-8b": ["small"]}
    assert gw.context_window_fallbacks == {"gpt-4o": ["long"], "gpt-4o-mini": ["long"], "taide-8b": ["long"]}


def test_the_router_gets_aliases_and_both_kinds_of_fallbacks_and_gateway_json_the_same():
    from litellm import Router

    loaded, plan = planned(
        spec("""
aliases: {gpt-4o-mini: taide-8b}
fallbacks: {taide-8b: [small]}
context_window_fallbacks: {small: [long]}
""")
    )
    router = litellm_config(plan, loaded.spec)["router_settings"]
    assert router["model_group_alias"] == {"gpt-4o-mini": "taide-8b"}
    assert router["fallbacks"] == [{"gpt-4o-mini": ["small"]}, {"taide-8b": ["small"]}]
    assert router["context_window_fallbacks"] == [{"small": ["long"]}]
    assert {"model_group_alias", "fallbacks", "context_window_fallbacks"} <= set(Router.get_valid_args())
    routing = gateway_settings(plan, loaded.spec).routing
    assert routing.aliases == {"gpt-4o-mini": "taide-8b"}
    assert routing.fallbacks == {"gpt-4o-mini": ["small"], "taide-8b": ["small"]}
    assert routing.context_window_fallbacks == {"small": ["long"]}
    names = ModelNames.from_settings(gateway_settings(plan, loaded.spec))
    assert names.deployments == {
        "vllm-taide-8b-0": "taide-8b",
        "vllm-taide-8b-1": "taide-8b",
        "vllm-small-0": "small",
        "vllm-long-0": "long",
        "vllm-emb-0": "emb",
    }


def test_no_aliases_or_context_fallbacks_render_nothing_new():
    loaded, plan = planned(spec(""))
    router = litellm_config(plan, loaded.spec)["router_settings"]
    assert not {"model_group_alias", "context_window_fallbacks", "fallbacks"} & set(router)


# --- allow-lists --------------------------------------------------------------------------------

NAMES = ModelNames(
    aliases={"gpt-4o-mini": "taide-8b", "gpt-4o": "taide-8b", "mini": "small"},
    fallbacks={"taide-8b": ("small", "long"), "gpt-4o-mini": ("small", "long"), "small": ("taide-8b",)},
    context_window_fallbacks={"small": ("long",)},
    deployments={"vllm-taide-8b-0": "taide-8b", "vllm-small-0": "small"},
)


def test_an_alias_and_its_model_are_one_model_to_an_allow_list():
    assert NAMES.allowed(["gpt-4o-mini"]) == {"gpt-4o-mini", "gpt-4o", "taide-8b"}
    assert NAMES.allowed(["taide-8b"]) == {"gpt-4o-mini", "gpt-4o", "taide-8b"}
    assert NAMES.allowed(["small", "long"]) == {"small", "mini", "long"}
    assert NAMES.listed(["gpt-4o-mini"]) == ["gpt-4o-mini", "gpt-4o", "taide-8b"]
    assert NAMES.listed(["long", "taide-8b"]) == ["long", "taide-8b", "gpt-4o", "gpt-4o-mini"]


def test_fallbacks_a_key_may_not_use_are_left_out_and_none_when_nothing_is():
    assert NAMES.allowed_fallbacks(NAMES.allowed(["taide-8b", "small", "long"]), "fallbacks") is None
    assert NAMES.allowed_fallbacks(NAMES.allowed(["gpt-4o-mini", "long"]), "fallbacks") == [
        {"taide-8b": ["long"]},
        {"gpt-4o-mini": ["long"]},
        {"small": ["taide-8b"]},
    ]
    assert NAMES.allowed_fallbacks(NAMES.allowed(["taide-8b"]), "fallbacks") == [{"small": ["taide-8b"]}]
    assert NAMES.allowed_fallbacks(NAMES.allowed(["small"]), "context_window_fallbacks") == []


def test_the_model_that_answered_is_the_deployment_s_model():
    assert NAMES.answered("vllm-taide-8b-0", "gpt-4o-mini") == "taide-8b"
    assert NAMES.answered(None, "gpt-4o-mini") == "taide-8b"  # no deployment (all cooled down)
    assert NAMES.answered("elsewhere", "small") == "small"


def _key(models: tuple[str, ...] | None) -> KeyInfo:
    return KeyInfo(id=7, tenant_id=3, tenant="moe", prefix="sk-tw-AbCdEf", models=models)


class _Cache:
    def __init__(self, keys: dict[str, KeyInfo]) -> None:
        self.keys = {hash_key(k): v for k, v in keys.items()}

    async def get(self, key_hash: bytes) -> KeyInfo | None:
        return self.keys.get(key_hash)


class _Limiter:
    async def admit(self, *args: Any) -> Any:
        from twllm.accounting.limits import RateDecision

        return RateDecision(True)


def _auth(keys: dict[str, KeyInfo]) -> Authenticator:
    return Authenticator(None, MASTER, cache=_Cache(keys), limiter=_Limiter(), names=NAMES)  # type: ignore[arg-type]


def test_a_key_allowed_one_name_may_call_every_name_of_that_model_and_nothing_else():
    auth = _auth({"sk-tw-alias": _key(("gpt-4o-mini",)), "sk-tw-model": _key(("taide-8b",))})
    for secret in ("sk-tw-alias", "sk-tw-model"):
        for asked in (["gpt-4o-mini"], ["taide-8b"], ["gpt-4o"], ["/v1/models/gpt-4o-mini"]):
            route = asked[0] if asked[0].startswith("/") else "/v1/chat/completions"
            models = [] if route != "/v1/chat/completions" else asked
            assert asyncio.run(auth.authenticate(secret, route, models)).key is not None, (secret, asked)
        for refused in (["small"], ["mini"], ["gpt-4o-mini", "small"]):  # client-side fallback too
            with pytest.raises(Rejection) as caught:
                asyncio.run(auth.authenticate(secret, "/v1/chat/completions", refused))
            assert (caught.value.status, caught.value.code) == (403, "model_not_allowed")


def test_v1_models_lists_every_name_the_key_may_call():
    identity = asyncio.run(_auth({"sk-tw-a": _key(("gpt-4o-mini",))}).authenticate("sk-tw-a", "/v1/models"))
    auth_object = hooks.user_api_key_auth_object(identity, "sk-tw-a", NAMES)
    assert auth_object.models == ["gpt-4o-mini", "gpt-4o", "taide-8b"]
    every = asyncio.run(_auth({"sk-tw-all": _key(None)}).authenticate("sk-tw-all", "/v1/models"))
    assert hooks.user_api_key_auth_object(every, "sk-tw-all", NAMES).models == []  # LiteLLM: every model


# --- the ledger row ---------------------------------------------------------------------------

WHO = {"user_api_key_auth_metadata": {"twllm_tenant_id": 3, "twllm_key_id": 7, "twllm_tenant": "moe"}}


def event(call_id: str, group: str, model_id: str | None, asked: str | None = None, **slo: Any) -> dict[str, Any]:
    """A LiteLLM logging payload as the proxy's router makes it (``asked``: original_model_group)."""
    payload = {
        "litellm_call_id": call_id,
        "model_group": group,
        "model_id": model_id,
        "prompt_tokens": 10,
        "completion_tokens": 20,
        "startTime": 1_795_614_749.5,
        "endTime": 1_795_614_750.0,
        "metadata": WHO,
        "error_information": {"error_code": "", "error_class": ""},
        **slo,
    }
    return {
        "litellm_call_id": call_id,
        "standard_logging_object": payload,
        "litellm_params": {"metadata": {"model_group": group, "original_model_group": asked or group}},
    }


PRICES = {"taide-8b": Price(Decimal("0.000003"), Decimal("0.000006")), "small": Price(Decimal("0.000001"))}


def test_a_row_records_the_model_that_answered_and_the_name_asked_for_at_the_answering_price():
    def row(payload: dict[str, Any]):
        return row_from_logging(
            payload, success=True, tenant_id=3, key_id=7, price_of=lambda m: PRICES.get(m, Price()), names=NAMES
        )

    alias = row(event("c1", "gpt-4o-mini", "vllm-taide-8b-0"))
    assert (alias.model, alias.requested_model, alias.cost) == ("taide-8b", "gpt-4o-mini", Decimal("0.00015"))
    fell_back = row(event("c2", "small", "vllm-small-0", asked="gpt-4o-mini"))
    assert (fell_back.model, fell_back.requested_model, fell_back.cost) == ("small", "gpt-4o-mini", Decimal("0.00001"))
    plain = row(event("c3", "taide-8b", "vllm-taide-8b-0"))
    assert (plain.model, plain.requested_model) == ("taide-8b", "taide-8b")
    # without the gateway's names (an older caller): the model group, as before
    old = row_from_logging(event("c4", "gpt-4o-mini", "vllm-taide-8b-0"), success=True, tenant_id=3, key_id=7,
                           price_of=lambda m: Price())  # fmt: skip
    assert (old.model, old.requested_model) == ("gpt-4o-mini", "gpt-4o-mini")


def test_usage_can_be_grouped_by_the_name_asked_for():
    query, _ = build_query("requested_model", UsageFilter())
    text = query.as_string(None)
    assert "coalesce(requested_model, model) AS g" in text  # the ledger; daily roll-ups keep `model`
    assert "SELECT model, currency" in text


# --- one row per request: failed attempts are not outcomes ------------------------------------


def test_a_held_failure_is_dropped_by_a_success_and_released_by_the_final_failure():
    clock = [0.0]
    hold: FailureHold[str] = FailureHold(max_age_s=10, clock=lambda: clock[0])
    assert hold.hold("a", "a-attempt-1") and hold.hold("a", "a-attempt-2") and len(hold) == 1
    hold.succeeded("a")
    assert hold.failed("a") is None  # nothing held: the next failure of "a" is its outcome
    assert not hold.hold("a", "a-late")  # ... recorded at once
    assert hold.hold("b", "b-1") and hold.failed("b") == "b-1"
    assert not hold.hold("", "no-call-id")
    assert hold.hold("c", "c-1") and hold.expired() == []
    clock[0] = 11
    assert hold.expired() == ["c-1"] and len(hold) == 0
    assert hold.hold("d", "d-1") and hold.drain() == ["d-1"]


class _Writer:
    def __init__(self) -> None:
        self.rows: list[Any] = []

    def enqueue(self, row: Any) -> None:
        self.rows.append(row)


@pytest.fixture
def rt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> hooks.Runtime:
    runtime = hooks.Runtime(
        GatewayConfig(database_url="postgresql://unused", master_key=MASTER, spool_dir=tmp_path, names=NAMES)
    )
    runtime.writer = _Writer()  # type: ignore[assignment]
    monkeypatch.setattr(hooks, "_runtime", runtime)
    assert runtime.pid == os.getpid()
    return runtime


FAILED = {"error_information": {"error_code": "500", "error_class": "InternalServerError"}}


def test_a_request_that_a_fallback_answered_is_one_success_row(rt: hooks.Runtime):
    logger = hooks.spend_logger

    async def scenario() -> None:
        # every replica of taide-8b fails (two attempts), then small answers
        await logger.async_log_failure_event(event("r1", "taide-8b", "vllm-taide-8b-0", **FAILED), None, 0, 0)
        await logger.async_log_failure_event(event("r1", "taide-8b", "vllm-taide-8b-1", **FAILED), None, 0, 0)
        assert rt.writer.rows == []  # type: ignore[attr-defined]
        await logger.async_log_success_event(event("r1", "small", "vllm-small-0", asked="taide-8b"), None, 0, 0)

    asyncio.run(scenario())
    (row,) = rt.writer.rows  # type: ignore[attr-defined]
    assert (row.status_code, row.model, row.requested_model, row.deployment) == (
        200,
        "small",
        "taide-8b",
        "vllm-small-0",
    )


def test_a_request_that_failed_everywhere_is_one_row_of_its_last_attempt(rt: hooks.Runtime):
    logger = hooks.spend_logger

    async def scenario() -> None:
        await logger.async_log_failure_event(event("r2", "taide-8b", "vllm-taide-8b-0", **FAILED), None, 0, 0)
        await logger.async_log_failure_event(
            event("r2", "small", "vllm-small-0", asked="taide-8b", **FAILED), None, 0, 0
        )
        await logger.async_post_call_failure_hook({"litellm_call_id": "r2"}, RuntimeError(), None)  # type: ignore[arg-type]
        # a refusal: the proxy's hook may come before the failure event
        await logger.async_post_call_failure_hook({"litellm_call_id": "r3"}, RuntimeError(), None)  # type: ignore[arg-type]
        await logger.async_log_failure_event(event("r3", "taide-8b", None, **FAILED), None, 0, 0)

    asyncio.run(scenario())
    rows = rt.writer.rows  # type: ignore[attr-defined]
    assert [(r.request_id, r.status_code, r.model, r.requested_model) for r in rows] == [
        ("r2", 500, "small", "taide-8b"),
        ("r3", 500, "taide-8b", "taide-8b"),
    ]


def test_a_tenant_key_falls_back_only_to_models_it_may_use(rt: hooks.Runtime):
    from litellm.proxy._types import LitellmUserRoles, UserAPIKeyAuth

    logger = hooks.spend_logger

    def pre_call(models: list[str], body: dict[str, Any], admin: bool = False) -> dict[str, Any]:
        who = UserAPIKeyAuth(api_key="k", models=models, user_role=LitellmUserRoles.PROXY_ADMIN if admin else None)
        out = asyncio.run(logger.async_pre_call_hook(who, None, dict(body), "acompletion"))
        return body if out is None else out

    narrow = pre_call(NAMES.listed(["gpt-4o-mini", "long"]), {"model": "gpt-4o-mini"})
    assert narrow["fallbacks"] == [{"taide-8b": ["long"]}, {"gpt-4o-mini": ["long"]}, {"small": ["taide-8b"]}]
    assert "context_window_fallbacks" not in narrow  # small -> long: long is allowed
    none_left = pre_call(NAMES.listed(["small"]), {"model": "small"})
    assert none_left["fallbacks"] == [{"taide-8b": ["small"]}, {"gpt-4o-mini": ["small"]}]  # small's: none
    assert none_left["context_window_fallbacks"] == []
    wide = pre_call(NAMES.listed(["taide-8b", "small", "long"]), {"model": "taide-8b"})
    assert "fallbacks" not in wide and "context_window_fallbacks" not in wide  # the router's own apply
    assert "fallbacks" not in pre_call([], {"model": "taide-8b"})  # a key allowed every model
    assert "fallbacks" not in pre_call([], {"model": "taide-8b"}, admin=True)
    own = pre_call(NAMES.listed(["gpt-4o-mini"]), {"model": "gpt-4o-mini", "fallbacks": ["gpt-4o"]})
    assert own["fallbacks"] == ["gpt-4o"]  # the client's own (checked by auth) stay
