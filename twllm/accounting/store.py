"""Tenants and their API keys in PostgreSQL: create, list, revoke, rotate, and each key's spend.

Every function takes an open psycopg connection in autocommit mode (``dburl.connect`` gives
one) and does its writes in one transaction. A key's secret exists only in what ``create_key``
and ``rotate_key`` return: the database keeps its sha256 and a short prefix for people.

Rotation revokes the old key at once (``revoked_at = now()``; the gateway's key cache may accept
it for a few more seconds) and gives the new key the old one's settings: tenant, name, models,
limits, budget, and the same expiry time. A key's spend for its budget counts the keys it was
rotated from, so rotating never resets a budget.

Budget periods are UTC calendar periods: ``daily`` since 00:00 UTC, ``monthly`` since the first of
the month, ``total`` since the key (or the first key it was rotated from) was made.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import psycopg
from psycopg import sql

from twllm.accounting.keys import KEY_PREFIX, PREFIX_CHARS, display_prefix, generate_key, hash_key, looks_like_key
from twllm.errors import EXIT_INVALID, TwllmError, did_you_mean

PERIODS = ("daily", "monthly", "total")
"""Budget periods, as the api_keys.budget_period check allows them."""
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""The same rule as the tenants.name check in migration 0001."""
DISPLAY_NAME_MAX = 100
"""A tenant's display name: at most this many characters (after stripping surrounding spaces)."""
_DISPLAY_NAME_REFUSED = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
"""Unicode categories a display name may not hold: control and format characters (newline, tab,
zero-width and bidirectional marks …), surrogates, line and paragraph separators."""
POLICY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
"""A guard policy name (as the spec's Name type)."""
_DURATION_PART = re.compile(r"(\d+)\s*([wdhms])")
_UNITS = {"w": "weeks", "d": "days", "h": "hours", "m": "minutes", "s": "seconds"}
_MIN_PREFIX = len(KEY_PREFIX) + 2


class AccountsError(TwllmError):
    """An accounts request that cannot be done as asked: an unknown or ambiguous tenant or key,
    a taken name, an invalid limit or duration (exit 2)."""

    exit_code = EXIT_INVALID


@dataclass(frozen=True)
class Tenant:
    id: int
    name: str
    created_at: datetime
    active_keys: int = 0
    """Keys neither revoked nor expired."""
    guard_policy: str | None = None
    """The guard policy of the tenant's keys that name none themselves."""
    disabled_at: datetime | None = None
    """Set: the tenant is disabled and the gateway refuses all its keys."""
    display_name: str | None = None
    """A name for people (any text, e.g. '臺大醫院 放射科'); None: the name is shown."""

    @property
    def disabled(self) -> bool:
        return self.disabled_at is not None

    @property
    def label(self) -> str:
        """What people see: the display name, else the name."""
        return self.display_name or self.name

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "created_at": self.created_at.isoformat(),
            "active_keys": self.active_keys,
            "guard_policy": self.guard_policy,
            "disabled": self.disabled,
            "disabled_at": self.disabled_at.isoformat() if self.disabled_at is not None else None,
            "display_name": self.display_name,
            "label": self.label,
        }


@dataclass(frozen=True)
class KeySettings:
    """What a new key may do; None means no limit (every model, no rate limit, no budget)."""

    name: str | None = None
    models: tuple[str, ...] | None = None
    rpm: int | None = None
    tpm: int | None = None
    budget: Decimal | None = None
    budget_period: str | None = None
    """daily | monthly | total; monthly when a budget is given without one."""
    expires_in: timedelta | None = None
    guard_policy: str | None = None
    """A policy of the spec's guard.policies; None: the tenant's."""

    def checked(self) -> KeySettings:
        """These settings validated, with defaults filled in; AccountsError says what is wrong."""
        models = self.models
        if models is not None:
            models = tuple(dict.fromkeys(m.strip() for m in models if m.strip()))
            if not models:
                raise AccountsError("--models names no model", hint="give names like a,b, or omit it for every model")
        for flag, value in (("--rpm", self.rpm), ("--tpm", self.tpm)):
            if value is not None and value < 1:
                raise AccountsError(f"{flag} must be at least 1, not {value}")
        period = self.budget_period
        if self.budget is not None:
            if self.budget < 0 or not self.budget.is_finite():
                raise AccountsError(f"--budget must be a non-negative amount, not {self.budget}")
            period = period or "monthly"
        elif period is not None:
            raise AccountsError("--period needs --budget", hint="e.g. --budget 500 --period monthly")
        if period is not None and period not in PERIODS:
            raise AccountsError(
                f"unknown budget period {period!r}{did_you_mean(period, PERIODS)}", hint=f"one of: {', '.join(PERIODS)}"
            )
        if self.expires_in is not None and self.expires_in <= timedelta(0):
            raise AccountsError("--expires must be a positive duration")
        if self.guard_policy is not None and not POLICY_NAME.match(self.guard_policy):
            raise AccountsError(f"invalid guard policy name {self.guard_policy!r}")
        return KeySettings(
            self.name, models, self.rpm, self.tpm, self.budget, period, self.expires_in, self.guard_policy
        )


@dataclass(frozen=True)
class KeyRecord:
    """One API key as `twllm keys list` shows it (never its secret)."""

    id: int
    prefix: str
    tenant: str
    tenant_id: int
    name: str | None
    models: tuple[str, ...] | None
    rpm: int | None
    tpm: int | None
    budget: Decimal | None
    budget_period: str | None
    expires_at: datetime | None
    revoked_at: datetime | None
    rotated_from: int | None
    created_at: datetime
    guard_policy: str | None = None
    """The key's own guard policy (None: its tenant's)."""
    tenant_display_name: str | None = None
    """The tenant's display name (None: it has none)."""
    spend: Decimal = field(default=Decimal(0))
    """Cost in the current budget period (the current UTC month for keys without a budget)."""

    @property
    def spend_period(self) -> str:
        return self.budget_period or "monthly"

    def status(self, now: datetime | None = None) -> str:
        """active | revoked | expired."""
        now = now or datetime.now(UTC)
        if self.revoked_at is not None and self.revoked_at <= now:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def to_dict(self, now: datetime | None = None) -> dict[str, Any]:
        stamp = lambda t: t.isoformat() if t is not None else None  # noqa: E731
        return {
            "id": self.id,
            "prefix": self.prefix,
            "tenant": self.tenant,
            "name": self.name,
            "status": self.status(now),
            "models": list(self.models) if self.models is not None else None,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "budget": float(self.budget) if self.budget is not None else None,
            "budget_period": self.budget_period,
            "spend": float(self.spend),
            "spend_period": self.spend_period,
            "expires_at": stamp(self.expires_at),
            "revoked_at": stamp(self.revoked_at),
            "rotated_from": self.rotated_from,
            "created_at": stamp(self.created_at),
            "guard_policy": self.guard_policy,
            "tenant_display_name": self.tenant_display_name,
        }


# --- parsing ------------------------------------------------------------------------------------


def parse_duration(text: str) -> timedelta:
    """'30d', '12h', '90m', '2w', '45s', or combined like '1d12h', as a timedelta."""
    cleaned = text.strip().lower()
    parts = _DURATION_PART.findall(cleaned)
    if not parts or _DURATION_PART.sub("", cleaned).strip():
        raise AccountsError(
            f"not a duration: {text!r}", hint="a number and a unit: 30d, 12h, 90m, 2w, 45s (or combined: 1d12h)"
        )
    total = timedelta()
    for amount, unit in parts:
        total += timedelta(**{_UNITS[unit]: int(amount)})
    if total <= timedelta(0):
        raise AccountsError(f"the duration {text!r} is zero")
    return total


def parse_amount(text: str) -> Decimal:
    """A budget like '500' or '12.50' as a Decimal."""
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise AccountsError(f"not an amount: {text!r}", hint="a number like 500 or 12.50") from None
    if not value.is_finite() or value < 0:
        raise AccountsError(f"the budget must be a non-negative amount, not {text!r}")
    return value


def parse_models(text: str) -> tuple[str, ...]:
    """'a,b' as ('a', 'b')."""
    return tuple(m.strip() for m in text.split(",") if m.strip())


# --- tenants ------------------------------------------------------------------------------------


def check_display_name(text: str) -> str:
    """A tenant's display name, stripped; AccountsError unless it is 1-100 characters without
    control characters. Any other text is allowed (CJK, '<', quotes …): it is shown as text."""
    cleaned = text.strip()
    hint = f"1-{DISPLAY_NAME_MAX} characters of text on one line, e.g. '臺大醫院 放射科'"
    if not cleaned:
        raise AccountsError("the display name is empty", hint=hint)
    if len(cleaned) > DISPLAY_NAME_MAX:
        raise AccountsError(
            f"the display name is {len(cleaned)} characters long, more than {DISPLAY_NAME_MAX}", hint=hint
        )
    bad = next((c for c in cleaned if unicodedata.category(c) in _DISPLAY_NAME_REFUSED), None)
    if bad is not None:
        what = " ".join(filter(None, (f"U+{ord(bad):04X}", unicodedata.name(bad, ""))))
        raise AccountsError(
            f"the display name holds a control character ({what})",
            hint=hint + "; no newlines, tabs or invisible formatting characters",
        )
    return cleaned


def create_tenant(
    conn: psycopg.Connection, name: str, guard_policy: str | None = None, display_name: str | None = None
) -> Tenant:
    if not TENANT_NAME.match(name):
        raise AccountsError(
            f"invalid tenant name {name!r}",
            hint="1-64 characters: letters, digits, '.', '_', '-'; starting with a letter or digit",
        )
    if guard_policy is not None and not POLICY_NAME.match(guard_policy):
        raise AccountsError(f"invalid guard policy name {guard_policy!r}")
    if display_name is not None:
        display_name = check_display_name(display_name)
    try:
        row = conn.execute(
            "INSERT INTO tenants (name, guard_policy, display_name) VALUES (%s, %s, %s) RETURNING id, name, created_at",
            (name, guard_policy, display_name),
        ).fetchone()
    except psycopg.errors.UniqueViolation:
        raise AccountsError(f"tenant {name!r} already exists", hint="twllm tenants list") from None
    assert row is not None  # INSERT … RETURNING yields the inserted row
    tenant_id, stored_name, created_at = row
    return Tenant(tenant_id, stored_name, created_at, guard_policy=guard_policy, display_name=display_name)


def set_tenant_policy(conn: psycopg.Connection, name: str, guard_policy: str | None) -> Tenant:
    """Give a tenant's keys (those without their own) a guard policy; None: the gateway's."""
    if guard_policy is not None and not POLICY_NAME.match(guard_policy):
        raise AccountsError(f"invalid guard policy name {guard_policy!r}")
    tenant = get_tenant(conn, name)
    conn.execute("UPDATE tenants SET guard_policy = %s WHERE id = %s", (guard_policy, tenant.id))
    return get_tenant(conn, name)


def set_tenant_display_name(conn: psycopg.Connection, name: str, display_name: str | None) -> Tenant:
    """Give a tenant a display name (checked by ``check_display_name``); None: remove it. The
    name, which commands, URLs and metrics use, stays as it is."""
    cleaned = check_display_name(display_name) if display_name is not None else None
    tenant = get_tenant(conn, name)
    conn.execute("UPDATE tenants SET display_name = %s WHERE id = %s", (cleaned, tenant.id))
    return get_tenant(conn, name)


def set_tenant_disabled(conn: psycopg.Connection, name: str, disabled: bool) -> tuple[Tenant, bool]:
    """Disable a tenant (the gateway then refuses every key of it, within the key cache's TTL) or
    enable it again; the tenant and whether anything changed. Its keys keep their own state."""
    tenant = get_tenant(conn, name)
    if disabled:
        query = "UPDATE tenants SET disabled_at = now() WHERE id = %s AND disabled_at IS NULL RETURNING id"
    else:
        query = "UPDATE tenants SET disabled_at = NULL WHERE id = %s AND disabled_at IS NOT NULL RETURNING id"
    changed = conn.execute(query, (tenant.id,)).fetchone() is not None
    return get_tenant(conn, name), changed


def list_tenants(conn: psycopg.Connection) -> list[Tenant]:
    rows = conn.execute(
        "SELECT t.id, t.name, t.created_at, count(k.id) FILTER (WHERE k.revoked_at IS NULL "
        "AND (k.expires_at IS NULL OR k.expires_at > now())), t.guard_policy, t.disabled_at, t.display_name "
        "FROM tenants t LEFT JOIN api_keys k ON k.tenant_id = t.id GROUP BY t.id ORDER BY t.name"
    ).fetchall()
    return [Tenant(*row) for row in rows]


def get_tenant(conn: psycopg.Connection, name: str) -> Tenant:
    row = conn.execute(
        "SELECT id, name, created_at, 0, guard_policy, disabled_at, display_name FROM tenants WHERE name = %s",
        (name,),
    ).fetchone()
    if row is None:
        known = [r[0] for r in conn.execute("SELECT name FROM tenants").fetchall()]
        raise AccountsError(
            f"no tenant {name!r}{did_you_mean(name, known)}",
            hint=f"twllm tenants create {name}" if not known else "twllm tenants list",
        )
    return Tenant(*row)


# --- keys -------------------------------------------------------------------------------------


_KEY_COLUMNS = sql.SQL(
    "SELECT k.id, k.prefix, t.name, k.tenant_id, k.name, k.models, k.rpm, k.tpm, k.budget, "
    "k.budget_period, k.expires_at, k.revoked_at, k.rotated_from, k.created_at, k.guard_policy, t.display_name "
    "FROM api_keys k JOIN tenants t ON t.id = k.tenant_id"
)


def create_key(conn: psycopg.Connection, tenant: str, settings: KeySettings = KeySettings()) -> tuple[KeyRecord, str]:
    """A new key for ``tenant``: its record and its secret (shown once; only its hash is kept)."""
    s = settings.checked()
    with conn.transaction():
        owner = get_tenant(conn, tenant)
        secret, key_id = _insert_key(conn, owner.id, s)
    return find_key(conn, str(key_id)), secret


def _insert_key(
    conn: psycopg.Connection,
    tenant_id: int,
    s: KeySettings,
    *,
    rotated_from: int | None = None,
    expires_at: datetime | None = None,
) -> tuple[str, int]:
    secret = generate_key()
    row = conn.execute(
        "INSERT INTO api_keys (tenant_id, key_hash, prefix, name, models, rpm, tpm, budget, budget_period, "
        "expires_at, rotated_from, guard_policy) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, "
        "coalesce(%s::timestamptz, now() + %s::interval), %s, %s) RETURNING id",
        (
            tenant_id,
            hash_key(secret),
            display_prefix(secret),
            s.name,
            list(s.models) if s.models is not None else None,
            s.rpm,
            s.tpm,
            s.budget,
            s.budget_period,
            expires_at,
            s.expires_in,
            rotated_from,
            s.guard_policy,
        ),
    ).fetchone()
    assert row is not None  # INSERT … RETURNING yields the inserted row
    return secret, row[0]


def list_keys(conn: psycopg.Connection, tenant: str | None = None, now: datetime | None = None) -> list[KeyRecord]:
    """Every key (of ``tenant``), newest first, with its spend in the current period."""
    where, params = sql.SQL(""), []
    if tenant is not None:
        where, params = sql.SQL(" WHERE k.tenant_id = %s"), [get_tenant(conn, tenant).id]
    rows = conn.execute(_KEY_COLUMNS + where + sql.SQL(" ORDER BY t.name, k.id DESC"), params).fetchall()
    return _with_spend(conn, [_record(row) for row in rows], now)


def find_key(conn: psycopg.Connection, ref: str, now: datetime | None = None) -> KeyRecord:
    """A key by its id, its whole secret, or the start of it: at least 'sk-tw-' and 2 more
    characters, of which the first 12 (what `keys list` shows) are compared."""
    ref = ref.strip()
    if ref.isdigit():
        rows = conn.execute(_KEY_COLUMNS + sql.SQL(" WHERE k.id = %s"), (int(ref),)).fetchall()
    elif looks_like_key(ref):
        rows = conn.execute(_KEY_COLUMNS + sql.SQL(" WHERE k.key_hash = %s"), (hash_key(ref),)).fetchall()
    elif ref.startswith(KEY_PREFIX) and len(ref) >= _MIN_PREFIX:
        # Only the first PREFIX_CHARS characters are stored; more of the secret cannot be checked.
        rows = conn.execute(
            _KEY_COLUMNS + sql.SQL(" WHERE starts_with(k.prefix, %s) ORDER BY k.id"), (ref[:PREFIX_CHARS],)
        ).fetchall()
    else:
        raise AccountsError(
            f"{ref!r} is not a key id, a key prefix or a whole key",
            hint=f"use the id or the prefix ({KEY_PREFIX}…) that `twllm keys list` shows",
        )
    if not rows:
        raise AccountsError(f"no key {ref!r}", hint="twllm keys list")
    if len(rows) > 1:
        ids = ", ".join(str(r[0]) for r in rows)
        raise AccountsError(f"{ref!r} matches {len(rows)} keys (ids {ids})", hint="use the key id")
    return _with_spend(conn, [_record(rows[0])], now)[0]


def revoke_key(conn: psycopg.Connection, ref: str) -> tuple[KeyRecord, bool]:
    """Revoke a key now; the record and whether it was active until now (False: already revoked)."""
    key = find_key(conn, ref)
    row = conn.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL RETURNING id", (key.id,)
    ).fetchone()
    return find_key(conn, str(key.id)), row is not None


def rotate_key(conn: psycopg.Connection, ref: str) -> tuple[KeyRecord, str, KeyRecord]:
    """A new key with the old one's settings and expiry; the old key is revoked at once.

    Returns (new key, its secret, old key). Revoked or expired keys are not rotated."""
    with conn.transaction():
        found = find_key(conn, ref)
        row = conn.execute(_KEY_COLUMNS + sql.SQL(" WHERE k.id = %s FOR UPDATE OF k"), (found.id,)).fetchone()
        assert row is not None  # found just above, and keys are never deleted
        old = _record(row)  # re-read under the lock: a concurrent rotate may have revoked it
        if old.status() != "active":
            raise AccountsError(
                f"key {old.prefix} (id {old.id}) is {old.status()}; only active keys are rotated",
                hint=f"twllm keys create --tenant {old.tenant}",
            )
        settings = KeySettings(
            old.name, old.models, old.rpm, old.tpm, old.budget, old.budget_period, guard_policy=old.guard_policy
        )
        secret, new_id = _insert_key(conn, old.tenant_id, settings, rotated_from=old.id, expires_at=old.expires_at)
        conn.execute("UPDATE api_keys SET revoked_at = now() WHERE id = %s", (old.id,))
    return find_key(conn, str(new_id)), secret, find_key(conn, str(old.id))


def _record(row: Sequence[Any]) -> KeyRecord:
    values = list(row)
    values[5] = tuple(values[5]) if values[5] is not None else None
    return KeyRecord(*values)


# --- spend ------------------------------------------------------------------------------------


def period_start(period: str | None, now: datetime) -> datetime | None:
    """When the current budget period began (UTC); None for 'total' (since the beginning)."""
    now = now.astimezone(UTC)
    if period == "total":
        return None
    if period == "daily":
        return now.replace(hour=0, minute=0, second=0, microsecond=0)
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)  # monthly, and keys without a budget


PERIOD_SPEND = sql.SQL("""
WITH RECURSIVE wanted (root, since) AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(since)s::timestamptz[])
), chain (root, member, since) AS (
    SELECT root, root, since FROM wanted
    UNION ALL
    SELECT c.root, k.rotated_from, c.since
    FROM chain c JOIN api_keys k ON k.id = c.member
    WHERE k.rotated_from IS NOT NULL
)
SELECT c.root, sum(coalesce(l.cost, 0) + coalesce(d.cost, 0))
FROM chain c
LEFT JOIN LATERAL (SELECT sum(cost) AS cost FROM spend_ledger
                   WHERE key_id = c.member AND (c.since IS NULL OR ts >= c.since)) l ON true
LEFT JOIN LATERAL (SELECT sum(cost) AS cost FROM spend_daily
                   WHERE key_id = c.member AND (c.since IS NULL OR day >= (c.since AT TIME ZONE 'UTC')::date)) d ON true
GROUP BY c.root""")
"""Each key's spend since its period began, the keys it was rotated from included: parameters
``ids`` (key ids) and ``since`` (period starts, None for 'total'), rows (key id, spend)."""
_PERIOD_SPEND = PERIOD_SPEND  # the name twllm.accounting.limits imports today


def period_spend(
    conn: psycopg.Connection, keys: Sequence[tuple[int, str | None]], now: datetime | None = None
) -> dict[int, Decimal]:
    """Cost of each (key id, budget period) in its current period, the keys it was rotated
    from included; ledger and roll-up together (a request is in exactly one of them)."""
    if not keys:
        return {}
    now = now or datetime.now(UTC)
    rows = conn.execute(
        PERIOD_SPEND, {"ids": [k for k, _ in keys], "since": [period_start(p, now) for _, p in keys]}
    ).fetchall()
    return {root: Decimal(total) for root, total in rows}


def _with_spend(conn: psycopg.Connection, records: list[KeyRecord], now: datetime | None) -> list[KeyRecord]:
    spend = period_spend(conn, [(r.id, r.budget_period) for r in records], now)
    return [replace(r, spend=spend.get(r.id, Decimal(0))) for r in records]
