"""The console API's auth rules and responses, without a database or a browser.

``ConsoleApi.handle`` runs with a fake key lookup and a runner that records what would have
touched the database: a tenant key gets 403 from every admin route before any query runs.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from typing import Any

import pytest

from twllm.console import app as console_app
from twllm.console.access import Access, Denied, TenantKey, bearer, identify
from twllm.console.api import ROUTES, ConsoleApi, key_settings
from twllm.console.health import read_health
from twllm.gateway.asgi import Shield, mounted
from twllm.gateway.settings import HttpSettings
from twllm.status import ComponentState, DeploymentState

MASTER = "sk-master-console-unit-0123456789"
ACTIVE = "sk-tw-" + "a" * 40
REVOKED = "sk-tw-" + "r" * 40
DISABLED = "sk-tw-" + "d" * 40
KEYS = {
    ACTIVE: TenantKey(1, "sk-tw-aaaaaa", "acme", "active"),
    REVOKED: TenantKey(2, "sk-tw-rrrrrr", "acme", "revoked"),
    DISABLED: TenantKey(3, "sk-tw-dddddd", "gone", "active", tenant_disabled=True),
}


def make_api() -> tuple[ConsoleApi, list[Callable[..., Any]]]:
    ran: list[Callable[..., Any]] = []

    async def runner(fn: Callable[..., Any]) -> Any:
        ran.append(fn)
        if getattr(fn, "__name__", "") == "list_tenants":
            return []
        return {"tenant": "acme", "keys": [], "usage": {"day": [], "model": []}}

    api = ConsoleApi(MASTER, "postgresql://unused", None, runner=runner)

    async def lookup(secret: str) -> TenantKey | None:
        return KEYS.get(secret)

    api.lookup = lookup  # type: ignore[method-assign]
    return api, ran


def call(api: ConsoleApi, method: str, path: str, key: str | None, body: bytes = b"") -> tuple[int, Any]:
    header = f"Bearer {key}" if key else None
    return asyncio.run(api.handle(method, path, header, {}, body))


def concrete(pattern: str) -> str:
    path = re.sub(r"\(\?P<name>[^)]*\)", "acme", pattern)
    path = re.sub(r"\(\?P<action>[^)]*\)", "disable", path)
    return re.sub(r"\(\?P<id>[^)]*\)", "1", path)


@pytest.mark.parametrize("route", [r for r in ROUTES if r.access is Access.ADMIN], ids=lambda r: r.handler)
def test_a_tenant_key_gets_403_from_every_admin_route_before_any_query(route: Any) -> None:
    api, ran = make_api()
    status, payload = call(api, route.method, concrete(route.pattern.pattern), ACTIVE)
    assert (status, payload["error"]["code"]) == (403, "admin_only")
    assert ran == []


@pytest.mark.parametrize(
    ("key", "status", "code"),
    [
        (None, 401, "missing_api_key"),
        ("sk-wrong", 401, "invalid_api_key"),
        ("sk-tw-aa", 401, "invalid_api_key"),  # a prefix is never looked up as a key
        ("sk-tw-" + "x" * 40, 401, "invalid_api_key"),
        (REVOKED, 401, "revoked_api_key"),
        (DISABLED, 403, "tenant_disabled"),
    ],
)
def test_unusable_keys_are_refused_on_every_route(key: str | None, status: int, code: str) -> None:
    api, ran = make_api()
    for route in ROUTES:
        got, payload = call(api, route.method, concrete(route.pattern.pattern), key)
        assert (got, payload["error"]["code"]) == (status, code), route
    assert call(api, "GET", "no-such-route", key)[0] == status  # nothing said to strangers
    assert ran == []


def test_the_master_key_is_the_admin_and_a_tenant_sees_its_own_view() -> None:
    api, ran = make_api()
    assert call(api, "GET", "whoami", MASTER) == (200, {"role": "admin"})
    assert call(api, "GET", "whoami", ACTIVE) == (200, {"role": "tenant", "tenant": "acme", "key": "sk-tw-aaaaaa"})
    assert call(api, "GET", "tenants", MASTER)[0] == 200
    assert call(api, "GET", "me", MASTER)[1]["error"]["code"] == "tenant_only"
    status, me = call(api, "GET", "me", ACTIVE)
    assert status == 200 and me["key"] == "sk-tw-aaaaaa"
    assert call(api, "DELETE", "tenants", MASTER)[0] == 405
    assert call(api, "GET", "nothing", MASTER)[0] == 404
    assert call(api, "POST", "tenants", MASTER, b"[1]")[0] == 400


def test_bearer_and_identify() -> None:
    assert bearer("Bearer  sk-x ") == "sk-x" and bearer("Basic abc") is None and bearer(None) is None

    async def lookup(secret: str) -> TenantKey | None:
        raise AssertionError("the master key is never looked up")

    assert asyncio.run(identify(MASTER, MASTER, lookup)).admin
    with pytest.raises(Denied):
        asyncio.run(identify(MASTER, None, lookup))  # no master key configured: nobody is admin


def test_key_settings_from_the_form() -> None:
    s = key_settings({"models": "a, b", "rpm": "10", "tpm": "", "budget": "5", "budget_period": "daily"})
    assert s.models == ("a", "b") and s.rpm == 10 and s.tpm is None and str(s.budget) == "5"
    assert key_settings({"expires": "30d"}).expires_in is not None
    from twllm.accounting.store import AccountsError

    for bad in ({"rpm": "many"}, {"rpm": 0}, {"models": 3}, {"budget": "-1"}, {"expires": "soon"}):
        with pytest.raises(AccountsError):
            key_settings(bad)


def test_health_reads_state_json(tmp_path: Any) -> None:
    assert read_health(None)["available"] is False
    assert read_health(tmp_path)["available"] is False
    (tmp_path / "state.json").write_text("{not json")
    assert read_health(tmp_path)["available"] is False
    state = DeploymentState(name="d", components=[ComponentState(name="pg", kind="database")])
    (tmp_path / "state.json").write_text(state.to_json())
    health = read_health(tmp_path)
    assert health["available"] and health["components"][0]["name"] == "pg"


def asgi(app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]] | None = None) -> tuple[int, dict, bytes]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": headers or [], "query_string": b""}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], {k.decode(): v.decode() for k, v in sent[0]["headers"]}, sent[1]["body"]


def test_console_responses_carry_the_csp_and_never_a_cookie() -> None:
    api, _ = make_api()
    app = console_app.ConsoleApp(api)
    for path in ("/console", "/console/", "/console/app.js", "/console/vendor/chart.umd.min.js"):
        status, headers, body = asgi(app, "GET", path)
        assert status == 200 and body, path
        assert (
            "script-src 'self'" in headers["content-security-policy"]
            and "unsafe-inline" not in headers["content-security-policy"]
        )
        assert "set-cookie" not in headers and headers["x-content-type-options"] == "nosniff"
    assert asgi(app, "GET", "/console/../pyproject.toml")[0] == 404
    status, headers, body = asgi(app, "GET", "/console/api/whoami", [(b"authorization", f"Bearer {MASTER}".encode())])
    assert status == 200 and json.loads(body) == {"role": "admin"} and headers["cache-control"] == "no-store"
    assert "set-cookie" not in headers


def test_index_has_no_inline_script_and_js_sets_no_html() -> None:
    static = console_app.load_static()
    index = static[""][0].decode()
    assert re.findall(r"<script[^>]*>", index) == [
        '<script src="/console/vendor/chart.umd.min.js" defer>',
        '<script src="/console/app.js" defer>',
    ]
    assert re.findall(r"\son[a-z]+\s*=", index, re.IGNORECASE) == []  # no inline event handlers
    script = static["/app.js"][0].decode()
    assert "innerHTML" not in script and "outerHTML" not in script and "document.cookie" not in script


def test_the_shield_hands_console_paths_to_the_console_and_nothing_else() -> None:
    seen: list[str] = []

    async def console(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def litellm(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("not LiteLLM's")

    shield = Shield(litellm, HttpSettings(), mounts={"/console": console})
    assert asgi(shield, "GET", "/console")[0] == 200 and asgi(shield, "POST", "/console/api/keys")[0] == 200
    assert asgi(shield, "GET", "/consoles")[0] == 404 and seen == ["/console", "/console/api/keys"]
    assert mounted({"/console": console}, "/console-x") is None
