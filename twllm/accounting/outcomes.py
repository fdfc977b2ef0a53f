"""Which failure event of a request is its outcome: LiteLLM reports every failed attempt.

The router retries a request on another replica, then tries the model's fallbacks, and LiteLLM
reports each failed attempt to the spend logger as a failure event with the request's call id,
before the attempt that answers. A request has one ledger row, its outcome, so a failure event
is held (``FailureHold.hold``) until the outcome is known:

- a success event of the call: every held failure was an attempt, and is dropped
  (``succeeded``);
- the proxy's final failure hook (``async_post_call_failure_hook``, also for a stream that dies
  mid-way and for a refused request): the last failure held is the outcome (``failed`` returns
  it); with none held yet, the call's next failure event is recorded at once.

LiteLLM awaits its failure logging before it retries or falls back ("router retry fallback relies
on this", ``litellm/utils.py``), so an attempt's failure event always comes before the next
attempt's. A held failure whose request never settles (a path of LiteLLM's that skips the hook)
is recorded after ``HOLD_MAX_S`` (``expired``), or at exit (``drain``): late, never lost.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

HOLD_MAX_S = 3660.0
"""Longer than any request may take (``gateway.request_timeout_s`` is at most 3600 s)."""
MAX_CALLS = 100_000
"""Calls remembered at once; past it the oldest held failure is recorded as it stands."""


class FailureHold(Generic[T]):
    """Failure events (``T``: a prepared ledger row) held per call id until the call settles."""

    def __init__(
        self, max_age_s: float = HOLD_MAX_S, max_calls: int = MAX_CALLS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_age_s = max_age_s
        self.max_calls = max_calls
        self.clock = clock
        self._held: OrderedDict[str, tuple[float, T]] = OrderedDict()
        self._failed: OrderedDict[str, float] = OrderedDict()
        """Calls the proxy has answered with a failure and no failure event is held for."""

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, call_id: str, item: T) -> bool:
        """Hold a failure event of ``call_id``; False when it is the call's outcome already (the
        proxy answered it with a failure, or there is no call id): record it now."""
        if not call_id or self._failed.pop(call_id, None) is not None:
            return False
        self._held.pop(call_id, None)  # the later attempt replaces the earlier one
        self._held[call_id] = (self.clock(), item)
        return True

    def succeeded(self, call_id: str) -> None:
        """A success event of ``call_id``: what was held were attempts."""
        self._held.pop(call_id, None)
        self._failed.pop(call_id, None)

    def failed(self, call_id: str) -> T | None:
        """The proxy answered ``call_id`` with a failure: the failure to record, if one is held;
        else None, and the call's next failure event is recorded at once."""
        if not call_id:
            return None
        held = self._held.pop(call_id, None)
        if held is not None:
            return held[1]
        self._failed[call_id] = self.clock()
        while len(self._failed) > self.max_calls:
            self._failed.popitem(last=False)
        return None

    def expired(self) -> list[T]:
        """Held failures past ``max_age_s`` (or beyond ``max_calls``), oldest first, removed."""
        now = self.clock()
        out: list[T] = []
        while self._held:
            call_id, (since, item) = next(iter(self._held.items()))
            if now - since < self.max_age_s and len(self._held) <= self.max_calls:
                break
            del self._held[call_id]
            out.append(item)
        while self._failed and now - next(iter(self._failed.values())) >= self.max_age_s:
            self._failed.popitem(last=False)
        return out

    def drain(self) -> list[T]:
        """Every held failure, removed (at exit)."""
        out = [item for _, item in self._held.values()]
        self._held.clear()
        return out
