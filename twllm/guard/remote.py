"""Llama Guard served by one of the deployment's own vLLM engines, asked over HTTP.

The spec names a model of its own `models` list as `guard.llama_guard.model`; `twllm deploy`
starts its engine like any other, and the gateway sends each check to the engine's
OpenAI-compatible ``/v1/completions`` with the Llama Guard 3 prompt rendered here (so excluded
categories work whatever chat template the served model has). Greedy, at most 10 new tokens;
the answer goes through the same strict ``parse_verdict`` as an in-process check.

Control tokens written by a user (``<|eot_id|>`` …) are taken out of the checked text first: a
completion prompt is tokenised with special tokens, so they could otherwise forge the guard's
answer.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import httpx

from twllm.guard.llama_guard import GuardCheck, Verdict, build_prompt, check_categories, parse_verdict

CONTROL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]{1,40}\|>")
MAX_NEW_TOKENS = 10


def _strip_control(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    cleaned = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            content = CONTROL_TOKEN.sub("", content)
        elif isinstance(content, list):
            content = [
                {**part, "text": CONTROL_TOKEN.sub("", part.get("text") or "")}
                if isinstance(part, Mapping) and part.get("type") == "text"
                else part
                for part in content
            ]
        cleaned.append({**message, "content": content})
    return cleaned


class RemoteLlamaGuard:
    """``check_input`` / ``check_output`` like ``LlamaGuard``, answered by an engine."""

    def __init__(
        self, api_bases: Iterable[str], model: str, *, api_key: str | None = None, timeout_s: float = 30.0
    ) -> None:
        self.api_bases = [b.rstrip("/") for b in api_bases]
        if not self.api_bases:
            raise ValueError(f"no engine serves the guard model {model!r}")
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(headers=headers, timeout=timeout_s)
        self._next = itertools.cycle(range(len(self.api_bases)))
        self._lock = threading.Lock()

    @classmethod
    def from_target(cls, target: Any) -> RemoteLlamaGuard:
        """From a ``policy.RemoteGuard``; the engine key is read from its variable."""
        key = os.environ.get(target.api_key_env) if target.api_key_env else None
        return cls(target.api_bases, target.model, api_key=key)

    def check_input(self, messages: Iterable[Mapping[str, Any]], excluded: Iterable[str] = ()) -> GuardCheck:
        return self._check(build_prompt(_strip_control(messages), "user", check_categories(excluded)), excluded)

    def check_output(
        self, messages: Iterable[Mapping[str, Any]], answer: str, excluded: Iterable[str] = ()
    ) -> GuardCheck:
        if not answer.strip():
            return GuardCheck(Verdict(safe=True), 0.0, "")
        conversation = _strip_control([*messages, {"role": "assistant", "content": answer.strip()}])
        return self._check(build_prompt(conversation, "assistant", check_categories(excluded)), excluded)

    def _check(self, prompt: str, excluded: Iterable[str]) -> GuardCheck:
        start = time.perf_counter()
        with self._lock:
            base = self.api_bases[next(self._next)]
        response = self._client.post(
            f"{base}/completions",
            json={
                "model": self.model,
                "prompt": prompt,
                "max_tokens": MAX_NEW_TOKENS,
                "temperature": 0,
            },
        )
        response.raise_for_status()
        output = response.json()["choices"][0]["text"]
        return GuardCheck(parse_verdict(output, excluded), (time.perf_counter() - start) * 1000, output)
