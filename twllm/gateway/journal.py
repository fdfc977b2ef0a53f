"""An answer is finished only once its ledger row is journaled.

LiteLLM writes a request's ledger row (``twllm.accounting.hooks``) from its success callback,
a task that runs beside the response. A gateway killed between the response's last byte and
that task would leave an answered request out of the ledger. So the shield holds back the end
of each answered inference request — the last body message, or a stream's ``data: [DONE]`` —
until the hooks ``settle`` its call id (the row journaled to the spool, or known to write none),
at most ``WAIT_S``. The row is usually journaled by then, and the wait costs nothing.

One registry per worker process: a request's hooks and its response run in the same worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

log = logging.getLogger("twllm.gateway")

WAIT_S = 2.0
"""How long an answer's end waits for its row (then it goes out, and the miss is counted)."""
RECENT = 4096
"""Call ids settled before anyone waited: kept until their answer ends, the oldest dropped."""

_settled: OrderedDict[str, None] = OrderedDict()
_waiting: dict[str, asyncio.Event] = {}
missed = 0
"""Answers that went out before their row was journaled (``WAIT_S`` passed)."""


def settle(call_id: str) -> None:
    """The hooks are done with this call: its row is journaled, or it writes none."""
    if not call_id:
        return
    event = _waiting.pop(call_id, None)
    if event is not None:
        event.set()
        return
    _settled[call_id] = None
    if len(_settled) > RECENT:
        _settled.popitem(last=False)


async def wait(call_id: str, timeout: float = WAIT_S) -> bool:
    """Until ``call_id`` is settled (True), or ``timeout`` seconds (False)."""
    global missed
    if call_id in _settled:
        del _settled[call_id]
        return True
    event = _waiting.setdefault(call_id, asyncio.Event())
    try:
        await asyncio.wait_for(event.wait(), timeout)
        return True
    except TimeoutError:
        _waiting.pop(call_id, None)
        missed += 1
        log.warning("twllm gateway: call %s answered before its ledger row was journaled (%.1f s)", call_id, timeout)
        return False
