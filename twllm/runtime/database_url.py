"""Where a deployment's database is: its URL read from the state directory's plan (or a Plan)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from twllm.errors import RuntimeFailure
from twllm.plan.model import Plan
from twllm.runtime.database import DATABASE, SUPERUSER, EmbeddedPostgres
from twllm.runtime.state import StateDir


def database_url(source: StateDir | Path | str | Plan, environ: Mapping[str, str] | None = None) -> str:
    """The URL of a deployment's database, from its state directory or its plan.

    ``source`` is a state directory (path or StateDir; its plan.json is read) or a Plan.
    Embedded: ``postgresql://twllm:PASSWORD@127.0.0.1:PORT/twllm`` with the password read from
    the secrets folder beside the data directory (``<state_dir>/secrets/db_password``; no
    password if there is none, as for a cluster an older twllm made with trust). External: the
    plan's literal URL, or the value of the environment variable it names. The URL may hold a
    password: show it only through ``mask_password``."""
    plan = _plan(source)
    db = plan.database
    env = os.environ if environ is None else environ
    if db.embedded:
        if db.port is None:
            raise RuntimeFailure(
                "the plan's embedded database has no port",
                hint="deploy (or render) the spec again to rewrite plan.json",
            )
        data_dir = db.data_dir or (Path(plan.state_dir) / "postgres" if plan.state_dir else None)
        if not data_dir:
            return f"postgresql://{SUPERUSER}@127.0.0.1:{db.port}/{DATABASE}"
        return EmbeddedPostgres(Path(data_dir), db.port).url
    if db.url:
        return db.url
    var = db.url_env
    if not var:
        raise RuntimeFailure(
            "the plan names no database URL", hint="set database.url in the spec, or omit it for the embedded database"
        )
    value = env.get(var, "")
    if not value:
        raise RuntimeFailure(
            f"the database URL is read from ${var}, which is not set",
            hint=f"export {var} as when the deployment was started",
        )
    return value


def _plan(source: StateDir | Path | str | Plan) -> Plan:
    if isinstance(source, Plan):
        return source
    sd = source if isinstance(source, StateDir) else StateDir(Path(source))
    plan = sd.read_plan()
    if plan is None:
        raise RuntimeFailure(
            f"no plan.json in {sd.root}",
            hint="pass the state directory of a deployment (twllm deploy writes it)",
        )
    return plan
