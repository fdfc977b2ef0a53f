"""`twllm db|tenants|keys|usage` end to end through `python -m twllm`, against a real PostgreSQL.

The state directory holds only what the commands read: a plan.json whose database section points
at the test's database (external URL, URL from a variable, or the embedded form on its port).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from pgutil import free_port

from twllm.plan.build import make_plan
from twllm.plan.model import DatabasePlan
from twllm.plan.placement import GpuInventory
from twllm.runtime.database import EmbeddedPostgres
from twllm.spec.resolve import parse_spec

pytestmark = pytest.mark.integration
UTC = UTC
ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS = [
    "0001_accounts",
    "0002_guard_policy",
    "0003_tenant_disabled",
    "0004_tenant_display_name",
    "0005_budget_holds",
    "0006_requested_model",
]


SPEC = """
name: accounts-test
gateway: {master_key: "${TWLLM_MASTER_KEY}"}
models:
  - {name: chat, model: llama-3.2-1b-instruct}
  - {name: embed, model: llama-3.2-1b-instruct}
"""


def state_dir(tmp_path: Path, database: dict) -> Path:
    """A state directory as deploy leaves it, as far as these commands look: plan.json (serving
    chat and embed), its database section pointing at ``database``."""
    folder = tmp_path / "state"
    folder.mkdir(exist_ok=True)
    plan = make_plan(parse_spec(SPEC, "accounts.yaml", {"TWLLM_MASTER_KEY": "sk-t"}), GpuInventory(2, 80, "t"), folder)
    fields = {"embedded": False, "data_dir": None, "port": None, "url_env": None, "url": None, **database}
    plan = plan.model_copy(update={"database": DatabasePlan.model_validate(fields)})
    (folder / "plan.json").write_text(plan.to_json())
    return folder


class Cli:
    def __init__(self, state: Path, env: dict[str, str] | None = None) -> None:
        self.state = state
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TWLLM_") and k != "DATABASE_URL"}
        self.env.update(env or {})

    def __call__(self, *args: str, state: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "twllm", *args] + (["--state-dir", str(self.state)] if state else [])
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT, env=self.env)
        assert "Traceback" not in done.stderr, done.stderr
        return done

    def ok(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = self(*args)
        assert done.returncode == 0, f"{args}: {done.stderr}"
        return done

    def json(self, *args: str) -> object:
        return json.loads(self.ok(*args, "--json").stdout)


def test_operator_flow(url: str, tmp_path: Path) -> None:
    cli = Cli(state_dir(tmp_path, {"url": url}))

    # Before migrating, admin commands say what to do.
    done = cli("tenants", "list")
    assert done.returncode == 1 and "twllm db migrate" in done.stderr
    assert cli.ok("db", "migrate", "--dry-run").stdout.strip() == "pending: " + ", ".join(MIGRATIONS)
    assert cli.json("db", "migrate") == {"applied": MIGRATIONS}
    assert "nothing to apply" in cli.ok("db", "migrate").stdout

    # Tenants.
    assert "tenant acme created" in cli.ok("tenants", "create", "acme").stdout
    cli.ok("tenants", "create", "beta")
    done = cli("tenants", "create", "acme")
    assert done.returncode == 2 and "tenant 'acme' already exists" in done.stderr
    assert [t["name"] for t in cli.json("tenants", "list")] == ["acme", "beta"]

    # Display names: any text for people; the name stays the slug commands use.
    created = cli.json("tenants", "create", "ntuh-rad", "--display-name", "  臺大醫院 放射科 ")
    assert (created["name"], created["display_name"], created["label"]) == (
        "ntuh-rad",
        "臺大醫院 放射科",
        "臺大醫院 放射科",
    )
    done = cli.ok("tenants", "set-display-name", "ntuh-rad", '<b>臺大 "影像"</b>')
    assert 'display name <b>臺大 "影像"</b>' in done.stdout
    listed = {t["name"]: t for t in cli.json("tenants", "list")}
    assert listed["ntuh-rad"]["display_name"] == '<b>臺大 "影像"</b>' and listed["acme"]["display_name"] is None
    assert listed["acme"]["label"] == "acme"
    lines = cli.ok("tenants", "list").stdout.splitlines()
    assert lines[0].split() == ["tenant", "display", "name", "id", "active", "keys", "created"]
    assert any(line.startswith("ntuh-rad") and '<b>臺大 "影像"</b>' in line for line in lines)
    for bad, message in (("", "is empty"), ("a\nb", "U+000A"), ("x" * 101, "101 characters")):
        done = cli("tenants", "set-display-name", "ntuh-rad", bad)
        assert done.returncode == 2 and message in done.stderr, done.stderr
    done = cli("tenants", "create", "other", "--display-name", "tab\there")
    assert done.returncode == 2 and "control character (U+0009" in done.stderr
    assert cli.json("tenants", "set-display-name", "ntuh-rad")["display_name"] is None
    with psycopg.connect(url, autocommit=True) as c:
        assert c.execute("SELECT count(*) FROM tenants WHERE name = 'other'").fetchone() == (0,)
        c.execute("DELETE FROM tenants WHERE name = 'ntuh-rad'")
    assert "tenant beta disabled" in cli.ok("tenants", "disable", "beta").stdout
    assert "already was" in cli.ok("tenants", "disable", "beta").stdout
    with psycopg.connect(url, autocommit=True) as c:
        assert c.execute("SELECT disabled_at IS NOT NULL FROM tenants WHERE name = 'beta'").fetchone() == (True,)
    assert cli.json("tenants", "enable", "beta")["changed"] is True
    with psycopg.connect(url, autocommit=True) as c:
        assert c.execute("SELECT disabled_at IS NULL FROM tenants WHERE name = 'beta'").fetchone() == (True,)
    done = cli("tenants", "disable", "nobody")
    assert done.returncode == 2 and "nobody" in done.stderr

    # A key: the secret alone on stdout, once, with a warning on stderr.
    done = cli.ok(
        "keys",
        "create",
        "--tenant",
        "acme",
        "--models",
        "chat,embed",
        "--rpm",
        "60",
        "--tpm",
        "5000",
        "--budget",
        "100",
        "--period",
        "monthly",
        "--expires",
        "30d",
        "--name",
        "acme-prod",
    )
    secret = done.stdout.strip()
    assert secret.startswith("sk-tw-") and len(secret.splitlines()) == 1
    assert "only time the key is shown" in done.stderr and secret not in done.stderr
    assert "models chat,embed" in done.stderr and "budget 100/monthly" in done.stderr
    keys = cli.json("keys", "list")
    assert len(keys) == 1 and keys[0]["prefix"] == secret[:12] and secret not in json.dumps(keys)
    key = keys[0]
    assert (
        key["tenant"],
        key["name"],
        key["models"],
        key["rpm"],
        key["tpm"],
        key["budget"],
        key["budget_period"],
        key["status"],
    ) == ("acme", "acme-prod", ["chat", "embed"], 60, 5000, 100.0, "monthly", "active")
    beta = json.loads(cli.ok("keys", "create", "--tenant", "beta", "--json").stdout)
    assert beta["secret"].startswith("sk-tw-") and beta["key"]["models"] is None

    # Requests recorded by the gateway (written here as the spend logger writes them).
    now = datetime.now(UTC)
    rows = [
        (
            now - timedelta(minutes=i),
            f"r{i}",
            key["id"] if i % 3 else beta["key"]["id"],
            "chat" if i % 2 else "embed",
            100,
            20,
            Decimal("0.5"),
            500 if i == 4 else 200,
        )
        for i in range(1, 31)
    ]
    tenant_ids = {t["name"]: t["id"] for t in cli.json("tenants", "list")}
    tenant_of = {key["id"]: tenant_ids["acme"], beta["key"]["id"]: tenant_ids["beta"]}
    with psycopg.connect(url, autocommit=True) as c:
        for ts, rid, key_id, model, pt, ct, cost, status in rows:
            c.execute(
                "INSERT INTO spend_ledger (ts, request_id, tenant_id, key_id, model, prompt_tokens, "
                "completion_tokens, cost, status_code) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (ts, rid, tenant_of[key_id], key_id, model, pt, ct, cost, status),
            )

    report = cli.json("usage", "--by", "tenant")
    by_tenant = {r["tenant"]: r for r in report["rows"]}
    acme_rows = [r for r in rows if r[2] == key["id"]]
    assert by_tenant["acme"]["requests"] == len(acme_rows)
    assert by_tenant["acme"]["cost"] == pytest.approx(0.5 * len(acme_rows))
    assert report["totals"][0]["requests"] == 30 and report["totals"][0]["errors"] == 1
    assert report["totals"][0]["prompt_tokens"] == 3000 and report["totals"][0]["currency"] == "TWD"
    by_model = {r["model"]: r["requests"] for r in cli.json("usage", "--by", "model", "--tenant", "acme")["rows"]}
    assert by_model == {
        "chat": sum(1 for r in acme_rows if r[3] == "chat"),
        "embed": sum(1 for r in acme_rows if r[3] == "embed"),
    }
    by_key = cli.json("usage", "--by", "key", "--key", key["prefix"], "--since", "all")["rows"]
    assert [(r["key"], r["requests"]) for r in by_key] == [(key["prefix"], len(acme_rows))]
    csv_lines = cli.ok("usage", "--by", "day", "--model", "chat", "--csv").stdout.splitlines()
    assert csv_lines[0] == "day,requests,errors,prompt_tokens,completion_tokens,cost,currency"
    assert sum(int(line.split(",")[1]) for line in csv_lines[1:]) == sum(1 for r in rows if r[3] == "chat")
    table = cli.ok("usage", "--by", "tenant").stdout
    assert "acme" in table and "total" in table
    spend = {k["id"]: k["spend"] for k in cli.json("keys", "list", "--tenant", "acme")}
    assert spend == {key["id"]: pytest.approx(0.5 * len(acme_rows))}

    # Rotate: a new secret, the old key revoked at once, the spend carried over.
    done = cli.ok("keys", "rotate", key["prefix"])
    rotated = done.stdout.strip()
    assert rotated.startswith("sk-tw-") and rotated != secret and "now revoked" in done.stderr
    keys = {k["prefix"]: k for k in cli.json("keys", "list", "--tenant", "acme")}
    assert keys[key["prefix"]]["status"] == "revoked"
    new = keys[rotated[:12]]
    assert (new["status"], new["rotated_from"], new["models"], new["rpm"], new["expires_at"]) == (
        "active",
        key["id"],
        ["chat", "embed"],
        60,
        key["expires_at"],
    )
    assert new["spend"] == pytest.approx(0.5 * len(acme_rows))
    done = cli("keys", "rotate", str(key["id"]))
    assert done.returncode == 2 and "is revoked" in done.stderr

    # Revoke.
    assert "revoked" in cli.ok("keys", "revoke", str(new["id"])).stdout
    assert "already revoked" in cli.ok("keys", "revoke", rotated[:12]).stdout
    assert [t["active_keys"] for t in cli.json("tenants", "list")] == [0, 1]


def test_mistakes_exit_2_with_a_message(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from twllm.cli.app import main  # in-process: a dozen subprocesses would cost a second each

    state = ["--state-dir", str(state_dir(tmp_path, {"url": url}))]
    assert main(["db", "migrate", *state]) == 0
    assert main(["tenants", "create", "acme", *state]) == 0
    for args, message in [
        (("keys", "create", "--tenant", "acm"), "no tenant 'acm' (did you mean 'acme'?)"),
        (("keys", "create", "--tenant", "acme", "--expires", "soon"), "not a duration: 'soon'"),
        (("keys", "create", "--tenant", "acme", "--period", "monthly"), "--period needs --budget"),
        (("keys", "create", "--tenant", "acme", "--budget", "lots"), "not an amount"),
        (("keys", "create", "--tenant", "acme", "--rpm", "0"), "--rpm must be at least 1"),
        (("keys", "revoke", "sk-tw-nope00"), "no key 'sk-tw-nope00'"),
        (("keys", "rotate", "whatever"), "is not a key id"),
        (("tenants", "create", "bad name"), "invalid tenant name"),
        (("usage", "--by", "week"), "cannot group usage by 'week'"),
        (("usage", "--since", "yesterday"), "not a duration"),
        (("usage", "--json", "--csv"), "exclude each other"),
    ]:
        capsys.readouterr()
        code = main([*args, *state])
        out, err = capsys.readouterr()
        assert (code, out) == (2, ""), (args, err)
        assert message in " ".join(err.split()), (args, err)
        assert "Traceback" not in err
    capsys.readouterr()
    assert main(["keys", "create", "--tenant", "acme", "--models", "chat,other", *state]) == 0
    assert "not served by this deployment now: other" in capsys.readouterr().err


def test_the_database_url_from_a_variable_and_never_its_password(url: str, tmp_path: Path) -> None:
    cli = Cli(state_dir(tmp_path, {"url_env": "ACCOUNTS_TEST_DB_URL"}))
    done = cli("db", "migrate")
    assert done.returncode == 1 and "$ACCOUNTS_TEST_DB_URL, which is not set" in done.stderr
    # The test server takes only its own password, which its URL holds.
    password = urlsplit(url).password
    assert password
    cli.env["ACCOUNTS_TEST_DB_URL"] = url
    done = cli("db", "migrate", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"applied": MIGRATIONS}
    assert password not in done.stdout + done.stderr
    cli.env["ACCOUNTS_TEST_DB_URL"] = url.replace(password, "Hunter2-secret")
    done = cli("tenants", "list")
    assert done.returncode == 1 and "password authentication failed" in done.stderr
    assert "Hunter2" not in done.stderr + done.stdout and "***" in done.stderr
    cli.env["ACCOUNTS_TEST_DB_URL"] = f"postgresql://twllm:Hunter2-secret@127.0.0.1:{free_port()}/twllm"
    done = cli("tenants", "list")
    assert done.returncode == 1 and "cannot connect to the database" in done.stderr
    assert "Hunter2" not in done.stderr + done.stdout and "***" in done.stderr


def test_embedded_database_found_through_twllm_state_dir(server: EmbeddedPostgres, tmp_path: Path) -> None:
    folder = state_dir(tmp_path, {"embedded": True, "data_dir": str(server.data_dir), "port": server.port})
    cli = Cli(folder, {"TWLLM_STATE_DIR": str(folder)})
    done = cli("db", "migrate", state=False)
    assert done.returncode == 0, done.stderr
    began = time.perf_counter()
    done = cli("db", "maintain", "--keep-days", "400", "--json", state=False)
    assert done.returncode == 0, done.stderr
    print(f"\n`twllm db maintain` {time.perf_counter() - began:.2f} s (process start included)")
    result = json.loads(done.stdout)
    assert result["created"] == [] and result["retention"]["dropped"] == []
    done = cli("usage", state=False)
    assert done.returncode == 0 and "no requests in the last 7d" in done.stderr
    # The password came from the secrets folder beside the data directory, and was never shown.
    assert server.password() and server.password() not in done.stdout + done.stderr


def test_guard_policies_for_tenants_and_keys(url: str, tmp_path: Path) -> None:
    state = state_dir(tmp_path, {"url": url})
    (state / "rendered").mkdir()
    (state / "rendered" / "gateway.json").write_text(
        json.dumps({"guard": {"policies": {"strict": {}, "hospital": {}}}})
    )
    cli = Cli(state)
    cli.ok("db", "migrate")
    assert cli.json("tenants", "create", "clinic", "--guard-policy", "hospital")["guard_policy"] == "hospital"
    done = cli("tenants", "create", "other", "--guard-policy", "strickt")
    assert (
        done.returncode == 2 and "no guard policy 'strickt'" in done.stderr and "did you mean 'strict'" in done.stderr
    )
    key = cli.json("keys", "create", "--tenant", "clinic", "--guard-policy", "strict")["key"]
    assert key["guard_policy"] == "strict"
    assert cli.json("tenants", "set-policy", "clinic")["guard_policy"] is None
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT k.guard_policy, t.guard_policy FROM api_keys k JOIN tenants t ON t.id = k.tenant_id"
        ).fetchall()
    assert rows == [("strict", None)]
    rotated = cli.json("keys", "rotate", str(key["id"]))
    assert rotated["key"]["guard_policy"] == "strict", rotated
