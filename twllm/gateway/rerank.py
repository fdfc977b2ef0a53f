"""Rerank errors keep twllm's own ``code``, as every other route's do.

LiteLLM's rerank route (``/rerank``, ``/v1/rerank``, ``/v2/rerank``) catches whatever its call
raised and raises a new ``ProxyException`` from the caught one's message, type and status:
twllm's own refusals raised inside it — the Safety Guard's ``GuardBlocked`` from its pre-call
hook — would reach the client with ``code: "400"`` instead of ``pii_blocked`` (the chat and
embeddings routes raise them as they are). ``install()`` (once per gateway worker) makes that
route raise such an exception itself: a ``ProxyException`` subclass that renders its own body
(``to_dict``), which is how twllm's exceptions are told from LiteLLM's. It replaces the name
``ProxyException`` in ``litellm.proxy.rerank_endpoints.endpoints`` of the pinned LiteLLM
(>=1.108.7,<1.109); tests/integration/test_rerank.py checks the code a client gets.
"""

from __future__ import annotations

import sys
from typing import Any

_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    from litellm.proxy import _types
    from litellm.proxy.rerank_endpoints import endpoints

    base = _types.ProxyException

    class KeepOurs(base):  # type: ignore[misc, valid-type]
        """Constructed by the route's ``except`` block: answers the exception it is handling
        when that is one of twllm's (so ``raise ProxyException(...)`` raises it unchanged)."""

        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            handled = sys.exc_info()[1]
            if isinstance(handled, base) and type(handled).to_dict is not base.to_dict:
                return handled
            return super().__new__(cls, *args, **kwargs)

    endpoints.ProxyException = KeepOurs  # type: ignore[misc]
    _installed = True
