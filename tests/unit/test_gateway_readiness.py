"""A replica whose engine does not answer its health probe gets no requests (twllm.gateway.readiness)."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from pathlib import Path

import httpx
import pytest

from twllm.gateway import readiness
from twllm.gateway.readiness import Readiness, probe
from twllm.plan.build import make_plan
from twllm.plan.placement import GpuInventory
from twllm.render.litellm_config import litellm_config
from twllm.spec.resolve import load_spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def replicas(n: int) -> list[dict[str, object]]:
    return [
        {"model_info": {"id": f"r{i}", readiness.HEALTH_URL: f"http://127.0.0.1:{9 + i}/health"}, "litellm_params": {}}
        for i in range(n)
    ]


def ids(deployments: list[dict[str, object]]) -> list[str]:
    return [d["model_info"]["id"] for d in deployments]  # type: ignore[index]


def test_a_refused_probe_takes_a_replica_out_at_once_a_silent_one_after_two() -> None:
    state, two = Readiness(), replicas(2)
    assert ids(state.offer(two)) == ["r0", "r1"]
    assert state.urls == {"r0": "http://127.0.0.1:9/health", "r1": "http://127.0.0.1:10/health"}
    state.record("r0", "refused")
    assert ids(state.offer(two)) == ["r1"]
    state.record("r0", "up")
    assert ids(state.offer(two)) == ["r0", "r1"]
    state.record("r1", "silent")  # one slow answer: a busy engine keeps its requests
    assert ids(state.offer(two)) == ["r0", "r1"]
    state.record("r1", "up")
    state.record("r1", "silent")  # the count starts again after a good probe
    assert ids(state.offer(two)) == ["r0", "r1"]
    state.record("r1", "silent")
    assert ids(state.offer(two)) == ["r0"]
    state.record("r0", "refused")  # none answers: every replica is offered, the router decides
    assert ids(state.offer(two)) == ["r0", "r1"]


def test_replicas_without_a_health_url_are_left_alone() -> None:
    state = Readiness()
    plain = [{"model_info": {"id": "a"}}, {"model_info": {"id": "b"}}]
    state.down["a"] = readiness.PROBED  # as if probed once under another config
    assert state.urls == {} and ids(state.offer(plain)) == ["b"]
    assert state._task is None  # nothing to probe, no task


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_probe_tells_refused_silent_and_up(loop, monkeypatch) -> None:
    """Against real sockets: a closed port, one that accepts but never answers (a vLLM that is
    still loading its model), and one that answers."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(8)  # the kernel accepts; nothing reads

    async def answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def hanging_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()  # a connection closed under the request: no answer, but something listens

    async def go() -> list[str]:
        server = await asyncio.start_server(answering, "127.0.0.1", 0)
        rude = await asyncio.start_server(hanging_up, "127.0.0.1", 0)
        ports = (
            closed_port,
            mute.getsockname()[1],
            rude.sockets[0].getsockname()[1],
            server.sockets[0].getsockname()[1],
        )
        async with httpx.AsyncClient(timeout=0.5, trust_env=False) as client:
            found = [await probe(client, f"http://127.0.0.1:{port}/health") for port in ports]
        server.close()
        rude.close()
        return found

    try:
        # Only a refused connection takes a replica out at once; a broken answer counts as silent.
        assert loop.run_until_complete(go()) == ["refused", "silent", "silent", "up"]
    finally:
        mute.close()


def test_probe_once_records_each_replica(loop) -> None:
    state = Readiness()

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.port == 9:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(503 if request.url.port == 11 else 200)

    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            for _ in range(2):
                await state.probe_once(
                    client, [("r0", "http://h:9/health"), ("r1", "http://h:10/health"), ("r2", "http://h:11/health")]
                )

    loop.run_until_complete(go())
    assert set(state.down) == {"r0", "r2"}  # vLLM's /health answers 503 when its engine core is gone


def test_installed_into_litellms_router_no_request_goes_to_a_replica_seen_down(loop) -> None:
    from litellm.router import Router

    readiness.install()
    readiness.install()  # once per worker, however often it is called
    router = Router(
        model_list=[
            {
                "model_name": "m",
                "litellm_params": {
                    "model": "hosted_vllm/m",
                    "api_base": f"http://127.0.0.1:{9 + i}/v1",
                    "api_key": "x",
                },
                "model_info": {
                    "id": f"r{i}",
                    readiness.HEALTH_URL: f"http://127.0.0.1:{9 + i}/health",
                    "allowed_fails_policy": {"InternalServerErrorAllowedFails": 0},
                },
            }
            for i in range(2)
        ],
        routing_strategy="simple-shuffle",
    )

    async def picks(n: int) -> Counter[str]:
        found: Counter[str] = Counter()
        for _ in range(n):
            d = await router.async_get_available_deployment(
                model="m", messages=[{"role": "user", "content": "x"}], request_kwargs={}
            )
            found[d["model_info"]["id"]] += 1
        return found

    saved = dict(readiness.READINESS.down)
    readiness.READINESS._task = loop.create_future()  # type: ignore[assignment]  # no probes: the test sets what they saw
    try:
        readiness.READINESS.down.clear()
        assert set(loop.run_until_complete(picks(40))) == {"r0", "r1"}
        readiness.READINESS.record("r1", "refused")
        assert loop.run_until_complete(picks(40)) == Counter({"r0": 40})
        readiness.READINESS.record("r1", "up")
        assert set(loop.run_until_complete(picks(40))) == {"r0", "r1"}

        import litellm
        import litellm.router as router_module

        def fail_on(ident: str, status: int = 500) -> bool:  # what the router does after a request failed there
            error = (
                litellm.InternalServerError("engine gone", "hosted_vllm", "m")
                if status >= 500
                else litellm.BadRequestError("too long", "m", "hosted_vllm")
            )
            return router_module.set_cooldown_deployments(
                litellm_router_instance=router,
                original_exception=error,
                exception_status=status,
                deployment=ident,
                time_to_cooldown=30,
            )

        assert fail_on("r1", 400) is False and readiness.READINESS.down == {}  # the request's fault, not r1's
        assert fail_on("r1") is False  # no timed cooldown in the router...
        assert readiness.READINESS.down == {"r1": readiness.FAILED}  # ...but out until a probe answers
        assert loop.run_until_complete(picks(20)) == Counter({"r0": 20})
        readiness.READINESS.record("r1", "up")
        assert set(loop.run_until_complete(picks(40))) == {"r0", "r1"}

        # The CI failure: r0 restarting (its probe refused), then one request failed on r1, the
        # only replica serving. LiteLLM's cooldown took r1 out for 30 s and the router refused
        # every request ("No deployments available"); now r1, whose probe answered, is still
        # offered, ahead of r0, whose probe did not.
        readiness.READINESS.record("r0", "refused")
        fail_on("r1")
        assert loop.run_until_complete(picks(20)) == Counter({"r1": 20})
        readiness.READINESS.record("r1", "refused")  # neither answers: all are offered
        assert set(loop.run_until_complete(picks(40))) == {"r0", "r1"}
    finally:
        readiness.READINESS._task = None
        readiness.READINESS.down = saved


def test_the_render_gives_each_vllm_replica_its_health_url() -> None:
    loaded = load_spec(EXAMPLES / "prod.yaml", {"TWLLM_MASTER_KEY": "sk-x", "DATABASE_URL": "postgresql://u:p@db/x"})
    plan = make_plan(loaded, GpuInventory(8, 80, "test"), Path("/state"))
    deployments = litellm_config(plan)["model_list"]
    taide = [d for d in deployments if d["model_name"] == "taide-8b"]
    assert sorted(d["model_info"][readiness.HEALTH_URL] for d in taide) == [
        "http://127.0.0.1:8100/health",
        "http://127.0.0.1:8101/health",
    ]
    alone = [d for d in deployments if d["model_name"] != "taide-8b"]
    assert alone and all(readiness.HEALTH_URL not in d["model_info"] for d in alone)
    # The probe replaces LiteLLM's background health check for these replicas (a replica it found
    # down stayed out until its next run, 30 s later); the others keep it.
    from litellm.proxy.health_check import _skips_health_checks

    assert all(_skips_health_checks(d) for d in taide)
    assert not any(_skips_health_checks(d) for d in alone)
