"""The output stages applied to an answer that arrives in pieces (a streamed completion).

Rewriting stages work incrementally and release text as soon as it can no longer change, each
chunk passing through them in the spec's order within the same ``feed`` call, so a chunk reaches
the client as soon as every stage has let it through:

- ``pii`` (``StreamMasker``) holds only a run that could still become an entity: letters and
  digits (with e-mail masking on, the current word, a possible local part), a phone or card
  number with its spaces and dashes, text after a city name while it can still be an address;
  an entity split across chunks is still masked;
- ``zh_tw`` (``StreamNormalizer``) holds only the last characters of a Simplified run that a
  dictionary phrase could still extend (usually one or two), an unclosed inline `code` span,
  and, until a sentence's script is decided, the few characters `s2twp` would change; Latin
  text, digits, whitespace and Taiwan Traditional text pass at once; nor does it rewrite a URL,
  path, link target, tag or code that a chunk boundary cuts (it holds such a span's start while it
  may still be one). For a request that asked for JSON it is ``JsonStreamNormalizer``: structure,
  keys and fixed values pass at once, free-text values stream as prose does (or nothing is
  normalised: ``zh_tw.structured: off``).

Together their output equals the whole-text result, however the answer was chunked.

Classifier stages (``llama_guard``) cannot judge half a sentence: they must see a whole window,
so the text they gate is held: once ``window`` characters wait (or the stream ends), the whole
answer so far is checked and, if safe, the waiting text is released. ``window`` 0 holds
everything until the end. Unsafe output therefore never reaches the client; the cost is
latency — the first token waits for the first window plus one check (the default 200 characters
are ~50 English or ~150 Chinese tokens), and each later window arrives in one burst. A block
ends the stream with the pipeline's bilingual message.

    stream = OutputStream(pipeline, messages, window=200)
    for chunk in chunks:
        send(stream.feed(chunk))       # raises StreamBlocked when a stage blocks
    send(stream.flush())
    stream.result()                    # the verdict, as GuardPipeline.run gives it
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from twllm.guard.pii import StreamMasker
from twllm.guard.pipeline import GuardPipeline, GuardResult, pii_message

if TYPE_CHECKING:
    from twllm.zh_tw.structured import JsonFormat

GATES = ("llama_guard",)
"""Stages that judge the answer without rewriting it."""


class StreamBlocked(Exception):
    """A stage blocked the answer; ``result`` says why (its message is for people)."""

    def __init__(self, result: GuardResult) -> None:
        super().__init__(result.message or "blocked")
        self.result = result


class OutputStream:
    """One streamed answer (one choice) through the pipeline's output stages."""

    def __init__(
        self,
        pipeline: GuardPipeline,
        messages: list[Mapping[str, Any]] | None = None,
        window: int = 200,
        structure: JsonFormat | None = None,
    ) -> None:
        """``structure``: the request asked for JSON; the zh_tw stage then follows
        ``zh_tw.structured`` (free-text values only, or nothing)."""
        self.pipeline = pipeline
        self.messages = list(messages or [])
        self.window = window
        self._steps: list[tuple[str, Callable[[str], str], Callable[[], str]]] = []
        self._gates: list[str] = []
        self._masker: StreamMasker | None = None
        self._holders: list[Any] = []
        for name in pipeline.stages("output"):
            if name == "pii":
                self._masker = StreamMasker(pipeline.pii)
                self._holders.append(self._masker)
                self._steps.append((name, self._masker.feed, self._masker.flush))
            elif name == "zh_tw":
                from twllm.zh_tw import StreamNormalizer
                from twllm.zh_tw.structured import JsonStreamNormalizer

                if structure is not None and pipeline.spec.zh_tw.structured == "off":
                    continue
                normalizer = StreamNormalizer() if structure is None else JsonStreamNormalizer(structure)
                self._holders.append(normalizer)
                self._steps.append((name, self._tracked(normalizer.feed), self._tracked_flush(normalizer.flush)))
            elif name in GATES:
                self._gates.append(name)
        self.released = ""
        """Text handed to the client so far."""
        self._held = ""
        self._raw_len = 0
        self._checks = 0
        self._gate_ms = 0.0
        self._categories: list[str] = []
        self._notes: list[str] = []
        self._blocked: GuardResult | None = None
        self._zh_in = ""
        self._zh_out = ""

    def _tracked(self, feed: Callable[[str], str]) -> Callable[[str], str]:
        def run(text: str) -> str:
            out = feed(text)
            self._zh_in += text
            self._zh_out += out
            return out

        return run

    def _tracked_flush(self, flush: Callable[[], str]) -> Callable[[], str]:
        def run() -> str:
            out = flush()
            self._zh_out += out
            return out

        return run

    @property
    def active(self) -> bool:
        return bool(self._steps or self._gates)

    @property
    def held(self) -> int:
        """Characters fed but not yet released, summed over the stages (each counts its own
        input) and the gate's window."""
        return sum(holder.held for holder in self._holders) + len(self._held)

    def feed(self, chunk: str) -> str:
        """Text that may be sent now (possibly empty)."""
        if self._blocked is not None:
            raise StreamBlocked(self._blocked)
        self._raw_len += len(chunk)
        text = chunk
        for _, feed, _ in self._steps:
            text = feed(text)
        return self._gate(text, final=False)

    def flush(self) -> str:
        """The rest, once the answer is complete."""
        if self._blocked is not None:
            raise StreamBlocked(self._blocked)
        text = ""
        for _, feed, flush in self._steps:
            text = feed(text) + flush() if text else flush()
        return self._gate(text, final=True)

    def _gate(self, text: str, *, final: bool) -> str:
        self._check_pii()
        self._held += text
        if not self._gates:
            out, self._held = self._held, ""
            self.released += out
            return out
        if not self._held or (not final and (self.window == 0 or len(self._held) < self.window)):
            return ""
        start = time.perf_counter()
        result = self.pipeline.run(self.released + self._held, "output", self.messages, only=self._gates)
        self._gate_ms += (time.perf_counter() - start) * 1000
        self._checks += 1
        self._notes += [n for n in result.notes if n not in self._notes]
        if result.blocked:
            self._categories += [c for c in result.categories if c not in self._categories]
            self._blocked = GuardResult(
                "block",
                list(self._categories),
                self.released,
                self._findings(),
                list(self._notes),
                self._latency(),
                result.message,
            )
            self._held = ""
            raise StreamBlocked(self._blocked)
        out, self._held = self._held, ""
        self.released += out
        return out

    def _check_pii(self) -> None:
        if self._masker is None or not self._masker.blocked:
            return
        entities = [f.entity for f in self._masker.findings if self.pipeline.pii.action_for(f.entity) == "block"]
        self._categories += [e for e in dict.fromkeys(entities) if e not in self._categories]
        self._blocked = GuardResult(
            "block",
            list(self._categories),
            self.released,
            self._findings(),
            list(self._notes),
            self._latency(),
            pii_message(entities, "output"),
        )
        self._held = ""
        raise StreamBlocked(self._blocked)

    def _findings(self) -> list[dict[str, Any]]:
        if self._masker is None:
            return []
        return [{"entity": f.entity, "rule": f.rule, "start": f.start, "end": f.end} for f in self._masker.findings]

    def _latency(self) -> dict[str, float]:
        return {"gate_checks": float(self._checks), "gate_ms": round(self._gate_ms, 3)}

    def result(self) -> GuardResult:
        """The verdict on what was streamed: block, mask (something was rewritten) or allow."""
        if self._blocked is not None:
            return self._blocked
        findings = self._findings()
        acted = [f["entity"] for f in findings if self.pipeline.pii.action_for(f["entity"]) != "log"]
        categories = list(dict.fromkeys([*self._categories, *acted]))
        masked = bool(acted) or self._normalised()
        if self._normalised():
            findings = findings + [{"entity": "zh_hans", "rule": "opencc_s2twp"}]
        return GuardResult(
            "mask" if masked else "allow", categories, self.released, findings, list(self._notes), self._latency()
        )

    def _normalised(self) -> bool:
        return self._zh_in != self._zh_out
