"""The console's JSON API under ``/console/api/``: one table of routes, each open to the admin,
to tenants, or to both (``access.Access``), and the handlers behind them.

``ConsoleApi.handle`` takes a request's method, path, bearer header, query and body and returns
(status, JSON-able payload): it authenticates first (every route needs a key, so unknown routes
say nothing to strangers), then finds the route, then checks access, then runs the handler.
Database work is sync psycopg (``twllm.accounting.store``, ``queries``) run in a worker thread
with a connection of its own, never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg

from twllm.accounting import store
from twllm.accounting.dburl import connect
from twllm.console import health, queries
from twllm.console.access import Access, Caller, Denied, TenantKey, authorize, bearer, identify
from twllm.errors import RuntimeFailure
from twllm.settings import DATABASE_URL_ENV

T = TypeVar("T")
Runner = Callable[[Callable[[psycopg.Connection], T]], Awaitable[T]]
"""Runs a function of a database connection and returns its result (in a thread, by default)."""

DEFAULT_DAYS = 30
GUARD_EVENTS_DEFAULT = 50


@dataclass(frozen=True)
class Call:
    """One API request, authenticated."""

    caller: Caller
    params: Mapping[str, str]
    """The route's path parameters."""
    query: Mapping[str, str]
    body: Mapping[str, Any]


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    access: Access
    handler: str
    """The name of a ``ConsoleApi`` method taking a ``Call``."""


def _route(method: str, pattern: str, access: Access, handler: str) -> Route:
    return Route(method, re.compile(pattern), access, handler)


ROUTES: tuple[Route, ...] = (
    _route("GET", r"whoami", Access.ANY, "whoami"),
    _route("GET", r"me", Access.TENANT, "me"),
    _route("GET", r"tenants", Access.ADMIN, "tenants"),
    _route("POST", r"tenants", Access.ADMIN, "create_tenant"),
    _route("POST", r"tenants/(?P<name>[^/]+)/(?P<action>disable|enable)", Access.ADMIN, "disable_tenant"),
    _route("GET", r"keys", Access.ADMIN, "keys"),
    _route("POST", r"keys", Access.ADMIN, "create_key"),
    _route("POST", r"keys/(?P<id>\d+)/revoke", Access.ADMIN, "revoke_key"),
    _route("POST", r"keys/(?P<id>\d+)/rotate", Access.ADMIN, "rotate_key"),
    _route("GET", r"usage", Access.ADMIN, "usage"),
    _route("GET", r"guard-events", Access.ADMIN, "guard_events"),
    _route("GET", r"health", Access.ADMIN, "health"),
)
"""Paths relative to ``/console/api/``."""


def error(status: int, code: str, message: str, hint: str | None = None) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = {"message": message, "code": code}
    if hint:
        body["hint"] = hint
    return status, {"error": body}


class ConsoleApi:
    """The handlers, with the master key, the database and the state folder they use."""

    def __init__(
        self,
        master_key: str | None,
        database_url: str | None,
        state_dir: str | Path | None = None,
        *,
        runner: Runner[Any] | None = None,
    ) -> None:
        self.master_key = master_key
        self.database_url = database_url
        self.state_dir = state_dir
        self._runner = runner

    async def run(self, fn: Callable[[psycopg.Connection], T]) -> T:
        """``fn(connection)`` in a worker thread with a connection of its own."""
        if self._runner is not None:
            return await self._runner(fn)
        url = self.database_url
        if url is None:
            raise RuntimeFailure("no database URL is set", hint=f"{DATABASE_URL_ENV} or gateway.json's database")

        def call() -> T:
            with connect(url) as conn:
                return fn(conn)

        return await asyncio.to_thread(call)

    async def lookup(self, secret: str) -> TenantKey | None:
        return await self.run(lambda conn: queries.tenant_key(conn, secret))

    async def handle(
        self, method: str, path: str, authorization: str | None, query: Mapping[str, str], body: bytes
    ) -> tuple[int, Any]:
        """(status, payload) for ``method`` on ``path`` (relative to /console/api/)."""
        try:
            caller = await identify(bearer(authorization), self.master_key, self.lookup)
            matched = [(r, m) for r in ROUTES if (m := r.pattern.fullmatch(path.strip("/")))]
            if not matched:
                return error(404, "not_found", f"No console API at {path!r}.")
            found = next(((r, m) for r, m in matched if r.method == method), None)
            if found is None:
                return error(405, "method_not_allowed", f"Method {method} is not allowed here.")
            route, match = found
            authorize(caller, route.access)
            call = Call(caller, match.groupdict(), query, _json_body(body) if method == "POST" else {})
            return 200, await getattr(self, route.handler)(call)
        except Denied as exc:
            return error(exc.status, exc.code, exc.message)
        except store.AccountsError as exc:
            return error(400, "invalid_request", exc.message, exc.hint)
        except (RuntimeFailure, psycopg.OperationalError) as exc:
            return error(503, "accounts_unavailable", "The accounts database cannot be reached right now.", str(exc))

    # --- any caller ----------------------------------------------------------------------------

    async def whoami(self, call: Call) -> dict[str, object]:
        return call.caller.to_dict()

    # --- a tenant's own view -------------------------------------------------------------------

    async def me(self, call: Call) -> dict[str, Any]:
        assert call.caller.key is not None  # Access.TENANT
        tenant, days = call.caller.key.tenant, _days(call.query)
        overview = await self.run(lambda conn: queries.tenant_overview(conn, tenant, days))
        overview["key"] = call.caller.key.prefix
        return overview

    # --- the admin's ---------------------------------------------------------------------------

    async def tenants(self, call: Call) -> list[dict[str, Any]]:
        return [t.to_dict() for t in await self.run(store.list_tenants)]

    async def create_tenant(self, call: Call) -> dict[str, Any]:
        name = _text(call.body, "name", required=True)
        assert name is not None
        display_name = _text(call.body, "display_name")  # empty: none
        return (await self.run(lambda conn: store.create_tenant(conn, name, display_name=display_name))).to_dict()

    async def disable_tenant(self, call: Call) -> dict[str, Any]:
        name, disabled = call.params["name"], call.params["action"] == "disable"
        tenant, changed = await self.run(lambda conn: store.set_tenant_disabled(conn, name, disabled))
        return {**tenant.to_dict(), "changed": changed}

    async def keys(self, call: Call) -> list[dict[str, Any]]:
        tenant = call.query.get("tenant") or None
        return [queries.key_dict(k) for k in await self.run(lambda conn: store.list_keys(conn, tenant))]

    async def create_key(self, call: Call) -> dict[str, Any]:
        tenant = _text(call.body, "tenant", required=True)
        assert tenant is not None
        settings = key_settings(call.body)
        record, secret = await self.run(lambda conn: store.create_key(conn, tenant, settings))
        return {"key": queries.key_dict(record), "secret": secret}

    async def revoke_key(self, call: Call) -> dict[str, Any]:
        ref = call.params["id"]
        record, changed = await self.run(lambda conn: store.revoke_key(conn, ref))
        return {"key": queries.key_dict(record), "changed": changed}

    async def rotate_key(self, call: Call) -> dict[str, Any]:
        ref = call.params["id"]
        new, secret, old = await self.run(lambda conn: store.rotate_key(conn, ref))
        return {"key": queries.key_dict(new), "secret": secret, "old": queries.key_dict(old)}

    async def usage(self, call: Call) -> dict[str, Any]:
        by = call.query.get("by", "day")
        days, tenant = _days(call.query), call.query.get("tenant") or None
        rows = await self.run(lambda conn: queries.usage_rows(conn, by, days, tenant))
        return {"by": by, "days": days, "rows": rows}

    async def guard_events(self, call: Call) -> list[dict[str, Any]]:
        limit = _int(call.query.get("limit"), "limit") or GUARD_EVENTS_DEFAULT
        return await self.run(lambda conn: queries.guard_events(conn, limit))

    async def health(self, call: Call) -> dict[str, Any]:
        return await asyncio.to_thread(health.read_health, self.state_dir)


# --- request values ------------------------------------------------------------------------------


def _json_body(body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except ValueError:
        raise store.AccountsError("the request body is not JSON") from None
    if not isinstance(data, dict):
        raise store.AccountsError("the request body must be a JSON object")
    return data


def _text(body: Mapping[str, Any], name: str, *, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise store.AccountsError(f"{name} is required")
        return None
    if not isinstance(value, str):
        raise store.AccountsError(f"{name} must be text")
    return value.strip()


def _int(value: Any, name: str) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise store.AccountsError(f"{name} must be a whole number")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise store.AccountsError(f"{name} must be a whole number, not {value!r}") from None


def _days(query: Mapping[str, str]) -> int:
    days = _int(query.get("days"), "days") or DEFAULT_DAYS
    if not 1 <= days <= queries.MAX_DAYS:
        raise store.AccountsError(f"days must be between 1 and {queries.MAX_DAYS}")
    return days


def key_settings(body: Mapping[str, Any]) -> store.KeySettings:
    """A new key's settings from the console's form (``KeySettings.checked`` validates them)."""
    models = body.get("models")
    if isinstance(models, str):
        models = store.parse_models(models) or None
    elif isinstance(models, list) and all(isinstance(m, str) for m in models):
        models = tuple(models) or None
    elif models is not None:
        raise store.AccountsError("models must be a list of model names")
    budget = body.get("budget")
    expires = _text(body, "expires")
    return store.KeySettings(
        name=_text(body, "name"),
        models=models,
        rpm=_int(body.get("rpm"), "rpm"),
        tpm=_int(body.get("tpm"), "tpm"),
        budget=store.parse_amount(str(budget)) if budget not in (None, "") else None,
        budget_period=_text(body, "budget_period"),
        expires_in=store.parse_duration(expires) if expires else None,
    ).checked()
