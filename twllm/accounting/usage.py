"""Usage reports: requests, errors, tokens and cost, grouped by day, model, tenant or key.

A report adds the ledger (one row per request) and the daily roll-up. Retention moves whole
months from the first to the second in one transaction (see ``migrate``), so each request is in
exactly one of them: adding them never counts a request twice and never misses one. Ledger rows
are selected to the second (``ts >= since``); roll-up rows by whole UTC days (``day >=`` the
day ``since`` falls on), so a window that begins inside a rolled-up day counts that whole day.
Days are UTC days. Rows are split by currency: amounts in different currencies are never added.

The SQL is composed from fixed fragments chosen by name; every value a user gives (tenant, key,
model, time) travels as a query parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql

from twllm.accounting.migrate import ERROR_STATUS
from twllm.accounting.store import AccountsError, find_key, get_tenant
from twllm.errors import did_you_mean

GROUPS = ("day", "model", "requested_model", "tenant", "key")
"""What a report can be grouped by."""
MASTER_KEY_LABEL = "(master key)"
"""How requests made with the master key (no tenant, no key) are labelled."""

# The group expression over the ledger, over the roll-up, and the label the outer query shows.
_GROUP_SQL: dict[str, tuple[str, str, str]] = {
    "day": ("(ts AT TIME ZONE 'UTC')::date", "day", "to_char(u.g, 'YYYY-MM-DD')"),
    "model": ("model", "model", "u.g"),
    # The name the client asked for (an alias, or a model a fallback stood in for); rows from
    # before migration 0006 and daily roll-ups know only the model that answered.
    "requested_model": ("coalesce(requested_model, model)", "model", "u.g"),
    "tenant": ("coalesce(tenant_id, 0)", "tenant_id", "coalesce(t.name, %(master)s)"),
    "key": ("coalesce(key_id, 0)", "key_id", "coalesce(k.prefix, %(master)s)"),
}
_LABEL_JOIN = {
    "tenant": "LEFT JOIN tenants t ON t.id = u.g",
    "key": "LEFT JOIN api_keys k ON k.id = u.g",
}


@dataclass(frozen=True)
class UsageFilter:
    """Which requests a report covers; None means no restriction."""

    tenant_id: int | None = None
    key_id: int | None = None
    model: str | None = None
    since: datetime | None = None


@dataclass(frozen=True)
class UsageRow:
    group: str
    """The day (YYYY-MM-DD), model (that answered), requested model, tenant name or key prefix."""
    currency: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    cost: Decimal

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self, by: str) -> dict[str, Any]:
        return {
            by: self.group,
            "requests": self.requests,
            "errors": self.errors,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cost": float(self.cost),
            "currency": self.currency,
        }


def build_query(by: str, where: UsageFilter) -> tuple[sql.Composed, dict[str, Any]]:
    """The report's SQL and its parameters. Only names from GROUPS choose SQL fragments."""
    if by not in _GROUP_SQL:
        raise AccountsError(
            f"cannot group usage by {by!r}{did_you_mean(by, GROUPS)}", hint=f"one of: {', '.join(GROUPS)}"
        )
    ledger_group, daily_group, label = _GROUP_SQL[by]
    params: dict[str, Any] = {"error_status": ERROR_STATUS, "master": MASTER_KEY_LABEL}
    ledger_where: list[sql.Composable] = [sql.SQL("true")]
    daily_where: list[sql.Composable] = [sql.SQL("true")]
    for column in ("tenant_id", "key_id", "model"):  # the same column in both tables
        if getattr(where, column) is not None:
            params[column] = getattr(where, column)
            condition = sql.SQL(f"{column} = %({column})s")  # column: one of the constants above
            ledger_where.append(condition)
            daily_where.append(condition)
    if where.since is not None:
        params["since"] = where.since
        params["since_day"] = where.since.astimezone(UTC).date()
        ledger_where.append(sql.SQL("ts >= %(since)s"))
        daily_where.append(sql.SQL("day >= %(since_day)s"))
    query = sql.SQL("""
SELECT {label}, u.currency, sum(u.requests), sum(u.errors), sum(u.prompt_tokens),
       sum(u.completion_tokens), sum(u.cost)
FROM (
    SELECT {ledger_group} AS g, currency, count(*) AS requests,
           count(*) FILTER (WHERE status_code >= %(error_status)s) AS errors,
           sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,
           sum(cost) AS cost
    FROM spend_ledger WHERE {ledger_where} GROUP BY 1, 2
    UNION ALL
    SELECT {daily_group}, currency, sum(requests), sum(errors), sum(prompt_tokens),
           sum(completion_tokens), sum(cost)
    FROM spend_daily WHERE {daily_where} GROUP BY 1, 2
) u {join}
GROUP BY 1, 2""").format(
        label=sql.SQL(label),
        ledger_group=sql.SQL(ledger_group),
        daily_group=sql.SQL(daily_group),
        ledger_where=sql.SQL(" AND ").join(ledger_where),
        daily_where=sql.SQL(" AND ").join(daily_where),
        join=sql.SQL(_LABEL_JOIN.get(by, "")),
    )
    return query, params


def usage(
    conn: psycopg.Connection,
    *,
    tenant: str | None = None,
    key: str | None = None,
    model: str | None = None,
    since: timedelta | None = timedelta(days=7),
    by: str = "day",
    now: datetime | None = None,
) -> list[UsageRow]:
    """Usage in the window ``since`` back from ``now`` (None: all of it), one row per group and
    currency: days in order, the others by cost (highest first)."""
    where = UsageFilter(
        tenant_id=get_tenant(conn, tenant).id if tenant is not None else None,
        key_id=find_key(conn, key).id if key is not None else None,
        model=model,
        since=(now or datetime.now(UTC)) - since if since is not None else None,
    )
    query, params = build_query(by, where)
    rows = [
        UsageRow(str(g), cur.strip(), int(req), int(err), int(pt or 0), int(ct or 0), Decimal(cost or 0))
        for g, cur, req, err, pt, ct, cost in conn.execute(query, params).fetchall()
    ]
    if by == "day":
        return sorted(rows, key=lambda r: (r.group, r.currency))
    return sorted(rows, key=lambda r: (-r.cost, r.group, r.currency))


def totals(rows: list[UsageRow]) -> list[UsageRow]:
    """One row per currency: the sum of ``rows``, labelled 'total'."""
    sums: dict[str, list[Any]] = {}
    for r in rows:
        acc = sums.setdefault(r.currency, [0, 0, 0, 0, Decimal(0)])
        for i, value in enumerate((r.requests, r.errors, r.prompt_tokens, r.completion_tokens, r.cost)):
            acc[i] += value
    return [UsageRow("total", cur, *acc) for cur, acc in sorted(sums.items())]
