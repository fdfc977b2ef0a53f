"""An answer's end waits for its ledger row (twllm.gateway.journal, the shield's _Rewriter)."""

from __future__ import annotations

import asyncio

from twllm.gateway import asgi, journal


def run(coro):
    return asyncio.run(coro)


def test_a_row_settled_first_lets_the_answer_end_at_once() -> None:
    async def go() -> bool:
        journal.settle("call-early")
        return await journal.wait("call-early", timeout=0.01)

    assert run(go()) is True


def test_the_answer_waits_until_the_row_is_journaled() -> None:
    async def go() -> tuple[bool, bool]:
        waiter = asyncio.create_task(journal.wait("call-late", timeout=5))
        await asyncio.sleep(0.05)
        before = waiter.done()
        journal.settle("call-late")
        return before, await waiter

    assert run(go()) == (False, True)


def test_a_row_that_never_comes_is_counted_and_the_answer_goes_out() -> None:
    missed = journal.missed
    assert run(journal.wait("call-never", timeout=0.05)) is False
    assert journal.missed == missed + 1
    assert "call-never" not in journal._waiting


def _start(status: int, call_id: str = "call-1", stream: bool = False) -> dict:
    kind = b"text/event-stream" if stream else b"application/json"
    return {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", kind), (b"x-litellm-call-id", call_id.encode())],
    }


async def _held(method: str, path: str, start: dict, bodies: list[dict], call_id: str) -> list[list[dict]]:
    """What reached the client before and after the call's row was settled."""
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    rewriter = asgi._Rewriter(send, method, path)

    async def respond() -> None:
        await rewriter.send(start)
        for body in bodies:
            await rewriter.send(body)

    task = asyncio.create_task(respond())
    await asyncio.sleep(0.05)
    before = list(sent)
    journal.settle(call_id)
    await asyncio.wait_for(task, 5)
    return [before, list(sent)]


def test_the_shield_holds_a_completions_last_body_until_its_row() -> None:
    body = {"type": "http.response.body", "body": b'{"id": "x"}', "more_body": False}
    before, after = run(_held("POST", "/v1/chat/completions", _start(200, "c-plain"), [body], "c-plain"))
    assert [m["type"] for m in before] == ["http.response.start"]  # the body waits
    assert after[-1]["body"] == b'{"id": "x"}'
    assert all(k != b"x-litellm-call-id" for k, _ in after[0]["headers"])  # still stripped


def test_a_stream_sends_its_tokens_and_holds_only_done() -> None:
    chunks = [
        {"type": "http.response.body", "body": b'data: {"choices": []}\n\n', "more_body": True},
        {"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True},
        {"type": "http.response.body", "body": b"", "more_body": False},
    ]
    before, after = run(_held("POST", "/v1/chat/completions", _start(200, "c-stream", True), chunks, "c-stream"))
    assert [m.get("body") for m in before[1:]] == [b'data: {"choices": []}\n\n']
    assert [m.get("body") for m in after[1:]] == [c["body"] for c in chunks]


def test_errors_and_listings_are_never_held() -> None:
    missed = journal.missed
    error = {"type": "http.response.body", "body": b'{"error": {"message": "no"}}', "more_body": False}
    before, _ = run(_held("POST", "/v1/chat/completions", _start(404, "c-err"), [error], "c-err-other"))
    assert len(before) == 2  # start and body, nothing waited
    listing = {"type": "http.response.body", "body": b'{"data": []}', "more_body": False}
    before, _ = run(_held("GET", "/v1/models", _start(200, "c-list"), [listing], "c-list-other"))
    assert len(before) == 2
    assert journal.missed == missed
