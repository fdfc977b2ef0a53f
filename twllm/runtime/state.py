"""The state directory of a deployment: where the plan, pids, ports, logs and secrets live.

    <state_dir>/
      plan.json                 the plan being run
      rendered/                 litellm_config.yaml, gateway.json (what the gateway reads)
      state.json                written by the supervisor: every component's pid, port, health
      supervisor.pid / .log     the background supervisor
      logs/<component>.log      one rotated log per component (.log.1, .log.2 ...)
      secrets/engine_key        generated key engines require
      secrets/db_password       generated password of the embedded database's ``twllm`` role
      spool/                    ledger rows the gateway journals until PostgreSQL has them
      postgres/  ollama/        data of the embedded database and Ollama's models

All of it is private to the user who deploys: folders 0700, files 0600 (``ensure()`` creates it so
and tightens what an older twllm left wider; the supervisor and its children run with umask 077).
One exception, only when twllm runs as root: PostgreSQL then runs as the system user
``twllm-postgres`` and must traverse the state directory to reach ``postgres/``, so the state
directory itself is 0710 with that user's own group (search only: no listing, and no other user
gains anything). See twllm.runtime.database.
"""

from __future__ import annotations

import os
import pwd
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path

# Re-exported (the `as` form marks it): the runtime imports both from here.
from twllm.files import PRIVATE_FILE as PRIVATE_FILE
from twllm.files import write_atomic as write_atomic
from twllm.gateway.settings import GatewaySettings
from twllm.plan.model import Plan

# state.json's types live beside the other cross-process contracts; the runtime uses them from here.
from twllm.status import ComponentState as ComponentState
from twllm.status import ComponentStatus as ComponentStatus
from twllm.status import DeploymentState as DeploymentState
from twllm.status import DeploymentStatus as DeploymentStatus

PRIVATE_DIR = 0o700
DB_PASSWORD_FILE = "db_password"
"""In ``secrets/``: the embedded PostgreSQL's password (see twllm.runtime.database)."""
ROOT_RUN_AS = "twllm-postgres"
"""The system user initdb and postgres run as when twllm runs as root (see twllm.runtime.database)."""
_NOT_TIGHTENED = frozenset({"postgres", "postgres.initdb"})
"""Not walked into: PostgreSQL keeps its data directory 0700/0600 itself (and owns it when twllm
runs as root)."""


class StateDir:
    """Paths inside one deployment's state directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()

    plan = property(lambda self: self.root / "plan.json")
    rendered = property(lambda self: self.root / "rendered")
    state_file = property(lambda self: self.root / "state.json")
    supervisor_pid = property(lambda self: self.root / "supervisor.pid")
    supervisor_log = property(lambda self: self.root / "supervisor.log")
    logs = property(lambda self: self.root / "logs")
    secrets_dir = property(lambda self: self.root / "secrets")

    def log_of(self, component: str) -> Path:
        return self.logs / f"{component}.log"

    def ensure(self) -> None:
        """Create the folders (0700), and tighten anything an older twllm left readable to others."""
        for path in (self.root, self.rendered, self.logs, self.secrets_dir):
            mkdir_private(path)
        tighten(self.root)

    def engine_key(self) -> str:
        """The key engines require, generated once per state directory (file mode 0600)."""
        return read_or_create_secret(self.secrets_dir / "engine_key", lambda: "sk-engine-" + secrets.token_urlsafe(24))

    def read_state(self) -> DeploymentState | None:
        try:
            return DeploymentState.from_json(self.state_file.read_bytes())
        except (FileNotFoundError, ValueError):  # ValueError: not JSON, an unknown key or status
            return None

    def write_state(self, state: DeploymentState) -> None:
        state.updated_at = time.time()
        write_atomic(self.state_file, state.to_json())

    def read_plan(self) -> Plan | None:
        """The plan being run (None: never deployed here); ContractError when plan.json does not
        read back as a Plan."""
        try:
            return Plan.read(self.plan)
        except FileNotFoundError:
            return None

    def guard_policies(self) -> list[str] | None:
        """The guard policies the rendered gateway settings define (None: nothing rendered yet)."""
        try:
            settings = GatewaySettings.load(self.rendered / "gateway.json")
        except FileNotFoundError:
            return None
        return sorted(settings.guard.policies)

    def supervisor_alive(self) -> int | None:
        """The supervisor's pid when it is running, else None."""
        try:
            pid = int(self.supervisor_pid.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid_alive(pid) else None


def mkdir_private(path: Path) -> None:
    """Create ``path`` and every missing folder above it with mode 0700 (existing ones untouched)."""
    missing = []
    folder = Path(path)
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:
            continue
        folder.chmod(PRIVATE_DIR)  # mkdir's mode passes through the umask


def read_or_create_secret(path: Path, make: Callable[[], str]) -> str:
    """The secret in ``path``; made by ``make()`` and written (0600, folder 0700) if missing."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        pass
    mkdir_private(path.parent)
    value = make()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    except FileExistsError:  # made meanwhile by another process: that one counts
        return path.read_text(encoding="utf-8").strip()
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(value)
    return value


def tighten(root: Path) -> None:
    """Take group and other permissions off everything of this user under ``root``.

    ``root`` itself may keep group search (0710) when its group is that of the system user
    PostgreSQL runs as under root (the one exception; see twllm.runtime.database). Symbolic links
    are never followed; the embedded database's data directory and whatever belongs to another
    user are left as they are."""
    me = os.geteuid()
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        for name in [*dirs, *files]:
            _strip(here / name, me, 0)
        dirs[:] = [d for d in dirs if (here / d).lstat().st_uid == me and not (here == root and d in _NOT_TIGHTENED)]
    _strip(root, me, 0o010 if _is_postgres_group(root.stat().st_gid) else 0)


def _strip(path: Path, owner: int, allowed: int) -> None:
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or info.st_uid != owner:
        return
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077 & ~allowed:
        path.chmod(mode & (0o700 | allowed))


def _is_postgres_group(gid: int) -> bool:

    try:
        return gid != 0 and pwd.getpwnam(ROOT_RUN_AS).pw_gid == gid
    except KeyError:
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie counts as gone
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True
