"""The pure parts of accounting: durations, amounts, key settings and secrets, migration files,
month arithmetic, the usage query's composition, and where the database URL comes from."""

from __future__ import annotations

import json
import re
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from psycopg import sql

from twllm.accounting import migrate as mig
from twllm.accounting.keys import KEY_PREFIX, display_prefix, generate_key, hash_key, looks_like_key
from twllm.accounting.store import (
    AccountsError,
    KeySettings,
    check_display_name,
    parse_amount,
    parse_duration,
    parse_models,
    period_start,
)
from twllm.accounting.usage import GROUPS, UsageFilter, build_query
from twllm.errors import EXIT_INVALID, ContractError, RuntimeFailure
from twllm.plan.build import make_plan
from twllm.plan.model import DatabasePlan, Plan
from twllm.plan.placement import GpuInventory
from twllm.runtime.database_url import database_url
from twllm.spec.resolve import parse_spec

UTC = UTC


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", timedelta(days=30)),
        ("12h", timedelta(hours=12)),
        ("90m", timedelta(minutes=90)),
        ("2w", timedelta(weeks=2)),
        ("45s", timedelta(seconds=45)),
        ("1d12h", timedelta(days=1, hours=12)),
        (" 7D ", timedelta(days=7)),
    ],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "30", "d", "30x", "-5d", "1.5h", "30 days", "0d", "7d junk"])
def test_bad_durations_say_how_to_write_one(text: str) -> None:
    with pytest.raises(AccountsError) as caught:
        parse_duration(text)
    assert caught.value.exit_code == EXIT_INVALID
    assert "duration" in caught.value.message


def test_amounts_and_model_lists() -> None:
    assert parse_amount("12.50") == Decimal("12.50")
    for bad in ("ten", "-1", "nan", "inf"):
        with pytest.raises(AccountsError):
            parse_amount(bad)
    assert parse_models(" a, b ,,c") == ("a", "b", "c")


def test_key_settings_defaults_and_checks() -> None:
    assert KeySettings(budget=Decimal(5)).checked().budget_period == "monthly"
    assert KeySettings(models=("a", "a", " b ")).checked().models == ("a", "b")
    assert KeySettings().checked() == KeySettings()
    cases = [
        (KeySettings(budget_period="daily"), "--period needs --budget"),
        (KeySettings(budget=Decimal(1), budget_period="weekly"), "unknown budget period 'weekly'"),
        (KeySettings(budget=Decimal(1), budget_period="month"), "did you mean 'monthly'"),
        (KeySettings(rpm=0), "--rpm must be at least 1"),
        (KeySettings(tpm=-3), "--tpm must be at least 1"),
        (KeySettings(models=(" ",)), "--models names no model"),
        (KeySettings(budget=Decimal(-1)), "non-negative"),
    ]
    for settings, message in cases:
        with pytest.raises(AccountsError, match=re.escape(message)):
            settings.checked()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("臺大醫院 放射科", "臺大醫院 放射科"),
        ("  ACME Corp.  ", "ACME Corp."),
        ("<img src=x onerror=alert(1)>", "<img src=x onerror=alert(1)>"),
        ("\"quoted\" & 'single' [b]", "\"quoted\" & 'single' [b]"),
        ("x" * 100, "x" * 100),
        ("名" * 100, "名" * 100),
        ("a\u3000b", "a\u3000b"),  # an ideographic space is a space, not a control character
    ],
)
def test_display_names_are_any_text_on_one_line(text: str, expected: str) -> None:
    assert check_display_name(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        (" \u3000 ", "is empty"),
        ("x" * 101, "101 characters long, more than 100"),
        ("line\nbreak", "U+000A"),
        ("tab\there", "U+0009"),
        ("nul\x00", "U+0000"),
        ("esc\x1b[31m", "U+001B"),
        ("zero\u200bwidth", "U+200B ZERO WIDTH SPACE"),
        ("bidi\u202eoverride", "U+202E RIGHT-TO-LEFT OVERRIDE"),
        ("sep\u2028arator", "U+2028 LINE SEPARATOR"),
    ],
)
def test_bad_display_names_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(AccountsError) as caught:
        check_display_name(text)
    assert caught.value.exit_code == EXIT_INVALID
    assert message in caught.value.message and "1-100 characters" in (caught.value.hint or "")


def test_keys_look_like_openai_keys_and_only_their_hash_is_kept() -> None:
    secret = generate_key()
    assert secret.startswith(KEY_PREFIX) and len(secret) == len(KEY_PREFIX) + 40
    assert re.fullmatch(r"sk-tw-[A-Za-z0-9_-]{40}", secret)
    assert looks_like_key(secret) and not looks_like_key("sk-tw-short")
    assert generate_key() != secret
    digest = hash_key(secret)
    assert len(digest) == 32 and digest == hash_key(secret) and secret.encode() not in digest
    assert display_prefix(secret) == secret[:12]


def test_budget_periods_are_utc_calendar_periods() -> None:
    now = datetime(2025, 3, 17, 22, 30, tzinfo=timezone(timedelta(hours=8)))  # 14:30 UTC
    assert period_start("daily", now) == datetime(2025, 3, 17, tzinfo=UTC)
    assert period_start("monthly", now) == datetime(2025, 3, 1, tzinfo=UTC)
    assert period_start(None, now) == datetime(2025, 3, 1, tzinfo=UTC)
    assert period_start("total", now) is None


# --- migrations and months --------------------------------------------------------------------


def test_the_shipped_migrations_load_in_order() -> None:
    shipped = mig.load_migrations()
    assert shipped[0].name == "0001_accounts" and shipped[0].version == 1
    assert [m.version for m in shipped] == sorted({m.version for m in shipped})
    assert all(len(m.checksum) == 64 for m in shipped)
    assert "CREATE TABLE spend_ledger" in shipped[0].sql


def test_migration_files_must_be_numbered_once(tmp_path: Path) -> None:
    (tmp_path / "0002_b.sql").write_text("SELECT 2;")
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "README.md").write_text("not a migration")
    assert [m.name for m in mig.load_migrations(tmp_path)] == ["0001_a", "0002_b"]
    (tmp_path / "0002_c.sql").write_text("SELECT 3;")
    with pytest.raises(RuntimeFailure, match="two migrations have version 0002"):
        mig.load_migrations(tmp_path)
    (tmp_path / "0002_c.sql").unlink()
    (tmp_path / "3_Bad.sql").write_text("")
    with pytest.raises(RuntimeFailure, match="not named NNNN_name.sql"):
        mig.load_migrations(tmp_path)


def test_month_arithmetic_and_the_retention_horizon() -> None:
    assert mig.add_months(date(2025, 11, 1), 2) == date(2026, 1, 1)
    assert mig.add_months(date(2025, 1, 1), -1) == date(2024, 12, 1)
    assert mig.partition_name(date(2025, 3, 1)) == "spend_ledger_202503"
    # Keep 30 days on 2025-05-10: the cutoff is 2025-04-10, so April stays and March goes.
    assert mig.retention_horizon(30, date(2025, 5, 10)) == date(2025, 4, 1)
    assert mig.retention_horizon(31, date(2025, 5, 1)) == date(2025, 3, 1)
    assert mig.retention_horizon(1, date(2025, 5, 2)) == date(2025, 5, 1)


# --- the usage query ----------------------------------------------------------------------------


HOSTILE = "x'); DROP TABLE tenants; --"


@pytest.mark.parametrize("by", GROUPS)
def test_usage_sql_takes_every_user_value_as_a_parameter(by: str) -> None:
    since = datetime(2025, 5, 1, 12, tzinfo=UTC)
    query, params = build_query(by, UsageFilter(tenant_id=3, key_id=9, model=HOSTILE, since=since))
    assert isinstance(query, sql.Composed)
    text = query.as_string(None)
    assert HOSTILE not in text and "DROP" not in text
    assert params["model"] == HOSTILE and params["tenant_id"] == 3 and params["key_id"] == 9
    assert params["since"] == since and params["since_day"] == date(2025, 5, 1)
    # Every parameter the SQL names is given, and each filter applies to both ledger and roll-up.
    assert set(re.findall(r"%\((\w+)\)s", text)) <= set(params)
    for name in ("tenant_id", "key_id", "model"):
        assert text.count(f"{name} = %({name})s") == 2
    assert "ts >= %(since)s" in text and "day >= %(since_day)s" in text


def test_usage_sql_without_filters_reads_everything() -> None:
    query, params = build_query("day", UsageFilter())
    text = query.as_string(None)
    assert "WHERE true GROUP BY" in text and "since" not in params


def test_usage_groups_are_a_closed_list() -> None:
    with pytest.raises(AccountsError, match="cannot group usage by 'model; DROP'"):
        build_query("model; DROP", UsageFilter())
    with pytest.raises(AccountsError, match="did you mean 'tenant'"):
        build_query("tenants", UsageFilter())


# --- the database URL ---------------------------------------------------------------------------


def a_plan(state_dir: Path, **database: object) -> Plan:
    """A real plan (made from a one-model spec) whose database section is ``database``."""
    text = (
        "name: t\ngateway: {master_key: '${TWLLM_MASTER_KEY}'}\nmodels:\n  - {name: a, model: llama-3.1-8b-instruct}\n"
    )
    plan = make_plan(parse_spec(text, "t.yaml", {"TWLLM_MASTER_KEY": "sk-t"}), GpuInventory(1, 80, "test"), state_dir)
    fields = {"embedded": False, "data_dir": None, "port": None, "url_env": None, "url": None, **database}
    return plan.model_copy(update={"database": DatabasePlan.model_validate(fields)})


def write_plan(tmp_path: Path, **database: object) -> Path:
    (tmp_path / "plan.json").write_text(a_plan(tmp_path, **database).to_json())
    return tmp_path


def test_embedded_database_url(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "postgres")
    plan = write_plan(tmp_path, embedded=True, data_dir=data_dir, port=15999)
    # No password file (a cluster an older twllm made with trust): a URL without a password.
    assert database_url(plan) == "postgresql://twllm@127.0.0.1:15999/twllm"
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "db_password").write_text("pw-from-the-state-dir\n")
    assert database_url(plan) == "postgresql://twllm:pw-from-the-state-dir@127.0.0.1:15999/twllm"
    assert database_url(Plan.read(plan / "plan.json")) == database_url(str(plan))
    # A plan without data_dir: the state dir's postgres/ is meant.
    assert database_url(a_plan(tmp_path, embedded=True, port=15999)) == database_url(plan)


def test_external_database_url_literal_or_from_the_environment(tmp_path: Path) -> None:
    literal = a_plan(tmp_path, url="postgresql://app@db.internal/twllm")
    assert database_url(literal) == "postgresql://app@db.internal/twllm"
    plan = write_plan(tmp_path, url_env="ACME_DB_URL")
    secret_url = "postgresql://app:S3CRET@db.internal/twllm"
    assert database_url(plan, environ={"ACME_DB_URL": secret_url}) == secret_url
    with pytest.raises(RuntimeFailure, match=r"read from \$ACME_DB_URL, which is not set") as caught:
        database_url(plan, environ={})
    assert "export ACME_DB_URL" in (caught.value.hint or "")


def test_a_state_dir_without_a_plan(tmp_path: Path) -> None:
    with pytest.raises(RuntimeFailure, match="no plan.json in"):
        database_url(tmp_path)
    (tmp_path / "plan.json").write_text(json.dumps({"name": "t"}))
    with pytest.raises(ContractError, match="is not a plan this twllm can read: .*database: Field required"):
        database_url(tmp_path)
