"""Answer at once when no engine of a model can be reached.

When every deployment of a model group is down, LiteLLM's router still sleeps between its
retries (an exponential back-off of seconds) before it gives up, although a refused connection
fails again at once. A client then waits seconds for a 503. ``install()`` (once per gateway
worker) makes those retries immediate when the failure was a connection that could not be made
or was cut, so the client gets 503 ``engine_unavailable`` within the retries' own time; any
other failure keeps LiteLLM's back-off. It wraps ``Router._time_to_sleep_before_retry`` of the
pinned LiteLLM (>=1.108.7,<1.109); tests/integration/test_gateway_fidelity.py measures it.
"""

from __future__ import annotations

from typing import Any

from twllm.gateway.errors import UNAVAILABLE

_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    from litellm.router import Router

    original = Router._time_to_sleep_before_retry

    def time_to_sleep(self: Any, e: Exception, *args: Any, **kwargs: Any) -> float:
        if UNAVAILABLE.search(f"{type(e).__name__}: {e}"):
            return 0.0
        return original(self, e, *args, **kwargs)

    Router._time_to_sleep_before_retry = time_to_sleep  # type: ignore[method-assign]
    _installed = True
