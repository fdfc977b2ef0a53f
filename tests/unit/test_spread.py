"""Least-busy routing takes turns among the replicas tied for least busy (LiteLLM's takes the first)."""

from __future__ import annotations

from collections import Counter

from twllm.gateway import spread


def replicas(n: int) -> list[dict[str, object]]:
    return [{"model_info": {"id": f"r{i}"}, "litellm_params": {}} for i in range(n)]


def test_idle_replicas_take_turns_and_the_least_busy_still_wins() -> None:
    three = replicas(3)
    picked = Counter(spread.least_busy(three, (0, 0, 0))["model_info"]["id"] for _ in range(30))  # type: ignore[index]
    assert picked == {"r0": 10, "r1": 10, "r2": 10}
    assert all(spread.least_busy(three, (2, 0, 1)) is three[1] for _ in range(5))
    tied = Counter(spread.least_busy(three, (1, 0, 0))["model_info"]["id"] for _ in range(10))  # type: ignore[index]
    assert tied == {"r1": 5, "r2": 5}
    assert spread.least_busy([], ()) is None


def test_installed_into_litellms_strategy() -> None:
    from litellm.router_strategy import least_busy as strategy

    spread.install()
    assert strategy._least_busy is spread.least_busy
    two = replicas(2)
    assert {strategy._least_busy(two, (0, 0))["model_info"]["id"] for _ in range(2)} == {"r0", "r1"}  # type: ignore[index]
