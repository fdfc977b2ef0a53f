"""Keep requests off a replica whose engine is not serving.

A restarted vLLM engine binds its port at once and answers only when its model is loaded
(90 s on 2 CPU cores): in between, the kernel accepts connections that nobody reads. LiteLLM's
cooldown (``gateway.cooldown_s``) takes a failed replica out of rotation for a fixed time only;
once it ends, the least-busy router prefers the idle, still-loading replica, and every request
sent there waits for ``gateway.request_timeout_s``. With the chaos test's 60 s timeout the
retries of several such requests then failed at once on the healthy replica, which went into
cooldown too: 253 of 804 requests got 503 ``engine_unavailable`` with one replica serving.

``install()`` (once per gateway worker) wraps the router's deployment filter of the pinned
LiteLLM (>=1.108.7,<1.109): each worker probes the health URL that the render puts in a
replica's ``model_info`` (``twllm_health_url``: vLLM's ``/health``; only models with several
vLLM replicas have one) every ``INTERVAL_S``, and a replica whose probe failed is not offered to
the router. A refused connection marks it down at once; a probe that gets no answer in
``TIMEOUT_S``, or a broken answer, ``SLOW_PROBES`` times in a row does too (an engine busy with
work answers its health route at once; one that is loading never does). One good probe marks it
up again.

For these replicas the probe replaces LiteLLM's timed cooldown. A request that fails on one for a
reason of the replica's (5xx, 408, 429, no connection) marks it down until a probe answers, at
most ``INTERVAL_S`` later, and never puts it in the router's cooldown list. The cooldown took a
replica out for ``gateway.cooldown_s`` (30 s) whatever its probe said: in a CI run, one failed
request on the only serving replica, while the other was restarting, put both in cooldown, and
684 of 915 requests got 503 ``engine_unavailable`` in the next 70 s with a replica serving.

If every replica of a model is down, those whose last probe answered (down only for a failed
request) are offered, else all: a request is never refused while some replica may serve it.

The render also leaves these replicas out of LiteLLM's background health check
(``disable_background_health_check``): it found a loading replica down and kept it out of
rotation until its next run, 30 s later, whatever the probe said.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import httpx

log = logging.getLogger("twllm.gateway")

INTERVAL_S = 2.0
TIMEOUT_S = 3.0
SLOW_PROBES = 2
HEALTH_URL = "twllm_health_url"
PROBED = "probe"
FAILED = "failed"

_installed = False


def health_url(deployment: Mapping[str, Any]) -> str | None:
    info = deployment.get("model_info") or {}
    url = info.get(HEALTH_URL)
    return url if isinstance(url, str) and url else None


class Readiness:
    """Which replicas answer their health probe, as this worker last saw."""

    def __init__(self) -> None:
        self.urls: dict[str, str] = {}  # deployment id -> health url
        self.down: dict[str, str] = {}  # deployment id -> why: PROBED (its probe) or FAILED (a request)
        self.slow: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    # --- routing ----------------------------------------------------------------------------
    def offer(self, deployments: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The replicas worth a request: those not seen down, or all when none is up."""
        watched = False
        for d in deployments:
            url = health_url(d)
            ident = (d.get("model_info") or {}).get("id")
            if url and isinstance(ident, str):
                watched = True
                self.urls[ident] = url
        if watched:
            self._ensure_probing()
        if not self.down:
            return deployments
        why = [self.down.get((d.get("model_info") or {}).get("id")) for d in deployments]  # type: ignore[arg-type]
        up = [d for d, reason in zip(deployments, why, strict=True) if reason is None]
        if up:
            return up
        answering = [d for d, reason in zip(deployments, why, strict=True) if reason == FAILED]
        return answering or deployments

    def watches(self, ident: str) -> bool:
        return ident in self.urls

    # --- probing ----------------------------------------------------------------------------
    def record(self, ident: str, outcome: str, detail: str = "") -> None:
        """One probe's ``outcome``: ``up``, ``refused`` (nothing listens) or ``silent``; or
        ``failed``: a request failed there for a reason of the replica's (``detail`` says which)."""
        was_down = ident in self.down
        if outcome == "up":
            self.slow.pop(ident, None)
            self.down.pop(ident, None)
        elif outcome == FAILED:
            self.down.setdefault(ident, FAILED)  # a replica its probe already found down stays PROBED
        elif outcome == "refused":
            self.down[ident] = PROBED
        else:
            self.slow[ident] = self.slow.get(ident, 0) + 1
            if self.slow[ident] >= SLOW_PROBES:
                self.down[ident] = PROBED
        now_down = ident in self.down
        if now_down != was_down:
            log.warning(
                "twllm gateway: replica %s %s",
                ident,
                (
                    "is not serving (a request failed there%s): no requests go to it until it answers its health probe"
                    % (f": {detail}" if detail else "")
                    if outcome == FAILED
                    else "is not serving (health probe %s): no requests go to it" % outcome
                )
                if now_down
                else "answers its health probe again: it takes requests",
            )

    def _ensure_probing(self) -> None:
        if self._task is not None and not self._task.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._task = loop.create_task(self._probe_forever())

    async def _probe_forever(self) -> None:
        # A new connection per probe: a probe sent on an idle connection the engine is closing
        # fails though the engine serves.
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=TIMEOUT_S, trust_env=False, verify=False, limits=limits) as client:
            while True:
                await self.probe_once(client, list(self.urls.items()))
                await asyncio.sleep(INTERVAL_S)

    async def probe_once(self, client: httpx.AsyncClient, targets: Iterable[tuple[str, str]]) -> None:
        targets = list(targets)
        outcomes = await asyncio.gather(*(probe(client, url) for _, url in targets))
        for (ident, _), outcome in zip(targets, outcomes, strict=True):
            self.record(ident, outcome)


async def probe(client: httpx.AsyncClient, url: str) -> str:
    try:
        response = await client.get(url)
    except httpx.ConnectError:
        return "refused"  # nothing listens: the kernel said so
    except httpx.HTTPError:
        return "silent"  # no answer in time, or a broken one: counted, SLOW_PROBES in a row
    return "up" if response.status_code < 500 else "silent"


def replica_fault(status: object) -> bool:
    """Whether a request's failure says something about the replica (5xx, 408, 429, or no status:
    no connection) rather than about the request (other 4xx)."""
    try:
        code = int(status)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return True
    return code >= 500 or code in (408, 429) or code < 400


READINESS = Readiness()


def install() -> None:
    global _installed
    if _installed:
        return
    from litellm.router import Router

    original = Router.async_callback_filter_deployments

    async def offer_ready(self: Any, model: str, healthy_deployments: list[dict], *args: Any, **kwargs: Any) -> Any:
        return await original(self, model, READINESS.offer(healthy_deployments), *args, **kwargs)

    Router.async_callback_filter_deployments = offer_ready  # type: ignore[method-assign]

    import litellm.router as router_module

    cool = router_module.set_cooldown_deployments

    def cool_or_watch(*args: Any, **kwargs: Any) -> bool:
        """LiteLLM's cooldown for replicas nobody probes; for the others, the probe decides."""
        deployment = kwargs.get("deployment")
        if not (isinstance(deployment, str) and READINESS.watches(deployment)):
            return cool(*args, **kwargs)
        status = kwargs.get("exception_status")
        if replica_fault(status):
            READINESS.record(deployment, FAILED, f"{type(kwargs.get('original_exception')).__name__} {status}")
        return False

    router_module.set_cooldown_deployments = cool_or_watch
    _installed = True
