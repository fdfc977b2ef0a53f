"""The gateway's accounting hooks without a proxy or a database: decisions, rows, journal, errors."""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import json
import os
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from twllm.accounting import ledger as ledger_mod
from twllm.accounting.auth import Authenticator, Identity, KeyCache, KeyInfo, Rejection, _Entry, route_kind
from twllm.accounting.gateway_config import DatabaseUnavailable, GatewayConfig, Price
from twllm.accounting.keys import hash_key
from twllm.accounting.ledger import LedgerRow, LedgerWriter, insert_params, row_from_logging
from twllm.accounting.limits import (
    BudgetTracker,
    BudgetVerdict,
    RateDecision,
    RateLimiter,
    budget_decision,
    decide,
)
from twllm.accounting.spool import Spool, adopt, lock_file, read_rows

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
MASTER = "sk-unit-master-key"


def run(coro):
    return asyncio.run(coro)


# --- fakes ----------------------------------------------------------------------------------


class FakeConn:
    def __init__(self, db: FakeDb) -> None:
        self.db = db

    async def execute(self, query: str, params: Any = None) -> FakeCursor:
        self.db.executed.append((query, params))
        return FakeCursor(self.db.answer(query, params))


class FakeCursor:
    def __init__(self, row: Any) -> None:
        self.row = row

    async def fetchone(self) -> Any:
        return self.row


class FakeDb:
    """A Database whose answers a test sets, and which can be 'down'."""

    def __init__(self, answers: dict[str, Any] | None = None, *, down: bool = False, delay: float = 0) -> None:
        self.url = "postgresql://fake"
        self.answers = answers or {}
        self.down = down
        self.delay = delay
        self.executed: list[tuple[str, Any]] = []

    @property
    def usable(self) -> bool:
        return not self.down

    def answer(self, query: str, params: Any) -> Any:
        text = query if isinstance(query, str) else repr(query)  # psycopg.sql.SQL shows its text
        for marker, value in self.answers.items():
            if marker in text:
                return value(params) if callable(value) else value
        return None

    @asynccontextmanager
    async def connection(self, timeout: float = 2):
        if self.down:
            raise DatabaseUnavailable("down")
        if self.delay:
            await asyncio.sleep(self.delay)
        yield FakeConn(self)


def key(**changes: Any) -> KeyInfo:
    base = dict(id=7, tenant_id=3, tenant="moe", prefix="sk-tw-AbCdEf", models=("chat-a",))
    return KeyInfo(**{**base, **changes})


class StaticCache:
    def __init__(self, keys: dict[str, KeyInfo], down: bool = False) -> None:
        self.keys = {hash_key(secret): k for secret, k in keys.items()}
        self.down = down

    async def get(self, key_hash: bytes) -> KeyInfo | None:
        if self.down:
            raise DatabaseUnavailable("down")
        return self.keys.get(key_hash)


class StaticLimiter:
    def __init__(self, decision: RateDecision = RateDecision(True)) -> None:
        self.decision = decision
        self.calls = 0

    async def admit(self, key_id: int, rpm: int | None, tpm: int | None) -> RateDecision:
        self.calls += 1
        return self.decision


class StaticBudgets:
    def __init__(self, spent: Decimal | None = Decimal(0)) -> None:
        self.spent = spent

    async def spend(self, key_id: int, period: str | None, now: datetime | None = None) -> Decimal | None:
        return self.spent


class StaticGate:
    """The shared budget gate: admits while ``spent`` < budget; ``down``: PostgreSQL unreachable."""

    def __init__(self, spent: Decimal = Decimal(0), *, down: bool = False, in_flight: bool = False) -> None:
        self.spent = spent
        self.down = down
        self.in_flight = in_flight
        self.calls: list[tuple[int, Decimal, datetime | None, bool]] = []

    async def admit(self, key_id: int, budget: Decimal, since: datetime | None, *, hold: bool = True) -> BudgetVerdict:
        if self.down:
            raise DatabaseUnavailable("down")
        self.calls.append((key_id, budget, since, hold))
        if self.in_flight:
            return BudgetVerdict(False, spent=self.spent, in_flight=True)
        allowed = self.spent < budget
        return BudgetVerdict(allowed, f"hold-{len(self.calls)}" if allowed and hold else None, self.spent)


def authenticator(
    keys: dict[str, KeyInfo], *, down: bool = False, limiter=None, budgets=None, gate=None
) -> Authenticator:
    """Budgets: ``gate`` when given, else the fallback (``budgets``) as with PostgreSQL down."""
    return Authenticator(
        FakeDb(),
        MASTER,
        cache=StaticCache(keys, down),  # type: ignore[arg-type]
        limiter=limiter or StaticLimiter(),
        budgets=budgets or StaticBudgets(),
        gate=gate or StaticGate(down=True),  # type: ignore[arg-type]
    )


def rejected(coro) -> Rejection:
    with pytest.raises(Rejection) as caught:
        run(coro)
    return caught.value


# --- configuration ----------------------------------------------------------------------------


def test_gateway_config_reads_gateway_json_and_the_environment(tmp_path: Path):
    settings = tmp_path / "gateway.json"
    settings.write_text(
        json.dumps(
            {
                "master_key_env": "MY_MASTER",
                "database": {"embedded": True, "url_env": None, "url": None},
                "models": {
                    "chat-a": {"price": {"input_per_token": 3e-06, "output_per_token": 6e-06, "currency": "TWD"}},
                    "free": {"price": {"input_per_token": 0, "output_per_token": 0, "currency": "USD"}},
                },
            }
        )
    )
    config = GatewayConfig.from_env(
        {
            "TWLLM_GATEWAY_SETTINGS": str(settings),
            "MY_MASTER": MASTER,
            "TWLLM_DATABASE_URL": "postgresql://twllm@127.0.0.1:5/twllm",
        }
    )
    assert config.master_key == MASTER
    assert config.database_url == "postgresql://twllm@127.0.0.1:5/twllm"
    assert config.spool_dir == tmp_path / "spool"
    assert config.price("chat-a") == Price(Decimal("0.000003"), Decimal("0.000006"), "TWD")
    assert config.price("chat-a").cost(1000, 500) == Decimal("0.006")  # exact: no float error
    assert config.price("unknown") == Price()
    assert GatewayConfig.from_env({"TWLLM_SPOOL_DIR": "/x"}).spool_dir == Path("/x")
    assert GatewayConfig.from_env({}).database_url is None


# --- auth -----------------------------------------------------------------------------------


def test_routes_a_tenant_key_may_call():
    assert route_kind("/v1/chat/completions") == ("inference", None)
    assert route_kind("/embeddings") == ("inference", None)
    assert route_kind("/openai/deployments/chat-a/chat/completions") == ("inference", "chat-a")
    assert route_kind("/v1/models") == ("models", None)
    assert route_kind("/v1/models/org/chat-a") == ("models", "org/chat-a")
    for admin in ("/model/info", "/key/generate", "/health", "/config/update", "/v1/files", "/spend/logs"):
        assert route_kind(admin) == (None, None), admin


def test_master_key_is_admin_and_skips_every_limit():
    limiter = StaticLimiter(RateDecision(False, "requests", 1, 5))
    identity = run(authenticator({}, limiter=limiter).authenticate(MASTER, "/model/info", ["anything"]))
    assert identity.admin and identity.metadata() == {"twllm_admin": True}
    assert limiter.calls == 0


@pytest.mark.parametrize(
    "api_key, code",
    [
        (None, "missing_api_key"),
        ("", "missing_api_key"),
        ("sk-tw-unknown-key-0000000000000000000000", "invalid_api_key"),
    ],
)
def test_missing_and_unknown_keys_are_401(api_key, code):
    caught = rejected(authenticator({}).authenticate(api_key, "/v1/chat/completions", ["chat-a"]))
    assert (caught.status, caught.type, caught.code) == (401, "invalid_request_error", code)


def test_revoked_and_expired_keys_are_401_from_the_moment_they_are():
    keys = {
        "sk-tw-revoked": key(revoked_at=NOW - timedelta(seconds=1)),
        "sk-tw-expired": key(expires_at=NOW),
        "sk-tw-later": key(expires_at=NOW + timedelta(seconds=1), revoked_at=NOW + timedelta(days=1)),
    }
    auth = authenticator(keys)
    assert rejected(auth.authenticate("sk-tw-revoked", "/v1/chat/completions", [], NOW)).code == "revoked_api_key"
    assert rejected(auth.authenticate("sk-tw-expired", "/v1/chat/completions", [], NOW)).code == "expired_api_key"
    assert run(auth.authenticate("sk-tw-later", "/v1/chat/completions", [], NOW)).key == keys["sk-tw-later"]


def test_models_routes_and_fallbacks_outside_the_key_are_403():
    auth = authenticator({"sk-tw-a": key(), "sk-tw-all": key(models=None)})
    assert run(auth.authenticate("sk-tw-a", "/v1/chat/completions", ["chat-a"])).key is not None
    for route, models in (
        ("/v1/chat/completions", ["chat-b"]),
        ("/v1/chat/completions", ["chat-a", "chat-b"]),
        ("/openai/deployments/chat-b/chat/completions", []),
        ("/v1/models/chat-b", []),
    ):
        caught = rejected(auth.authenticate("sk-tw-a", route, models))
        assert (caught.status, caught.code) == (403, "model_not_allowed"), route
    assert rejected(auth.authenticate("sk-tw-a", "/model/info", [])).code == "route_not_allowed"
    assert run(auth.authenticate("sk-tw-all", "/v1/embeddings", ["anything"])).key is not None


def test_budget_spent_is_429_insufficient_quota_without_retry_after():
    keys = {"sk-tw-b": key(budget=Decimal("10"), budget_period="monthly")}
    caught = rejected(
        authenticator(keys, budgets=StaticBudgets(Decimal("10.00"))).authenticate(
            "sk-tw-b", "/v1/chat/completions", ["chat-a"]
        )
    )
    assert (caught.status, caught.type, caught.code) == (429, "insufficient_quota", "budget_exceeded")
    assert "Retry-After" not in caught.headers and "this month" in caught.message
    assert (
        run(
            authenticator(keys, budgets=StaticBudgets(Decimal("9.99"))).authenticate(
                "sk-tw-b", "/v1/chat/completions", []
            )
        ).key
        is not None
    )
    assert (
        run(
            authenticator(keys, budgets=StaticBudgets(None)).authenticate(  # never read: not refused
                "sk-tw-b", "/v1/chat/completions", []
            )
        ).key
        is not None
    )


def test_an_admitted_request_carries_its_budget_hold_to_the_ledger():
    keys = {"sk-tw-b": key(budget=Decimal("10"), budget_period="daily")}
    gate = StaticGate(Decimal("9.99"))
    identity = run(authenticator(keys, gate=gate).authenticate("sk-tw-b", "/v1/chat/completions", []))
    assert identity.hold == "hold-1" and identity.metadata()["twllm_budget_hold"] == "hold-1"
    assert gate.calls[0][1:] == (
        Decimal("10"),
        datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0),
        True,
    )
    caught = rejected(authenticator(keys, gate=StaticGate(Decimal("10"))).authenticate("sk-tw-b", "/v1/embeddings", []))
    assert (caught.status, caught.code) == (429, "budget_exceeded")
    no_budget = run(authenticator({"sk-tw-n": key()}, gate=gate).authenticate("sk-tw-n", "/v1/chat/completions", []))
    assert no_budget.hold is None and "twllm_budget_hold" not in no_budget.metadata() and len(gate.calls) == 1


def test_a_rate_limited_request_takes_no_budget_hold():
    gate = StaticGate()
    auth = authenticator(
        {"sk-tw-b": key(budget=Decimal("10"), rpm=1)},
        limiter=StaticLimiter(RateDecision(False, "requests", 1, 9)),
        gate=gate,
    )
    assert rejected(auth.authenticate("sk-tw-b", "/v1/chat/completions", [])).code == "rate_limit_exceeded"
    assert gate.calls == []  # a hold is the last thing auth takes: nothing refuses after it


@pytest.mark.parametrize(
    ("spent", "est", "held", "decision"),
    [
        ("0", "0", 0, "admit"),  # nothing known: one at a time
        ("0", "0", 1, "wait"),
        ("9.99", "0.5", 0, "admit"),  # below the budget, nothing in flight: may overshoot by this one
        ("10", "0", 0, "spent"),
        ("6", "1", 3, "admit"),  # 6 + 3 × 1 < 10
        ("6", "1", 4, "wait"),  # 6 + 4 × 1 = 10: the four in flight may spend it all
    ],
)
def test_the_budget_rule(spent: str, est: str, held: int, decision: str) -> None:
    assert budget_decision(Decimal("10"), Decimal(spent), Decimal(est), held) == decision


def test_waiting_on_requests_in_flight_ends_in_a_429_to_retry():
    gate = StaticGate(Decimal("1"), in_flight=True)
    caught = rejected(
        authenticator({"sk-tw-b": key(budget=Decimal("10"))}, gate=gate).authenticate(
            "sk-tw-b", "/v1/chat/completions", ["chat-a"]
        )
    )
    assert (caught.status, caught.type, caught.code) == (429, "insufficient_quota", "budget_in_flight")
    assert caught.headers == {"Retry-After": "1"} and "in flight" in caught.message


def test_a_request_that_can_reach_only_free_models_takes_no_place():
    gate = StaticGate()
    keys = {"sk-tw-b": key(budget=Decimal("10"), models=None)}
    auth = authenticator(keys, gate=gate)
    auth.free = lambda model: model == "free-model"
    assert run(auth.authenticate("sk-tw-b", "/v1/chat/completions", ["free-model"])).hold is None
    assert run(auth.authenticate("sk-tw-b", "/v1/chat/completions", ["free-model", "paid"])).hold is not None
    assert [held for *_, held in gate.calls] == [False, True]


def test_rate_limits_are_429_with_retry_after_and_listing_models_is_not_counted():
    limiter = StaticLimiter(RateDecision(False, "tokens", 1000, 17))
    auth = authenticator({"sk-tw-r": key(tpm=1000)}, limiter=limiter)
    caught = rejected(auth.authenticate("sk-tw-r", "/v1/chat/completions", ["chat-a"]))
    assert (caught.status, caught.type, caught.code) == (429, "tokens", "rate_limit_exceeded")
    assert caught.headers["Retry-After"] == "17" and caught.headers["x-ratelimit-limit-tokens"] == "1000"
    run(auth.authenticate("sk-tw-r", "/v1/models", []))
    assert limiter.calls == 1


def test_a_key_that_cannot_be_checked_is_503():
    caught = rejected(authenticator({}, down=True).authenticate("sk-tw-x", "/v1/chat/completions", []))
    assert (caught.status, caught.code, caught.headers) == (503, "accounts_unavailable", {"Retry-After": "5"})


def test_key_cache_reads_once_for_concurrent_misses_and_serves_stale_while_down():
    row = (7, 3, "moe", "sk-tw-AbCdEf", ["chat-a"], 5, None, Decimal("1.5"), "daily", None, None, "strict", False)
    db = FakeDb({"FROM api_keys": row}, delay=0.01)
    cache = KeyCache(db, ttl_s=5)  # type: ignore[arg-type]

    async def many() -> list[KeyInfo | None]:
        return await asyncio.gather(*(cache.get(b"h") for _ in range(10)))

    found = run(many())
    assert len(db.executed) == 1 and all(k == found[0] for k in found)
    assert found[0] == KeyInfo(
        7, 3, "moe", "sk-tw-AbCdEf", ("chat-a",), 5, None, Decimal("1.5"), "daily", guard_policy="strict"
    )
    assert Identity(found[0]).metadata()["twllm_guard_policy"] == "strict"

    cache._entries[b"h"] = _Entry(found[0], 0.0)  # long expired
    db.down = True
    assert run(cache.get(b"h")) == found[0]
    with pytest.raises(DatabaseUnavailable):
        run(cache.get(b"never-seen"))
    assert cache.peek(b"h") == found[0] and cache.peek(b"never-seen") is None


# --- limits ---------------------------------------------------------------------------------


def test_decide_admits_exactly_rpm_and_stops_at_tpm():
    assert decide(5, None, 5, 0, 30).allowed
    assert decide(5, None, 6, 0, 30) == RateDecision(False, "requests", 5, 30)
    assert decide(None, 100, 1000, 100, 0) == RateDecision(False, "tokens", 100, 1)
    assert decide(None, 100, 1000, 99, 30).allowed


def test_rate_limiter_falls_back_to_its_own_counts_while_postgres_is_down():
    limiter = RateLimiter(FakeDb(down=True))  # type: ignore[arg-type]

    async def three() -> list[RateDecision]:
        return [await limiter.admit(1, 2, None) for _ in range(3)]

    verdicts = run(three())
    assert [v.allowed for v in verdicts] == [True, True, False]
    assert not verdicts[2].shared and verdicts[2].exceeded == "requests"
    limiter.note_tokens(9, 50)
    assert not run(limiter.admit(9, None, 50)).allowed


def test_rate_limiter_asks_postgres_once_per_request():
    db = FakeDb({"INSERT INTO rate_windows": (6, 0, 12)})
    verdict = run(RateLimiter(db).admit(1, 5, None))  # type: ignore[arg-type]
    assert verdict == RateDecision(False, "requests", 5, 12)
    [(query, params)] = db.executed
    assert params == {"key": 1, "rpm": 5, "tpm": None}


def test_budget_adds_what_this_worker_spent_since_it_last_read_postgres():
    db = FakeDb({"WITH RECURSIVE": (7, Decimal("1.00"))})
    budgets = BudgetTracker(db, refresh_s=60)  # type: ignore[arg-type]
    assert run(budgets.spend(7, "monthly", NOW)) == Decimal("1.00")
    budgets.note_queued(7, Decimal("0.25"))
    assert run(budgets.spend(7, "monthly", NOW)) == Decimal("1.25")  # cached reading + unstored spend
    row = _row(key_id=7, cost=Decimal("0.25"))
    budgets.note_stored([row])
    assert run(budgets.spend(7, "monthly", NOW)) == Decimal("1.25")  # stored after the read: still counted once
    assert len(db.executed) == 1
    _, params = db.executed[0]
    assert params == {"ids": [7], "since": [datetime(2026, 11, 1, tzinfo=UTC)]}
    assert run(BudgetTracker(FakeDb(down=True)).spend(7, "daily", NOW)) is None  # type: ignore[arg-type]


# --- ledger rows ----------------------------------------------------------------------------


def _payload(**changes: Any) -> dict[str, Any]:
    slo = {
        "id": "chatcmpl-1",
        "litellm_call_id": "call-1",
        "model_group": "chat-a",
        "model_id": "vllm-chat-a-0",
        "prompt_tokens": 10,
        "completion_tokens": 20,
        "startTime": 1_795_614_749.5,
        "endTime": 1_795_614_750.0,
        "completionStartTime": 1_795_614_749.6,
        "stream": True,
        "status": "success",
        "error_information": {"error_code": "", "error_class": ""},
    }
    slo.update(changes)
    return {"litellm_call_id": slo["litellm_call_id"], "standard_logging_object": slo, "response_cost": 99.0}


def _row(**changes: Any) -> LedgerRow:
    base = row_from_logging(_payload(), success=True, tenant_id=3, key_id=7, price_of=lambda m: Price())
    return LedgerRow(**{**base.__dict__, **changes})


PRICES = {"chat-a": Price(Decimal("0.000005"), Decimal("0.00001"), "TWD")}


def test_a_stream_row_has_our_cost_latency_and_ttft():
    row = row_from_logging(_payload(), success=True, tenant_id=3, key_id=7, price_of=lambda m: PRICES.get(m, Price()))
    assert row.ts == datetime.fromtimestamp(1_795_614_749.5, tz=UTC)
    assert (row.request_id, row.model, row.deployment) == ("call-1", "chat-a", "vllm-chat-a-0")
    assert (row.prompt_tokens, row.completion_tokens, row.status_code, row.error_class) == (10, 20, 200, None)
    assert row.cost == Decimal("0.00025") and row.currency == "TWD"  # not LiteLLM's response_cost
    assert (row.latency_ms, row.ttft_ms, row.stream) == (500, 100, True)


def test_a_failure_row_has_the_status_and_error_class():
    payload = _payload(
        stream=None,
        prompt_tokens=0,
        completion_tokens=0,
        model_group="",
        model="chat-x",
        error_information={"error_code": "429", "error_class": "RateLimitError"},
    )
    row = row_from_logging(payload, success=False, tenant_id=None, key_id=None, price_of=lambda m: Price())
    assert (row.status_code, row.error_class, row.model, row.ttft_ms, row.cost) == (
        429,
        "RateLimitError",
        "chat-x",
        None,
        0,
    )
    odd = _payload(error_information={"error_code": "boom"})
    assert (
        row_from_logging(odd, success=False, tenant_id=None, key_id=None, price_of=lambda m: Price()).status_code == 500
    )


def test_rows_survive_json_and_become_one_array_per_column():
    row = _row(guard={"input": "pii"})
    assert LedgerRow.from_json(json.loads(json.dumps(row.to_json()))) == row
    held = dataclasses.replace(_row(request_id="call-2", guard=None), hold="hold-2")
    assert LedgerRow.from_json(json.loads(json.dumps(held.to_json()))) == held
    columns = insert_params([row, held])
    assert len(columns) == ledger_mod.INSERT_SQL.count("[]") == 18  # 17 columns and the budget holds
    assert all(len(c) == 2 for c in columns[:-1])
    assert columns[-2] == ['{"input": "pii"}', None]
    assert columns[-1] == ["hold-2"]  # only the rows that hold a budget place release one


# --- journal and writer -----------------------------------------------------------------------


def test_spool_segments_seal_and_are_adopted_only_when_their_process_is_gone(tmp_path: Path):
    mine = Spool(tmp_path, pid=111)
    mine.append(b'{"a": 1}\n')
    first = mine.seal()
    assert first is not None and mine.seal() is None
    mine.append(b'{"a": 2}\n')
    assert mine.sealed_segments() == [first]

    other = Spool(tmp_path, pid=222)
    other.append(b'{"b": 1}\n{"b": 2}\n{"torn": ')
    with adopt(tmp_path, 222) as segments:
        assert segments is None  # pid 222 still holds its lock
    other.close()
    assert mine.other_pids() == [222]
    with adopt(tmp_path, 222) as segments:
        assert segments is not None and [r for s in segments for chunk in read_rows(s, 10) for r in chunk] == [
            {"b": 1},
            {"b": 2},
        ]
        for segment in segments:
            segment.unlink()
    assert not lock_file(tmp_path, 222).exists()
    mine.close()


def test_writer_leaves_a_batch_on_disk_while_postgres_is_down_and_replays_it(tmp_path: Path):
    db = FakeDb(down=True)
    stored: list[LedgerRow] = []
    inserted: list[int] = []

    async def on_insert(conn: Any, rows: Any) -> None:
        inserted.append(len(rows))

    writer = LedgerWriter(db, Spool(tmp_path), on_insert=on_insert, on_stored=stored.extend)  # type: ignore[arg-type]
    rows = [_row(request_id=f"r{i}") for i in range(3)]
    for row in rows:
        writer.enqueue(row)
    run(writer.flush())
    assert writer.spooled == 3 and writer.pending == 0 and db.executed == []
    [segment] = list(tmp_path.glob("ledger-*.jsonl"))
    assert [LedgerRow.from_json(json.loads(line)) for line in segment.read_text().splitlines()] == rows

    db.down = False
    run(writer.replay())
    [(query, params)] = db.executed
    assert query == ledger_mod.INSERT_SQL and params[1] == ["r0", "r1", "r2"]
    assert not segment.exists() and stored == rows and inserted == []  # replays add no tokens twice

    writer.enqueue(_row(request_id="r3"))
    run(writer.flush())
    assert inserted == [1] and [r.request_id for r in stored] == ["r0", "r1", "r2", "r3"]
    assert list(tmp_path.glob("ledger-*.jsonl")) == []


def test_a_row_postgres_refuses_is_set_aside_without_blocking_the_others(tmp_path: Path):
    import psycopg

    class PickyDb(FakeDb):
        def answer(self, query: str, params: Any) -> Any:
            if "bad" in params[1]:
                raise psycopg.DataError("numeric field overflow")
            return None

    db = PickyDb()
    spool = Spool(tmp_path)
    spool.append(b"".join(ledger_mod.encode(_row(request_id=r).to_json()) for r in ("ok1", "bad", "ok2")))
    spool.seal()
    writer = LedgerWriter(db, spool)  # type: ignore[arg-type]
    run(writer.replay())
    assert [p[1] for q, p in db.executed if len(p[1]) == 1 and p[1] != ["bad"]] == [["ok1"], ["ok2"]]
    [rejected] = list(tmp_path.glob("*.rejected"))
    assert [json.loads(line)["request_id"] for line in rejected.read_text().splitlines()] == ["bad"]
    assert list(tmp_path.glob("ledger-*.jsonl")) == []


def test_replay_folder_is_what_a_stopped_gateway_leaves_for_the_supervisor(tmp_path: Path, monkeypatch):
    dead = Spool(tmp_path, pid=333)
    dead.append(ledger_mod.encode(_row(request_id="x").to_json()))
    dead.close()
    executed: list[Any] = []

    class Conn:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def execute(self, query, params):
            executed.append(params[1])

    monkeypatch.setattr(ledger_mod.psycopg, "connect", lambda *a, **k: Conn())
    assert ledger_mod.replay_folder("postgresql://fake", tmp_path) == 1
    assert executed == [["x"]] and list(tmp_path.iterdir()) == []
    assert ledger_mod.replay_folder("postgresql://fake", tmp_path / "none") == 0


# --- LiteLLM side ---------------------------------------------------------------------------


def test_refusals_reach_the_client_as_openai_errors_with_our_code_and_headers():
    from twllm.accounting.hooks import proxy_exception

    exc = proxy_exception(Rejection(429, "requests", "rate_limit_exceeded", "slow down", {"Retry-After": "9"}))
    assert exc.code == "429" and exc.headers == {"Retry-After": "9"}
    assert exc.to_dict() == {"message": "slow down", "type": "requests", "param": None, "code": "rate_limit_exceeded"}


def test_litellm_carries_our_identity_and_the_key_models(tmp_path: Path):
    from litellm.proxy._types import LitellmUserRoles

    from twllm.accounting.hooks import Runtime, requested_models, user_api_key_auth_object

    tenant = user_api_key_auth_object(Identity(key()), "sk-tw-secret-abcdefghijklmnopqrstuvwxyz0123")
    assert tenant.models == ["chat-a"] and tenant.metadata["twllm_key_id"] == 7
    assert tenant.user_role != LitellmUserRoles.PROXY_ADMIN
    admin = user_api_key_auth_object(Identity(None), MASTER)
    assert admin.user_role == LitellmUserRoles.PROXY_ADMIN

    assert requested_models({"model": "a", "fallbacks": ["b", {"model": "c"}]}) == ["a", "b", "c"]

    rt = Runtime(GatewayConfig(database_url=None, master_key=MASTER, spool_dir=tmp_path))
    rt.auth.cache._entries[hash_key("sk-tw-known")] = _Entry(key(), 0.0)
    attribute = rt.attribute
    assert attribute({"user_api_key_auth_metadata": tenant.metadata}) == (3, 7)
    assert attribute({"user_api_key_auth_metadata": admin.metadata}) == (None, None)
    # Refused requests carry no metadata of ours, only LiteLLM's sha256 of the key.
    assert attribute({"user_api_key_hash": hash_key("sk-tw-known").hex()}) == (3, 7)
    assert attribute({"user_api_key_hash": hash_key(MASTER).hex()}) == (None, None)
    assert attribute({"user_api_key_hash": hash_key("sk-tw-unknown").hex()}) is None
    assert attribute({"user_api_key_hash": "not-hex"}) is None


def test_flock_is_per_open_file_so_one_process_can_play_two_pids(tmp_path: Path):
    # What the spool tests above rely on: a second open of the lock file conflicts.
    path = tmp_path / "l"
    a, b = os.open(path, os.O_RDWR | os.O_CREAT), os.open(path, os.O_RDWR)
    fcntl.flock(a, fcntl.LOCK_EX)
    with pytest.raises(BlockingIOError):
        fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(a), os.close(b)


def test_unreadable_gateway_settings_are_a_500_that_says_so(tmp_path: Path, monkeypatch):
    from twllm.accounting import hooks

    monkeypatch.setenv("TWLLM_GATEWAY_SETTINGS", str(tmp_path / "missing.json"))
    monkeypatch.setattr(hooks, "_runtime", None)
    with pytest.raises(hooks.TwllmAuthError) as caught:
        run(hooks.user_api_key_auth(None, MASTER))  # type: ignore[arg-type]
    assert caught.value.code == "500" and caught.value.to_dict()["code"] == "gateway_misconfigured"
