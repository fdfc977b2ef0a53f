"""The embedded PostgreSQL's URL and command, and password masking in database errors."""

from __future__ import annotations

import base64
import hashlib
import hmac
import shutil
import stat
import sys
import tempfile
from pathlib import Path

import pytest

from twllm.accounting.dburl import mask_password
from twllm.errors import RuntimeFailure
from twllm.runtime import database
from twllm.runtime.database import EmbeddedPostgres, check_external, password_file_for, scram_verifier, short_socket_dir

SECRET = "s3cr3t-Pa55"


@pytest.fixture
def cluster(tmp_path: Path) -> Path:
    """A data directory that looks initialized (only PG_VERSION; nothing runs)."""
    data = tmp_path / "postgres"
    data.mkdir()
    (data / "PG_VERSION").write_text("18\n")
    return data


@pytest.fixture
def not_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(database, "_run_as", lambda create: None)


def _setting(argv: list[str], name: str) -> str:
    values = [
        argv[i + 1].split("=", 1)[1]
        for i, a in enumerate(argv[:-1])
        if a == "-c" and argv[i + 1].startswith(name + "=")
    ]
    assert len(values) == 1, argv
    return values[0]


def test_url_is_loopback_tcp_with_the_password_kept_beside_the_data_dir(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "postgres", 55432)
    assert pg.password_file == tmp_path / "secrets" / "db_password" == password_file_for(tmp_path / "postgres")
    # Before initialize() made a password (or for a cluster an older twllm made with trust): none.
    assert pg.password() is None and pg.url == "postgresql://twllm@127.0.0.1:55432/twllm"
    assert pg._make_password() == pg.password()
    secret = pg.password()
    assert secret and len(secret) >= 40
    assert pg.url == f"postgresql://twllm:{secret}@127.0.0.1:55432/twllm"
    assert pg.display_url == "postgresql://twllm:***@127.0.0.1:55432/twllm"
    assert stat.S_IMODE(pg.password_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(pg.password_file.parent.stat().st_mode) == 0o700
    assert pg._make_password() == secret  # generated once
    assert secret not in repr(pg)


def test_scram_verifier_is_what_postgresql_stores() -> None:
    salt = bytes(range(16))
    verifier = scram_verifier("pencil", salt)
    assert verifier == scram_verifier("pencil", salt) != scram_verifier("pencil")
    assert "pencil" not in verifier
    head, keys = verifier.split("$", 1)[1].split("$")
    assert head == f"4096:{base64.b64encode(salt).decode()}"
    stored, server = (base64.b64decode(k) for k in keys.split(":"))
    assert len(stored) == len(server) == 32
    # RFC 5802: StoredKey = H(HMAC(SaltedPassword, "Client Key")).
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", salt, 4096)
    assert stored == hashlib.sha256(hmac.new(salted, b"Client Key", hashlib.sha256).digest()).digest()


@pytest.mark.parametrize(
    ("hba", "trusts"),
    [
        ("local all all trust\nhost all all 127.0.0.1/32 trust\n", True),
        ("# Written by twllm: trust on the unix socket\nlocal all all scram-sha-256\n", False),
        ("host all all 127.0.0.1/32 scram-sha-256  # not trust\n", False),
        ("  host   all all 10.0.0.0/8   TRUST\n", True),
        (database._HBA, False),
    ],
)
def test_trust_lines_are_found_in_pg_hba(hba: str, trusts: bool) -> None:
    assert bool(database._TRUST_LINE.search(hba)) is trusts
    assert "trust" not in database._HBA


def test_launch_runs_postgres_in_the_foreground(cluster: Path, not_root: None) -> None:
    launch = EmbeddedPostgres(cluster, 55432).launch()
    argv = launch.argv
    assert Path(argv[0]).name == "postgres" and Path(argv[0]).is_file()
    assert argv[argv.index("-D") + 1] == str(cluster)
    assert argv[argv.index("-p") + 1] == "55432"
    assert argv[argv.index("-k") + 1] == ""  # no unix socket without a socket folder
    assert _setting(argv, "listen_addresses") == "127.0.0.1"
    assert _setting(argv, "max_connections") == "100"
    assert _setting(argv, "logging_collector") == "off"
    assert _setting(argv, "password_encryption") == "scram-sha-256"
    assert not {"pg_ctl", "start", "-l"} & set(argv)
    assert launch.env == {"LC_ALL": "C"}


def test_launch_as_root_drops_to_the_postgres_user(cluster: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(database, "_run_as", lambda create: database._User(4242, 4343))
    argv = EmbeddedPostgres(cluster, 55432).launch().argv
    assert argv[0] == sys.executable
    assert argv[5:7] == ["4242", "4343"]
    assert Path(argv[7]).name == "postgres" and argv[8:10] == ["-D", str(cluster)]


def test_launch_uses_the_clusters_own_major_version(cluster: Path, not_root: None) -> None:
    (cluster / "PG_VERSION").write_text("16\n")
    postgres = Path(EmbeddedPostgres(cluster, 55432).launch().argv[0])
    assert postgres.parent == database.postgres_bin_dir(16)


def test_launch_needs_an_initialized_cluster(tmp_path: Path) -> None:
    with pytest.raises(RuntimeFailure, match="no PostgreSQL cluster"):
        EmbeddedPostgres(tmp_path / "missing", 55432).launch()


def test_an_unshipped_major_version_is_refused(cluster: Path) -> None:
    (cluster / "PG_VERSION").write_text("9\n")
    with pytest.raises(RuntimeFailure, match="PostgreSQL 9") as err:
        EmbeddedPostgres(cluster, 55432).initialize()
    assert err.value.hint and "pg_upgrade" in err.value.hint


def test_initialize_refuses_a_folder_that_is_not_a_cluster(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeFailure, match="not empty"):
        EmbeddedPostgres(tmp_path, 55432).initialize()
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_socket_folder_goes_to_postgres(cluster: Path, not_root: None) -> None:
    argv = EmbeddedPostgres(cluster, 55432, Path("/tmp/twllm-pg-x")).launch().argv
    assert argv[argv.index("-k") + 1] == "/tmp/twllm-pg-x"
    assert _setting(argv, "unix_socket_permissions") == "0700"


def test_a_socket_folder_too_long_for_a_unix_socket_is_refused(cluster: Path, not_root: None) -> None:
    with pytest.raises(RuntimeFailure, match="too long") as err:
        EmbeddedPostgres(cluster, 55432, Path("/tmp") / ("d" * 100)).launch()
    assert err.value.hint and "short_socket_dir" in err.value.hint


def test_short_socket_dir_is_short_and_stable_per_data_dir(tmp_path: Path) -> None:
    deep = tmp_path / ("x" * 200) / "postgres"
    folder = short_socket_dir(deep)
    assert folder == short_socket_dir(deep) != short_socket_dir(tmp_path)
    assert len(str(folder / ".s.PGSQL.65535.lock")) <= 107


@pytest.mark.parametrize(
    ("dsn", "masked"),
    [
        (f"postgresql://alice:{SECRET}@db.example:5432/prod", "postgresql://alice:***@db.example:5432/prod"),
        (f"postgres://alice:{SECRET}@db/prod?sslmode=require", "postgres://alice:***@db/prod?sslmode=require"),
        (
            f"postgresql://alice@db/prod?password={SECRET}&sslmode=require",
            "postgresql://alice@db/prod?password=***&sslmode=require",
        ),
        (f"postgresql://alice:pa/ss@wo:rd{SECRET}@db/prod", "postgresql://alice:***@db/prod"),
        (f"host=db user=alice password={SECRET} dbname=prod", "host=db user=alice password=*** dbname=prod"),
        (f"host=db password = '{SECRET} x' dbname=prod", "host=db password = *** dbname=prod"),
        ("postgresql://alice@db/prod", "postgresql://alice@db/prod"),
    ],
)
def test_mask_password(dsn: str, masked: str) -> None:
    assert mask_password(dsn) == masked


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://alice:{SECRET}@127.0.0.1:1/prod",
        f"postgresql://alice@127.0.0.1:1/prod?password={SECRET}",
        f"host=127.0.0.1 port=1 user=alice password={SECRET} dbname=prod",
    ],
)
def test_check_external_names_host_and_database_but_not_the_password(url: str) -> None:
    with pytest.raises(RuntimeFailure) as err:
        check_external(url, timeout=2)
    shown = f"{err.value} {err.value.hint} {err.value!r}"
    assert SECRET not in shown
    assert "127.0.0.1:1" in str(err.value) and "'prod'" in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_check_external_on_a_malformed_url_hides_the_password() -> None:
    with pytest.raises(RuntimeFailure, match="not a valid PostgreSQL URL") as err:
        check_external(f"postgresql://alice:{SECRET}@db/prod?no_such_option=1")
    assert SECRET not in f"{err.value} {err.value.hint}"


def test_initialize_refuses_a_cluster_postgres_could_not_own(cluster: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(database, "_run_as", lambda create: database._User(cluster.stat().st_uid + 1, 0))
    with pytest.raises(RuntimeFailure, match="twllm-postgres") as err:
        EmbeddedPostgres(cluster, 55432).initialize()
    assert err.value.hint and "chown" in err.value.hint


def test_a_socket_folder_that_is_a_symlink_is_refused(cluster: Path, tmp_path: Path, not_root: None) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "sock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RuntimeFailure, match="socket folder"):
        EmbeddedPostgres(cluster, 55432, tmp_path / "sock").initialize()


def test_an_acl_entry_lets_one_user_search_a_folder_and_no_one_else(tmp_path: Path) -> None:
    folder = tmp_path / "home"
    folder.mkdir(mode=0o700)
    folder.chmod(0o750)
    if not database._let_search(folder, 4242):
        # a filesystem without POSIX ACLs: the documented fallback, others may search
        assert stat.S_IMODE(folder.stat().st_mode) == 0o751
        return
    entries = database._acl_entries(folder, 0)
    assert entries[(database._ACL_USER, 4242)] == 1  # search only: no listing
    assert entries[(database._ACL_GROUP_OBJ, database._ACL_NO_ID)] == 0o5  # the group keeps r-x
    assert entries[(database._ACL_OTHER, database._ACL_NO_ID)] == 0  # others still nothing
    assert entries[(database._ACL_MASK, database._ACL_NO_ID)] == 0o5
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    user = database._User(4242, 4343)
    assert database._can_search(folder, folder.stat(), user)
    assert not database._can_search(folder, folder.stat(), database._User(4244, 4343))
    database._acl_grant_search(folder, 4242)  # idempotent
    assert database._acl_entries(folder, 0) == entries
    database._acl_grant_search(folder, 4243)  # a second entry keeps the first
    assert {k[1] for k in database._acl_entries(folder, 0) if k[0] == database._ACL_USER} == {4242, 4243}


@pytest.mark.root
def test_grant_search_makes_the_state_dir_0710_for_postgres_group_only() -> None:
    # Above the state dir only folders anyone may search: nothing there is changed.
    base = Path(tempfile.mkdtemp(prefix="twllm-grant-"))
    try:
        base.chmod(0o711)
        state = base / "state"
        state.mkdir()
        state.chmod(0o755)  # as an older twllm left it (o+x) or a umask of 022 made it
        user = database._User(4242, 4343)
        database._grant_search(state, user, private=state)
        info = state.stat()
        assert (info.st_gid, stat.S_IMODE(info.st_mode)) == (4343, 0o710)
        assert stat.S_IMODE(base.stat().st_mode) == 0o711 and base.stat().st_gid == 0
    finally:
        shutil.rmtree(base)
