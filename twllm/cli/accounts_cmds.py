"""Commands that administer the deployment's database: tenants, keys, usage, db migrate/maintain.

Each finds the deployment like `twllm status` does (--state-dir, --config, $TWLLM_STATE_DIR or
the only deployment), reads the database's URL from its plan.json, and calls twllm.accounting.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import typer

from twllm.accounting import migrate as migrations
from twllm.accounting import store
from twllm.accounting.dburl import connect
from twllm.accounting.store import KeyRecord, KeySettings
from twllm.accounting.usage import GROUPS, totals
from twllm.accounting.usage import usage as usage_report
from twllm.cli.output import stderr, table
from twllm.cli.runtime_cmds import CONFIG_FIND, STATE_DIR_FIND, find_state_dir
from twllm.errors import RuntimeFailure, did_you_mean
from twllm.runtime.database_url import database_url
from twllm.runtime.state import StateDir

JSON = typer.Option(False, "--json", help="Write one JSON document to stdout.")
GUARD_POLICY = typer.Option(
    None, "--guard-policy", help="A policy of the spec's guard.policies (default: the gateway-wide guard settings)."
)
DISPLAY_NAME = typer.Option(
    None, "--display-name", help="A name for people, e.g. '臺大醫院 放射科' (1-100 characters; any text)."
)
SHOWN_ONCE = (
    "this is the only time the key is shown: store it now "
    "(twllm keeps only its hash; a lost key is rotated, not recovered)"
)

tenants_app = typer.Typer(help="Tenants: the customers API keys belong to.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys of tenants: create, list, revoke, rotate.", no_args_is_help=True)
db_app = typer.Typer(help="The deployment's database: schema migrations and ledger maintenance.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add tenants, keys, db and usage to ``app`` (once)."""
    if any(group.name == "tenants" for group in app.registered_groups):
        return
    app.add_typer(tenants_app, name="tenants")
    app.add_typer(keys_app, name="keys")
    app.add_typer(db_app, name="db")
    app.command("usage")(usage)


@contextmanager
def _database(
    state_dir: Path | None, config: Path | None, *, check_schema: bool = True
) -> Iterator[tuple[psycopg.Connection, StateDir]]:
    sd = find_state_dir(state_dir, config)
    try:
        with connect(database_url(sd)) as conn:
            if check_schema:
                migrations.check_current(conn)
            yield conn, sd
    except psycopg.Error as exc:  # the server went away mid-command, a lock timed out …
        raise RuntimeFailure(f"database error: {' '.join(str(exc).split())}") from exc


def _emit_json(document: object) -> None:
    typer.echo(json.dumps(document, indent=2, ensure_ascii=False))


def _money(value: Any) -> str:
    return f"{value:,.4f}".rstrip("0").rstrip(".") if value is not None else "-"


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value is not None else "-"


# --- tenants ------------------------------------------------------------------------------------


@tenants_app.command("create")
def tenants_create(
    name: str = typer.Argument(..., help="Tenant name: letters, digits, '.', '_', '-'."),
    guard_policy: str | None = GUARD_POLICY,
    display_name: str | None = DISPLAY_NAME,
    state_dir: Path | None = STATE_DIR_FIND,
    config: Path | None = CONFIG_FIND,
    json_out: bool = JSON,
) -> None:
    """Create a tenant."""
    if display_name is not None:
        store.check_display_name(display_name)  # before finding the deployment: a typo fails fast
    with _database(state_dir, config) as (conn, sd):
        _check_policy(sd, guard_policy)
        tenant = store.create_tenant(conn, name, guard_policy, display_name)
    if json_out:
        _emit_json(tenant.to_dict())
    else:
        typer.echo(
            f"✓ tenant {_named(tenant)} created (id {tenant.id}); next: twllm keys create --tenant {tenant.name}"
        )


@tenants_app.command("set-display-name")
def tenants_set_display_name(
    name: str = typer.Argument(..., help="The tenant."),
    display_name: str | None = typer.Argument(
        None, help="A name for people, e.g. '臺大醫院 放射科' (quote it); omit it to remove the display name."
    ),
    state_dir: Path | None = STATE_DIR_FIND,
    config: Path | None = CONFIG_FIND,
    json_out: bool = JSON,
) -> None:
    """Set the name people see for a tenant (console, `tenants list`); its name itself stays."""
    with _database(state_dir, config) as (conn, _sd):
        tenant = store.set_tenant_display_name(conn, name, display_name)
    if json_out:
        _emit_json(tenant.to_dict())
    else:
        typer.echo(f"✓ tenant {tenant.name}: display name {tenant.display_name or '(none)'}")


def _named(tenant: store.Tenant) -> str:
    """'acme' or, with a display name, 'acme (ACME Corp.)'."""
    return f"{tenant.name} ({tenant.display_name})" if tenant.display_name else tenant.name


@tenants_app.command("set-policy")
def tenants_set_policy(
    name: str = typer.Argument(..., help="The tenant."),
    policy: str | None = typer.Argument(
        None, help="A policy of the spec's guard.policies; omit it to use the gateway-wide settings."
    ),
    state_dir: Path | None = STATE_DIR_FIND,
    config: Path | None = CONFIG_FIND,
    json_out: bool = JSON,
) -> None:
    """Set the guard policy of a tenant's keys (those without one of their own); applies within 5 s."""
    with _database(state_dir, config) as (conn, sd):
        _check_policy(sd, policy)
        tenant = store.set_tenant_policy(conn, name, policy)
    if json_out:
        _emit_json(tenant.to_dict())
    else:
        typer.echo(f"✓ tenant {tenant.name}: guard policy {tenant.guard_policy or '(gateway-wide)'}")


def _set_disabled(name: str, disabled: bool, state_dir: Path | None, config: Path | None, json_out: bool) -> None:
    with _database(state_dir, config) as (conn, _sd):
        tenant, changed = store.set_tenant_disabled(conn, name, disabled)
    if json_out:
        _emit_json({**tenant.to_dict(), "changed": changed})
        return
    state = "disabled" if disabled else "enabled"
    note = "" if changed else " (it already was)"
    typer.echo(f"✓ tenant {tenant.name} {state}{note}")


@tenants_app.command("disable")
def tenants_disable(
    name: str = typer.Argument(..., help="The tenant."),
    state_dir: Path | None = STATE_DIR_FIND,
    config: Path | None = CONFIG_FIND,
    json_out: bool = JSON,
) -> None:
    """Disable a tenant: the gateway refuses every key of it (403) within 5 s; its keys are kept."""
    _set_disabled(name, True, state_dir, config, json_out)


@tenants_app.command("enable")
def tenants_enable(
    name: str = typer.Argument(..., help="The tenant."),
    state_dir: Path | None = STATE_DIR_FIND,
    config: Path | None = CONFIG_FIND,
    json_out: bool = JSON,
) -> None:
    """Enable a disabled tenant again: its keys work as before (those not revoked or expired)."""
    _set_disabled(name, False, state_dir, config, json_out)


def _check_policy(sd: StateDir, policy: str | None) -> None:
    """Refuse a policy the running deployment does not define (exit 2)."""
    if policy is None:
        return
    known = sd.guard_policies()
    if known is not None and policy not in known:
        raise store.AccountsError(
            f"no guard policy {policy!r} in the deployment's spec{did_you_mean(policy, known)}",
            hint=f"define it under guard.policies; defined: {', '.join(sorted(known)) or 'none'}",
        )


@tenants_app.command("list")
def tenants_list(
    state_dir: Path | None = STATE_DIR_FIND, config: Path | None = CONFIG_FIND, json_out: bool = JSON
) -> None:
    """Every tenant with its number of active keys."""
    with _database(state_dir, config) as (conn, _):
        tenants = store.list_tenants(conn)
    if json_out:
        _emit_json([t.to_dict() for t in tenants])
        return
    if not tenants:
        stderr.print("no tenants yet; create one with: twllm tenants create NAME")
        return
    table(
        ("tenant", "display name", "id", "active keys", "created"),
        [(t.name, t.display_name or "-", str(t.id), str(t.active_keys), _when(t.created_at)) for t in tenants],
    )


# --- keys ---------------------------------------------------------------------------------------


@keys_app.command("create")
def keys_create(
    tenant: str = typer.Option(..., "--tenant", help="The tenant the key belongs to.", show_default=False),
    models: str | None = typer.Option(
        None, "--models", help="Comma-separated model names the key may use (default: every model)."
    ),
    rpm: int | None = typer.Option(None, "--rpm", help="Requests per minute (default: unlimited)."),
    tpm: int | None = typer.Option(
        None, "--tpm", help="Tokens per minute, prompt and completion (default: unlimited)."
    ),
    budget: str | None = typer.Option(None, "--budget", help="Spend limit per period, in the models' price currency."),
    period: str | None = typer.Option(
        None, "--period", help="Budget period: daily, monthly or total (default with --budget: monthly)."
    ),
    expires: str | None = typer.Option(
        None, "--expires", help="Lifetime, e.g. 30d, 12h, 90m (default: never expires)."
    ),
    name: str | None = typer.Option(None, "--name", help="A label for people, e.g. 'acme-prod'."),
    guard_policy: str | None = GUARD_POLICY,
    state_dir: Path | None = STATE_DIR_FIND,
    config: Path | None = CONFIG_FIND,
    json_out: bool = JSON,
) -> None:
    """Create a key; prints its secret once (stdout), the details on stderr."""
    settings = KeySettings(
        name=name,
        models=store.parse_models(models) if models is not None else None,
        rpm=rpm,
        tpm=tpm,
        budget=store.parse_amount(budget) if budget is not None else None,
        budget_period=period,
        expires_in=store.parse_duration(expires) if expires is not None else None,
        guard_policy=guard_policy,
    ).checked()
    with _database(state_dir, config) as (conn, sd):
        _warn_unknown_models(sd, settings.models)
        _check_policy(sd, settings.guard_policy)
        key, secret = store.create_key(conn, tenant, settings)
    _print_secret(key, secret, json_out, verb="created")


@keys_app.command("list")
def keys_list(
    tenant: str | None = typer.Option(None, "--tenant", help="Only this tenant's keys."),
    state_dir: Path | None = STATE_DIR_FIND,
    config: Path | None = CONFIG_FIND,
    json_out: bool = JSON,
) -> None:
    """Every key (revoked and expired ones too) with its limits and its spend this period."""
    with _database(state_dir, config) as (conn, _):
        keys = store.list_keys(conn, tenant)
    if json_out:
        _emit_json([k.to_dict() for k in keys])
        return
    if not keys:
        stderr.print("no keys yet; create one with: twllm keys create --tenant NAME")
        return
    table(
        ("id", "prefix", "tenant", "name", "status", "models", "rpm", "tpm", "budget", "spend", "expires"),
        [
            (
                str(k.id),
                k.prefix,
                k.tenant,
                k.name or "-",
                k.status(),
                ",".join(k.models) if k.models is not None else "all",
                str(k.rpm or "-"),
                str(k.tpm or "-"),
                f"{_money(k.budget)}/{k.budget_period}" if k.budget is not None else "-",
                f"{_money(k.spend)} ({k.spend_period})",
                _when(k.expires_at),
            )
            for k in keys
        ],
    )


@keys_app.command("revoke")
def keys_revoke(
    key: str = typer.Argument(..., help="The key's id or prefix (see `twllm keys list`)."),
    state_dir: Path | None = STATE_DIR_FIND,
    config: Path | None = CONFIG_FIND,
    json_out: bool = JSON,
) -> None:
    """Revoke a key at once (the gateway stops accepting it within its key-cache time)."""
    with _database(state_dir, config) as (conn, _):
        record, changed = store.revoke_key(conn, key)
    if json_out:
        _emit_json({**record.to_dict(), "changed": changed})
    elif changed:
        typer.echo(f"✓ key {record.id} ({record.prefix}) of tenant {record.tenant} revoked")
    else:
        typer.echo(f"key {record.id} ({record.prefix}) was already revoked at {_when(record.revoked_at)}")


@keys_app.command("rotate")
def keys_rotate(
    key: str = typer.Argument(..., help="The key's id or prefix (see `twllm keys list`)."),
    state_dir: Path | None = STATE_DIR_FIND,
    config: Path | None = CONFIG_FIND,
    json_out: bool = JSON,
) -> None:
    """Replace a key with a new one of the same settings and expiry; the old key is revoked at once."""
    with _database(state_dir, config) as (conn, _):
        new, secret, old = store.rotate_key(conn, key)
    _print_secret(new, secret, json_out, verb=f"created to replace key {old.id} ({old.prefix}), now revoked;")


def _print_secret(key: KeyRecord, secret: str, json_out: bool, *, verb: str) -> None:
    if json_out:
        _emit_json({"secret": secret, "key": key.to_dict()})
    else:
        limits = [f"models {','.join(key.models)}" if key.models is not None else "all models"]
        limits += [f"{key.rpm} rpm"] * bool(key.rpm) + [f"{key.tpm} tpm"] * bool(key.tpm)
        if key.budget is not None:
            limits.append(f"budget {_money(key.budget)}/{key.budget_period}")
        if key.expires_at is not None:
            limits.append(f"expires {_when(key.expires_at)} UTC")
        stderr.print(f"✓ key {key.id} ({key.prefix}) for tenant {key.tenant} {verb} {'; '.join(limits)}", markup=False)
        typer.echo(secret)
    stderr.print(f"[bold yellow]warning:[/] {SHOWN_ONCE}")


def _warn_unknown_models(sd: StateDir, models: tuple[str, ...] | None) -> None:
    plan = sd.read_plan()
    served = {r.model_name for r in plan.routes} if plan is not None else set()
    unknown = sorted(set(models or ()) - served) if served else []
    if unknown:
        stderr.print(f"[yellow]note:[/] not served by this deployment now: {', '.join(unknown)}", markup=True)


# --- usage --------------------------------------------------------------------------------------


def usage(
    tenant: str | None = typer.Option(None, "--tenant", help="Only this tenant's requests."),
    key: str | None = typer.Option(None, "--key", help="Only this key's requests (id or prefix)."),
    model: str | None = typer.Option(None, "--model", help="Only requests for this model (the name clients use)."),
    since: str = typer.Option("7d", "--since", help="How far back: 7d, 24h, 90m … or 'all'."),
    by: str = typer.Option("day", "--by", help=f"Group by: {', '.join(GROUPS)}."),
    state_dir: Path | None = STATE_DIR_FIND,
    config: Path | None = CONFIG_FIND,
    json_out: bool = JSON,
    csv_out: bool = typer.Option(False, "--csv", help="Write CSV to stdout."),
) -> None:
    """Requests, errors, tokens and cost (days are UTC days)."""
    if json_out and csv_out:
        raise store.AccountsError("--json and --csv exclude each other")
    window = None if since.strip().lower() == "all" else store.parse_duration(since)
    with _database(state_dir, config) as (conn, _):
        rows = usage_report(conn, tenant=tenant, key=key, model=model, since=window, by=by)
    sums = totals(rows)
    if json_out:
        _emit_json(
            {
                "by": by,
                "since": since,
                "rows": [r.to_dict(by) for r in rows],
                "totals": [{k: v for k, v in r.to_dict(by).items() if k != by} for r in sums],
            }
        )
    elif csv_out:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow([by, "requests", "errors", "prompt_tokens", "completion_tokens", "cost", "currency"])
        for r in rows:
            writer.writerow([r.group, r.requests, r.errors, r.prompt_tokens, r.completion_tokens, r.cost, r.currency])
    elif not rows:
        stderr.print(f"no requests in the last {since}" if window else "no requests recorded")
    else:
        table(
            (by, "requests", "errors", "prompt tokens", "completion tokens", "cost", "currency"),
            [
                (
                    r.group,
                    str(r.requests),
                    str(r.errors),
                    str(r.prompt_tokens),
                    str(r.completion_tokens),
                    _money(r.cost),
                    r.currency,
                )
                for r in (*rows, *sums)
            ],
        )


# --- db -----------------------------------------------------------------------------------------


@db_app.command("migrate")
def db_migrate(
    state_dir: Path | None = STATE_DIR_FIND,
    config: Path | None = CONFIG_FIND,
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list the migrations not applied yet."),
    json_out: bool = JSON,
) -> None:
    """Apply the schema migrations not applied yet (safe to run any number of times)."""
    url = database_url(find_state_dir(state_dir, config))
    names = migrations.pending(url) if dry_run else migrations.migrate(url)
    if json_out:
        _emit_json({"pending" if dry_run else "applied": names})
    elif dry_run:
        typer.echo("pending: " + ", ".join(names) if names else "the schema is current; nothing to apply")
    else:
        typer.echo("✓ applied: " + ", ".join(names) if names else "the schema is current; nothing to apply")


@db_app.command("maintain")
def db_maintain(
    keep_days: int | None = typer.Option(
        None,
        "--keep-days",
        min=1,
        help="Roll up and drop ledger months entirely older than this many days (default: keep everything).",
    ),
    months_ahead: int = typer.Option(
        2, "--months-ahead", min=0, max=24, help="Monthly ledger partitions to create ahead of this one."
    ),
    state_dir: Path | None = STATE_DIR_FIND,
    config: Path | None = CONFIG_FIND,
    json_out: bool = JSON,
) -> None:
    """Create the ledger's coming monthly partitions and apply retention (run it daily, e.g. from cron)."""
    with _database(state_dir, config) as (conn, _):
        created = migrations.ensure_partitions(conn, months_ahead)
        kept = migrations.apply_retention(conn, keep_days) if keep_days is not None else None
    if json_out:
        _emit_json(
            {
                "created": created,
                "retention": None
                if kept is None
                else {
                    "horizon": kept.horizon.isoformat(),
                    "rolled_up_rows": kept.rolled_up_rows,
                    "dropped": list(kept.dropped),
                },
            }
        )
        return
    typer.echo("partitions created: " + (", ".join(created) or "none needed"))
    if kept is not None:
        typer.echo(
            f"retention: ledger keeps {kept.horizon.isoformat()} onwards; {kept.rolled_up_rows} rows rolled "
            f"up into spend_daily; dropped: {', '.join(kept.dropped) or 'none'}"
        )
