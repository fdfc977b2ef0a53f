"""Least-busy routing that spreads ties: LiteLLM's picks the first of the least-busy replicas.

LiteLLM's ``least-busy`` strategy (``litellm/router_strategy/least_busy.py``, pinned
>=1.108.7,<1.109) sends a request to the replica with the fewest requests in flight and breaks a
tie with ``min()``, i.e. always the first. At low load every replica is idle, so the first gets
every request: the others stay cold, and a per-replica RPM share (a model's ``rpm`` split across
its replicas) runs out on one replica while the rest idle. ``install()`` (once per gateway worker)
keeps the rule and takes turns among the replicas tied for least busy, per model group.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

_installed = False
_turns: dict[tuple[str, ...], itertools.count[int]] = {}


def least_busy(healthy: Sequence[Mapping[str, Any]], counts: tuple[int, ...]) -> Mapping[str, Any] | None:
    """The least busy of ``healthy`` (``counts``: requests in flight of each), ties in turn."""
    if not healthy:
        return None
    low = min(counts[: len(healthy)])
    tied = [i for i in range(len(healthy)) if counts[i] == low]
    if len(tied) == 1:
        return healthy[tied[0]]
    group = tuple(str((d.get("model_info") or {}).get("id", i)) for i, d in enumerate(healthy))
    turn = next(_turns.setdefault(group, itertools.count()))
    return healthy[tied[turn % len(tied)]]


def install() -> None:
    global _installed
    if _installed:
        return
    from litellm.router_strategy import least_busy as strategy

    strategy._least_busy = least_busy  # type: ignore[assignment]
    _installed = True
