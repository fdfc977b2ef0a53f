"""What the accounting hooks inside the gateway connect to: gateway.json, PostgreSQL, the spool folder.

The supervisor starts the LiteLLM proxy with these variables (read here and nowhere else in
the hooks):

- ``TWLLM_GATEWAY_SETTINGS``: the path of gateway.json (read with
  ``twllm.gateway.settings.GatewaySettings.load``): model prices, the name of the master key's
  variable, the database section.
- ``TWLLM_DATABASE_URL``: the PostgreSQL URL of keys, limits and the ledger. Without it the URL
  comes from gateway.json (``database.url``, or the variable ``database.url_env`` names).
- ``TWLLM_SPOOL_DIR``: where ledger rows wait while PostgreSQL is down (default: ``spool/``
  next to gateway.json).
- the master key, in the variable gateway.json names (``master_key_env``, default
  ``TWLLM_MASTER_KEY``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twllm.accounting.names import ModelNames
from twllm.gateway.settings import GatewaySettings, ModelSettings
from twllm.settings import DATABASE_URL_ENV, GATEWAY_SETTINGS_ENV, MASTER_KEY_ENV, SPOOL_DIR_ENV

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import AsyncConnectionPool

log = logging.getLogger(__name__)

DEFAULT_CURRENCY = "TWD"
"""The ledger's currency for a model gateway.json does not price."""


@dataclass(frozen=True)
class Price:
    """What one token of a model costs tenants, in ``currency`` (from the spec, never LiteLLM's map)."""

    input_per_token: Decimal = Decimal(0)
    output_per_token: Decimal = Decimal(0)
    currency: str = DEFAULT_CURRENCY

    def cost(self, prompt_tokens: int, completion_tokens: int) -> Decimal:
        return self.input_per_token * prompt_tokens + self.output_per_token * completion_tokens


@dataclass(frozen=True)
class GatewayConfig:
    """The hooks' view of their environment; ``from_env`` builds it once per process."""

    database_url: str | None
    master_key: str | None
    spool_dir: Path
    prices: Mapping[str, Price] = field(default_factory=dict)
    """Client-facing model name -> price."""
    settings_path: Path | None = None
    names: ModelNames = field(default_factory=ModelNames)
    """Aliases, fallbacks and deployments (gateway.json's ``routing`` and ``models``)."""

    def price(self, model: str | None) -> Price:
        return self.prices.get(model or "", Price())

    def is_free(self, model: str) -> bool:
        """A model of this gateway whose tokens cost nothing (an unknown name is never free)."""
        price = self.prices.get(model)
        return price is not None and price.input_per_token == 0 and price.output_per_token == 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewayConfig:
        env = os.environ if env is None else env
        path_text = env.get(GATEWAY_SETTINGS_ENV, "")
        path = Path(path_text) if path_text else None
        settings = GatewaySettings.load(path) if path is not None else GatewaySettings()
        database = settings.database
        url = env.get(DATABASE_URL_ENV) or database.url or (env.get(database.url_env) if database.url_env else None)
        spool = env.get(SPOOL_DIR_ENV)
        if spool:
            spool_dir = Path(spool)
        elif path is not None:
            spool_dir = path.parent / "spool"
        else:
            spool_dir = Path(tempfile.gettempdir()) / f"twllm-spool-{os.getuid()}"
        return cls(
            database_url=url or None,
            master_key=env.get(settings.master_key_env or MASTER_KEY_ENV) or None,
            spool_dir=spool_dir,
            prices=parse_prices(settings.models),
            settings_path=path,
            names=ModelNames.from_settings(settings),
        )


def parse_prices(models: Mapping[str, ModelSettings]) -> dict[str, Price]:
    """gateway.json's ``models`` section -> price per client-facing model name."""
    prices: dict[str, Price] = {}
    for name, entry in models.items():
        price = entry.price
        prices[name] = Price(
            # str() first: the Decimal of a float like 3e-06 would carry its binary error.
            input_per_token=Decimal(str(price.input_per_token or 0)),
            output_per_token=Decimal(str(price.output_per_token or 0)),
            currency=price.currency or DEFAULT_CURRENCY,
        )
    return prices


# --- PostgreSQL -------------------------------------------------------------------------------

POOL_MAX_SIZE = 8
"""Connections per gateway worker: auth lookups, rate-window upserts, budget reads, ledger writes."""
POOL_TIMEOUT_S = 1.0
"""How long a request waits for a pooled connection before the database counts as down (or,
when the pool holds connections that are all in use, as busy)."""
POOL_MIN_SIZE = 2
CONNECT_TIMEOUT_S = 5
"""A new connection's limit. A refused one fails at once; on 2 cores busy with engines, a freshly
started gateway's first connections took over 2 s (the chaos test's restarted gateway)."""
QUERY_TIMEOUT_S = 5.0
"""A request's database work that takes longer fails that request (503 ``accounts_unavailable``).
It counts as the database being down only when nothing was answered for ``SLOW_NOT_DOWN_S``:
on 2 cores busy with engines, a just-restarted gateway's worker once waited 2 s for a query
PostgreSQL had answered at once (its event loop was busy), and a breaker opened then refused
every request of the next second."""
SLOW_NOT_DOWN_S = 10.0
"""A timeout within this long after PostgreSQL last answered is slowness, not an outage."""
RETRY_AFTER_DOWN_S = 1.0
"""After a connection failure, how long every caller skips the database (no request waits on it)."""


class DatabaseUnavailable(Exception):
    """PostgreSQL could not be reached (or is being skipped after a recent failure)."""


class Database:
    """A lazily opened async psycopg pool with a short circuit breaker, one per worker process.

    When a connection or query fails for a reason of the server's (down, restarting, timing
    out), callers get ``DatabaseUnavailable`` at once for ``RETRY_AFTER_DOWN_S`` instead of
    each waiting for a timeout, and the pool's idle connections are checked (dropping those the
    restart broke). Errors in the SQL itself propagate as psycopg errors."""

    def __init__(self, url: str | None, *, max_size: int = POOL_MAX_SIZE) -> None:
        self.url = url
        self.max_size = max_size
        self._pool: AsyncConnectionPool | None = None
        self._down_until = 0.0
        self._checking: asyncio.Task[None] | None = None
        self._in_use = 0
        self._connect_errors = 0
        self._answered_at = -SLOW_NOT_DOWN_S

    @property
    def usable(self) -> bool:
        """False without a URL, or for a moment after a failure."""
        return self.url is not None and time.monotonic() >= self._down_until

    @asynccontextmanager
    async def connection(self, timeout: float = QUERY_TIMEOUT_S) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """An autocommit connection; the whole block must finish within ``timeout`` seconds."""
        import psycopg
        from psycopg_pool import PoolTimeout

        if not self.usable:
            raise DatabaseUnavailable("the database is unreachable" if self.url else "no database URL is set")
        try:
            async with asyncio.timeout(timeout):
                pool = await self._open()
                async with pool.connection(timeout=POOL_TIMEOUT_S) as conn:
                    self._in_use += 1
                    try:
                        yield conn
                    finally:
                        self._in_use -= 1
                    self._answered_at = time.monotonic()
        except PoolTimeout as exc:
            if not self.busy():  # no connection to be had: the server is down or unreachable
                self.mark_down(exc)
            raise DatabaseUnavailable(str(exc) or type(exc).__name__) from exc
        except TimeoutError as exc:
            if not self.answered_lately():
                self.mark_down(exc)
            raise DatabaseUnavailable(f"no answer in {timeout:g} s") from exc
        except (psycopg.OperationalError, psycopg.InterfaceError, OSError) as exc:
            self.mark_down(exc)
            raise DatabaseUnavailable(str(exc) or type(exc).__name__) from exc

    def answered_lately(self) -> bool:
        """Whether some connection's work finished within ``SLOW_NOT_DOWN_S``: a timeout now is a
        slow moment (a busy machine, a held lock), and the circuit breaker stays closed."""
        return time.monotonic() - self._answered_at < SLOW_NOT_DOWN_S

    def busy(self) -> bool:
        """Whether a pool timeout was a burst, not an outage: connections are in use, or being
        made with no attempt failing since the last look. That request gives up, but the circuit
        breaker stays closed, so the next ones still try PostgreSQL instead of every caller
        skipping it for ``RETRY_AFTER_DOWN_S``."""
        if self._pool is None:
            return False
        stats = self._pool.get_stats()
        errors = stats.get("connections_errors", 0)
        failing, self._connect_errors = errors > self._connect_errors, errors
        return not failing and (self._in_use > 0 or stats.get("pool_size", 0) > 0)

    async def warm(self, timeout: float = 10.0) -> None:
        """Open the pool and wait for its first connections (a worker's start, before requests);
        back at once if connecting fails (the server is down: requests find out themselves)."""
        try:
            pool = await self._open()
        except Exception as exc:  # noqa: BLE001 - requests find out and count it themselves
            log.info("twllm accounting: PostgreSQL pool not opened at start (%s)", type(exc).__name__)
            return
        errors = pool.get_stats().get("connections_errors", 0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = pool.get_stats()
            if stats.get("pool_available", 0) >= min(POOL_MIN_SIZE, self.max_size):
                return
            if stats.get("connections_errors", 0) > errors:
                log.info("twllm accounting: PostgreSQL not reachable at start; requests will retry it")
                return
            await asyncio.sleep(0.05)
        log.info("twllm accounting: PostgreSQL connections not ready %.0f s after start", timeout)

    def mark_down(self, exc: BaseException) -> None:
        if time.monotonic() >= self._down_until:
            log.warning(
                "twllm accounting: PostgreSQL unavailable (%s: %s); retrying in %.0f s",
                type(exc).__name__,
                " ".join(str(exc).split())[:200],
                RETRY_AFTER_DOWN_S,
            )
        self._down_until = time.monotonic() + RETRY_AFTER_DOWN_S
        if self._pool is not None and (self._checking is None or self._checking.done()):
            self._checking = asyncio.get_running_loop().create_task(self._check())

    async def _check(self) -> None:
        try:
            if self._pool is not None:
                await self._pool.check()
        except Exception:  # noqa: BLE001 - a failed check changes nothing; the next use retries
            pass

    async def _open(self) -> AsyncConnectionPool:
        if self._pool is None:
            from psycopg_pool import AsyncConnectionPool

            if self.url is None:  # callers check `usable` first
                raise DatabaseUnavailable("no database URL is set")
            pool = AsyncConnectionPool(
                self.url,
                min_size=min(POOL_MIN_SIZE, self.max_size),
                max_size=self.max_size,
                open=False,
                timeout=POOL_TIMEOUT_S,
                kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S},
                name="twllm-accounting",
            )
            await pool.open(wait=False)
            self._pool = pool
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close(timeout=2)
