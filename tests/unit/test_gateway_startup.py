"""Start-up actions run, and are awaited, before the worker reports its start (twllm.gateway.startup)."""

from __future__ import annotations

import asyncio

import pytest

from twllm.gateway import startup
from twllm.gateway.asgi import HttpSettings, Shield


@pytest.fixture
def actions(monkeypatch):
    found: list[str] = []
    monkeypatch.setattr(startup, "_actions", [])
    return found


def test_the_start_is_reported_after_the_actions_are_done(actions) -> None:
    async def slow() -> None:
        await asyncio.sleep(0.05)
        actions.append("warmed")

    def broken() -> None:
        raise RuntimeError("no")

    startup.at_startup(broken)  # logged; the others still run
    startup.at_startup(slow)
    startup.at_startup(slow)  # once, however often it is registered
    sent: list[str] = []

    async def app(scope, receive, send) -> None:
        await receive()
        await send({"type": "lifespan.startup.complete"})

    async def receive() -> dict:
        return {"type": "lifespan.startup"}

    async def send(message) -> None:
        sent.append(f"{message['type']} after {actions}")

    asyncio.run(Shield(app, HttpSettings())({"type": "lifespan"}, receive, send))
    assert sent == ["lifespan.startup.complete after ['warmed']"]


def test_a_slow_action_delays_the_start_at_most_wait_s(actions) -> None:
    async def stuck() -> None:
        await asyncio.sleep(60)

    startup.at_startup(stuck)
    began = asyncio.run(_timed(startup.run(wait_s=0.1)))
    assert began < 5


async def _timed(job) -> float:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await job
    return loop.time() - t0


def test_the_accounting_registers_its_warm_up() -> None:
    from twllm.accounting import hooks

    assert hooks.warm in startup._actions
