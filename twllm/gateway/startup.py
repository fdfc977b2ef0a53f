"""Work a gateway worker does once it has started, before its first request.

When the proxy app reports its lifespan startup complete, the shield awaits ``run()`` before it
passes the report on, so the worker reads no request until the actions are done (at most
``WAIT_S``). The hooks that LiteLLM loaded from the config during that startup register what
they need with ``at_startup``: the accounting opens its PostgreSQL connections and starts
replaying what a dead worker journaled. A restarted gateway used to make its first connections
while its first requests waited for them, on 2 cores busy with engines for over a second: keys
it had not cached were refused with 503 ``accounts_unavailable``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("twllm.gateway")

WAIT_S = 15.0

_actions: list[Callable[[], Awaitable[None] | None]] = []


def at_startup(action: Callable[[], Awaitable[None] | None]) -> None:
    if action not in _actions:
        _actions.append(action)


async def run(wait_s: float = WAIT_S) -> None:
    """Each action, then what they return to await (at most ``wait_s`` for all of them)."""
    pending: list[Awaitable[None]] = []
    for action in list(_actions):
        try:
            result = action()
        except Exception:  # a failed warm-up leaves the work to the first request
            log.exception("twllm gateway: a start-up action failed: %s", getattr(action, "__name__", action))
            continue
        if inspect.isawaitable(result):
            pending.append(result)
    if not pending:
        return
    began = time.monotonic()
    try:
        await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), wait_s)
    except TimeoutError:
        log.warning("twllm gateway: start-up actions not done after %.0f s; serving anyway", wait_s)
    else:
        log.info("twllm gateway: start-up actions done in %.1f s", time.monotonic() - began)
