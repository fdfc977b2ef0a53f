"""What twllm.gateway.lean removes from LiteLLM's proxy is still there to remove, and goes."""

from __future__ import annotations

import importlib

import pytest

from twllm.gateway import lean


@pytest.fixture(scope="module")
def litellm_app_middleware() -> list[str]:
    """The middleware LiteLLM's proxy app adds, by name (importing the app builds no stack)."""
    from litellm.proxy.proxy_server import app

    return [lean.middleware_name(m) for m in app.user_middleware]


def test_every_middleware_left_out_is_one_litellm_adds(litellm_app_middleware: list[str]) -> None:
    # A LiteLLM upgrade that renames one would leave it running: this fails first.
    assert lean.UNUSED_MIDDLEWARE <= set(litellm_app_middleware)


def test_the_ones_twllm_keeps_stay(litellm_app_middleware: list[str]) -> None:
    class App:
        middleware_stack = None

        def __init__(self, entries: list) -> None:
            self.user_middleware = entries

    from litellm.proxy.proxy_server import app as proxy_app

    copy = App(list(proxy_app.user_middleware))
    removed = lean.drop_middleware(copy)
    kept = [lean.middleware_name(m) for m in copy.user_middleware]
    assert sorted(removed) == sorted(lean.UNUSED_MIDDLEWARE)
    assert not set(kept) & lean.UNUSED_MIDDLEWARE
    for name in ("SecurityHeadersMiddleware", "InFlightRequestsMiddleware", "GZipBufferedResponseMiddleware"):
        assert any(k.endswith("." + name) for k in kept), name


def test_a_serving_app_is_not_changed() -> None:
    class Serving:
        middleware_stack = object()
        user_middleware: list = []

    with pytest.raises(RuntimeError, match="already serves"):
        lean.drop_middleware(Serving())


def test_otel_destinations_are_skipped_only_without_the_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    auth = importlib.import_module(lean.AUTH_MODULE)
    original = auth._seed_request_destinations
    monkeypatch.setattr(auth, "_seed_request_destinations", original)
    try:
        importlib.import_module(lean.OTEL_LOGGER)
        sdk = True
    except ImportError:
        sdk = False
    assert lean.skip_otel_destinations() is (not sdk)
    assert (auth._seed_request_destinations is lean._no_destinations) is (not sdk)


def test_the_enterprise_package_is_looked_for_once_not_per_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """LiteLLM's route check (run for every authenticated request) imports litellm_enterprise;
    not installed, each call searched sys.path for it. Marked missing, no call searches."""
    import importlib.machinery
    import sys

    from litellm.proxy._types import UserAPIKeyAuth
    from litellm.proxy.auth.route_checks import RouteChecks

    assert importlib.util.find_spec(lean.ENTERPRISE) is None, "installed here: nothing to skip"
    monkeypatch.delitem(sys.modules, lean.ENTERPRISE, raising=False)
    searched: list[str] = []
    original = importlib.machinery.PathFinder.find_spec

    def find_spec(name, path=None, target=None):  # type: ignore[no-untyped-def]
        if name.split(".")[0] == lean.ENTERPRISE:
            searched.append(name)
        return original(name, path, target)

    monkeypatch.setattr(importlib.machinery.PathFinder, "find_spec", find_spec)

    def three_requests() -> int:
        searched.clear()
        for _ in range(3):
            assert RouteChecks.should_call_route(route="/v1/chat/completions", valid_token=UserAPIKeyAuth()) is True
        return len(searched)

    assert three_requests() == 3  # LiteLLM still looks it up on every request
    assert lean.skip_missing_enterprise() is True
    assert lean.skip_missing_enterprise() is False  # once
    assert three_requests() == 0
    assert sys.modules[lean.ENTERPRISE] is None


def test_rate_limit_gauges_are_skipped_only_when_every_one_is_excluded() -> None:
    from litellm.integrations.prometheus import PrometheusLogger

    from twllm.render.litellm_config import PROMETHEUS_EXCLUDED_METRICS

    # twllm's render leaves every one of them out, so the skip applies to deployed gateways.
    assert lean.RATE_LIMIT_SERIES <= set(PROMETHEUS_EXCLUDED_METRICS)
    original = PrometheusLogger._set_v3_rate_limit_allowed_and_used_metrics
    calls: list[str] = []
    try:
        PrometheusLogger._set_v3_rate_limit_allowed_and_used_metrics = lambda self, *a, **k: calls.append("set")  # type: ignore[method-assign]
        assert lean.skip_excluded_rate_limit_gauges() is True
        assert lean.skip_excluded_rate_limit_gauges() is False  # once only

        class Excluding:
            exclude_metrics = frozenset(lean.RATE_LIMIT_SERIES)

        class Exporting:
            exclude_metrics = frozenset(sorted(lean.RATE_LIMIT_SERIES)[1:])

        patched = PrometheusLogger._set_v3_rate_limit_allowed_and_used_metrics
        patched(Excluding(), {}, None)
        assert calls == []
        patched(Exporting(), {}, None)
        assert calls == ["set"]
    finally:
        PrometheusLogger._set_v3_rate_limit_allowed_and_used_metrics = original  # type: ignore[method-assign]


def test_litellm_still_sets_exactly_these_gauges() -> None:
    import inspect

    from litellm.integrations.prometheus import PrometheusLogger

    source = inspect.getsource(PrometheusLogger._set_v3_rate_limit_allowed_and_used_metrics)
    for name in lean.RATE_LIMIT_SERIES:
        attr = name  # LiteLLM names each gauge attribute after its series
        assert f"self.{attr}" in source or f'"{name}"' in source, name
