"""Work a gateway worker does once it has started, before its first request.

The shield calls ``run()`` when the proxy app reports its lifespan startup complete; the hooks
that LiteLLM loaded from the config during that startup register what they need with
``at_startup`` (the accounting opens its PostgreSQL connections and replays what a dead worker
journaled, instead of doing it during the first requests).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger("twllm.gateway")

_actions: list[Callable[[], None]] = []


def at_startup(action: Callable[[], None]) -> None:
    if action not in _actions:
        _actions.append(action)


def run() -> None:
    for action in list(_actions):
        try:
            action()
        except Exception:
            log.exception("twllm gateway: a start-up action failed: %s", getattr(action, "__name__", action))
