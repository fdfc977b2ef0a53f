"""The SQL behind the console's views: sync psycopg calls (``api`` runs them in a worker thread).

Tenants and keys go through ``twllm.accounting.store`` and reports through
``twllm.accounting.usage``, as the CLI does; what is only the console's is here: a tenant key
looked up by its whole secret, a tenant's own overview, and the recent guard events (their
stage, action, categories and rule names only: the ledger never holds the text, and the
console passes on no other field of the verdicts).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg

from twllm.accounting import store, usage
from twllm.accounting.keys import hash_key
from twllm.console.access import TenantKey

USAGE_GROUPS = ("day", "model", "tenant")
"""The admin's usage charts."""
MAX_DAYS = 366
GUARD_EVENTS_MAX = 200
GUARD_STAGES = ("input", "output")
"""The stages a ledger's ``guard`` record may hold (``twllm.guard.gateway.GuardState.note``)."""


def tenant_key(conn: psycopg.Connection, secret: str) -> TenantKey | None:
    """The key whose secret this is (None: no such key)."""
    row = conn.execute(
        "SELECT k.id, k.prefix, t.name, k.revoked_at, k.expires_at, t.disabled_at IS NOT NULL "
        "FROM api_keys k JOIN tenants t ON t.id = k.tenant_id WHERE k.key_hash = %s",
        (hash_key(secret),),
    ).fetchone()
    if row is None:
        return None
    id_, prefix, tenant, revoked_at, expires_at, disabled = row
    now = datetime.now(UTC)
    status = "active"
    if revoked_at is not None and revoked_at <= now:
        status = "revoked"
    elif expires_at is not None and expires_at <= now:
        status = "expired"
    return TenantKey(id_, prefix, tenant, status, bool(disabled))


def key_dict(key: store.KeyRecord) -> dict[str, Any]:
    """A key as the console shows it: ``KeyRecord.to_dict`` and what its budget has left."""
    data = key.to_dict()
    data["remaining"] = float(max(key.budget - key.spend, Decimal(0))) if key.budget is not None else None
    return data


def usage_rows(
    conn: psycopg.Connection, by: str, days: int, tenant: str | None = None, now: datetime | None = None
) -> list[dict[str, Any]]:
    """Usage over the last ``days`` days grouped ``by`` (day | model | tenant), each row with its
    group under ``group`` and what people see for it under ``label`` (a tenant's display name,
    where it has one)."""
    if by not in USAGE_GROUPS:
        raise store.AccountsError(f"cannot group usage by {by!r}", hint=f"one of: {', '.join(USAGE_GROUPS)}")
    rows = usage.usage(conn, tenant=tenant, since=timedelta(days=days), by=by, now=now)
    labels: dict[str, str] = {}
    if by == "tenant":
        found = conn.execute("SELECT name, display_name FROM tenants WHERE display_name IS NOT NULL").fetchall()
        labels = {name: display_name for name, display_name in found}
    return [{"group": r.group, "label": labels.get(r.group, r.group), **r.to_dict(by)} for r in rows]


def tenant_overview(conn: psycopg.Connection, tenant: str, days: int) -> dict[str, Any]:
    """A tenant's own view: its keys (limits, spend, what the budget has left) and its usage."""
    return {
        "tenant": tenant,
        "display_name": store.get_tenant(conn, tenant).display_name,
        "days": days,
        "keys": [key_dict(k) for k in store.list_keys(conn, tenant)],
        "usage": {by: usage_rows(conn, by, days, tenant) for by in ("day", "model")},
    }


def guard_events(conn: psycopg.Connection, limit: int) -> list[dict[str, Any]]:
    """The most recent requests the guard acted on (newest first): when, whose, which model,
    and per stage the action, categories and rule names."""
    rows = conn.execute(
        "SELECT l.ts, t.name, t.display_name, l.model, l.status_code, l.guard FROM spend_ledger l "
        "LEFT JOIN tenants t ON t.id = l.tenant_id WHERE l.guard IS NOT NULL ORDER BY l.ts DESC LIMIT %s",
        (min(max(limit, 1), GUARD_EVENTS_MAX),),
    ).fetchall()
    events = []
    for ts, tenant, display_name, model, status_code, guard in rows:
        stages = [_stage(name, guard.get(name)) for name in GUARD_STAGES if isinstance(guard, dict)]
        events.append(
            {
                "ts": ts.isoformat(),
                "tenant": tenant,
                "tenant_display_name": display_name,
                "model": model,
                "status": status_code,
                "stages": [s for s in stages if s is not None],
            }
        )
    return events


def _stage(name: str, verdict: object) -> dict[str, Any] | None:
    """One stage's verdict, only the fields the console shows (never text, offsets or notes)."""
    if not isinstance(verdict, dict):
        return None
    strings = lambda value: [str(v) for v in value] if isinstance(value, list) else []  # noqa: E731
    return {
        "stage": name,
        "action": str(verdict.get("verdict", "")),
        "categories": strings(verdict.get("categories")),
        "rules": strings(verdict.get("rules")),
    }
