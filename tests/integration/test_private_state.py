"""The state directory is private to the deploying user, and the embedded PostgreSQL takes only its
generated password — checked on a running deployment.

The supervisor runs the real database component and the real gateway component (its migrations
before start, its spool replay after stop, and the environment it is started with: the database
URL with the password); only the processes standing in for the engine and the LiteLLM proxy are
plain Python (the real ones are in the e2e tier). The stand-in gateway connects with the URL it
was given and creates files with its inherited umask. The folder above the state directory is
open to everyone (0755), so only the state directory's own modes keep a second OS user out.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from osuser import as_user, not_private, other_user, probe_paths, try_connect
from proxyutil import free_port

from twllm.accounting import migrate
from twllm.plan.build import ENGINE_KEY_ENV, make_plan
from twllm.plan.placement import GpuInventory
from twllm.runtime import control as runtime
from twllm.runtime.components import Component, build_components
from twllm.runtime.database import EmbeddedPostgres
from twllm.runtime.database_url import database_url
from twllm.runtime.engines.base import Launch, RuntimeContext
from twllm.runtime.state import ROOT_RUN_AS, DeploymentState, DeploymentStatus, StateDir
from twllm.runtime.supervisor import Supervisor
from twllm.spec.resolve import parse_spec

pytestmark = pytest.mark.integration

MASTER = "sk-private-master-0123456789"
SPEC = """
name: private
gateway: {{port: {gateway}, master_key: "${{K}}"}}
database: {{port: {database}}}
models:
  - {{name: m, model: llama-3.2-1b-instruct, device: cpu}}
"""
STAND_IN_GATEWAY = r"""
import http.server, os, sys
from pathlib import Path
import psycopg
from twllm.accounting.spool import Spool

with psycopg.connect(os.environ["TWLLM_DATABASE_URL"], connect_timeout=5) as conn:
    print("stand-in gateway: connected as", conn.execute("SELECT current_user").fetchone()[0], flush=True)
spool = Path(os.environ["TWLLM_SPOOL_DIR"])
Spool(spool).open()
(spool / "made-with-the-umask.txt").write_text("x")
os.makedirs(spool / "made-with-the-umask")
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.BaseHTTPRequestHandler).serve_forever()
"""


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def deployment() -> Iterator[dict]:
    # Not under pytest's tmp_path: as root, postgres runs as another user and must traverse to it.
    base = Path(tempfile.mkdtemp(prefix="twllm-private-"))
    base.chmod(0o755)
    ports = {"gateway": free_port(), "database": free_port(), "engine": free_port()}
    loaded = parse_spec(SPEC.format(**ports), str(base / "private.yaml"), {"K": MASTER})
    sd = StateDir(base / "state")
    plan = make_plan(loaded, GpuInventory(0), sd.root)

    def components(plan, ctx, rendered) -> list[Component]:
        database, _engine, gateway = build_components(plan, ctx, rendered)
        engine = Component(
            name="vllm-m-0",
            kind="engine",
            port=ports["engine"],
            start_timeout_s=30,
            launch=lambda: Launch([sys.executable, "-m", "http.server", str(ports["engine"]), "--bind", "127.0.0.1"]),
            ready=lambda: listening(ports["engine"]),
        )
        real_launch = gateway.launch

        def stand_in() -> Launch:
            real = real_launch()  # the real gateway's environment: TWLLM_DATABASE_URL, spool, keys
            return Launch([sys.executable, "-c", STAND_IN_GATEWAY, str(ports["gateway"])], real.env, real.cwd)

        gateway.launch, gateway.ready = stand_in, lambda: listening(ports["gateway"])
        return [database, engine, gateway]

    old_umask = os.umask(0o022)  # a login shell's: the modes must not come from the caller's umask
    try:
        sd.ensure()
        runtime._write_plan(loaded, plan, sd.plan, sd.rendered)
        sd.write_state(DeploymentState(name=plan.name))
        ctx = RuntimeContext(state_dir=sd.root, secrets={ENGINE_KEY_ENV: sd.engine_key(), "K": MASTER})
        supervisor = Supervisor(sd, plan, ctx, components=components)
        thread = threading.Thread(target=supervisor.run, daemon=True)
        thread.start()
    finally:
        os.umask(old_umask)
    try:
        began = time.monotonic()
        while (state := sd.read_state()) is None or state.generation < 1:
            assert thread.is_alive() and time.monotonic() - began < 120, state
            time.sleep(0.1)
        assert state.status == DeploymentStatus.READY, state
        pg = EmbeddedPostgres(Path(plan.database.data_dir), plan.database.port)
        yield {"sd": sd, "plan": plan, "pg": pg, "state": state}
    finally:
        supervisor.events.put("stop")
        thread.join(60)
        shutil.rmtree(base, ignore_errors=True)


def test_every_path_under_the_state_dir_is_private(deployment: dict) -> None:
    sd: StateDir = deployment["sd"]
    wrong, seen = not_private(sd.root)
    assert not wrong, wrong
    for rel in (
        "plan.json",
        "state.json",
        "supervisor.pid",
        "logs/database.log",
        "logs/gateway.log",
        "logs/vllm-m-0.log",
        "rendered/litellm_config.yaml",
        "rendered/gateway.json",
        "secrets/engine_key",
        "secrets/db_password",
        "spool/made-with-the-umask.txt",
        "spool/made-with-the-umask",
        "postgres/PG_VERSION",
        "postgres/pg_hba.conf",
    ):
        assert rel in seen, (rel, sorted(seen))
    root = sd.root.stat()
    if os.geteuid() == 0:
        # The one exception: postgres (as twllm-postgres) must traverse to postgres/; its own group only.
        assert stat.S_IMODE(root.st_mode) == 0o710 and root.st_gid == pwd.getpwnam(ROOT_RUN_AS).pw_gid
        assert (sd.root / "postgres").stat().st_uid == pwd.getpwnam(ROOT_RUN_AS).pw_uid
    else:
        assert stat.S_IMODE(root.st_mode) == 0o700


def test_every_client_uses_the_password_and_nothing_else_holds_it(deployment: dict) -> None:
    sd: StateDir = deployment["sd"]
    pg: EmbeddedPostgres = deployment["pg"]
    password = pg.password()
    assert password and pg.password_file == sd.secrets_dir / "db_password"
    assert "trust" not in (sd.root / "postgres" / "pg_hba.conf").read_text()
    # The gateway connected with the URL in its environment; its migrations ran before it started.
    assert "stand-in gateway: connected as twllm" in sd.log_of("gateway").read_text()
    url = database_url(sd)
    assert password in url and migrate.pending(url) == []
    # The command line finds it through the state directory.
    done = subprocess.run(
        [sys.executable, "-m", "twllm", "tenants", "list", "--state-dir", str(sd.root)],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("TWLLM_")},
    )
    assert done.returncode == 0, done.stderr
    assert password not in done.stdout + done.stderr
    # Without the password nobody gets in, the deploying user included.
    assert "no password supplied" in try_connect(host="127.0.0.1", port=pg.port, user="twllm", dbname="twllm")
    # Only secrets/db_password holds it: no log, no state.json, plan.json or rendered file, no argv.
    holders = [
        str(p.relative_to(sd.root))
        for p in sd.root.rglob("*")
        if p.is_file() and not p.is_symlink() and password.encode() in p.read_bytes()
    ]
    assert holders == ["secrets/db_password"]
    for component in deployment["state"].components:
        assert component.pid
        argv = Path(f"/proc/{component.pid}/cmdline").read_bytes()
        assert password.encode() not in argv, component.name


@pytest.mark.root
def test_another_os_user_can_neither_read_nor_connect(deployment: dict) -> None:
    uid, gid = other_user()
    sd: StateDir = deployment["sd"]
    pg: EmbeddedPostgres = deployment["pg"]
    paths = [
        sd.root,
        sd.state_file,
        sd.plan,
        sd.logs,
        sd.log_of("gateway"),
        sd.log_of("database"),
        sd.rendered,
        sd.rendered / "litellm_config.yaml",
        sd.rendered / "gateway.json",
        sd.secrets_dir,
        sd.secrets_dir / "db_password",
        sd.secrets_dir / "engine_key",
        sd.root / "spool",
        sd.root / "postgres",
        sd.root / "postgres" / "pg_hba.conf",
        sd.supervisor_pid,
    ]
    outcome = as_user(uid, gid, probe_paths(paths))
    assert set(outcome.values()) == {"PermissionError"}, outcome
    assert as_user(uid, gid, probe_paths([sd.root.parent])) == {str(sd.root.parent): "ok"}  # the parent is open
    tcp = {"host": "127.0.0.1", "port": pg.port, "user": "twllm", "dbname": "twllm"}
    refused = as_user(
        uid,
        gid,
        lambda: [try_connect(**tcp), try_connect(**tcp, password="guess"), try_connect(**{**tcp, "user": "postgres"})],
    )
    assert "no password supplied" in refused[0], refused
    assert "password authentication failed" in refused[1], refused
    assert "no password supplied" in refused[2], refused
