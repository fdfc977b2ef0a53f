"""Simplified → Taiwan Traditional normalisation that leaves Taiwan Traditional text byte-identical.

Text is cut into segments by one left-to-right scanner (a segment ends after 。！？；!? or a
newline, or once it holds SEGMENT_CAP characters). Inside a segment, fenced and inline code,
URLs and ASCII words (identifiers, e-mail addresses, numbers) are protected: never converted,
never counted. Each segment is then decided on its own prose:

- no Simplified-only character (charsets.py): emitted unchanged. OpenCC's `s2twp` would turn
  Taiwan's 干擾 into 幹擾 and 台灣 into 臺灣, so Traditional text must never reach it. The one
  exception: a segment with no script-specific character at all (最后。好的！) that follows a
  segment read as Simplified is read as Simplified too (最后 → 最後);
- Simplified-only characters at least as many as Traditional-only ones: the prose goes through
  `s2twp` (characters and Taiwan phrasing: 软件 → 軟體) and then terms.EXTRA_TERMS;
- otherwise (a Traditional sentence with a stray 体): only the Simplified-only characters are
  replaced, one by one, so every Traditional character stays as it was.

StreamNormalizer runs the same scanner on a growing buffer; the scanner only ends a segment
when no further input could change where it ends, so for any chunking of a text the streamed
output equals normalize(text). `normalize` itself is a StreamNormalizer fed once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache

import opencc

from twllm.zh_tw.charsets import SIMPLIFIED_ONLY, TRADITIONAL_ONLY
from twllm.zh_tw.terms import apply_extra_terms

SEGMENT_CAP = 200
"""A segment with no boundary is cut after this many characters (bounds the stream's buffer)."""

BOUNDARIES = frozenset("。！？；!?\n")
_SCHEMES = ("https://", "http://", "ftp://")
_URL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~:/?#[]@!$&'()*+,;=%")
_WORD = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+\-@]{0,%d}" % (SEGMENT_CAP - 1), re.ASCII)
_PROSE = re.compile(r"[^`A-Za-z0-9_。！？；!?\n]+")
_FENCE_OPEN = re.compile(r" {0,3}(`{3,}|~{3,})")
_MAYBE_FENCE = re.compile(r" {0,3}(`*|~*)")


def _count(chars: frozenset[str], text: str) -> int:
    # Set lookups, not a regex character class: `re` scans a 3,800-character class linearly
    # (~100x slower here).
    return sum(map(chars.__contains__, text))


def _has_simplified(text: str) -> bool:
    return not SIMPLIFIED_ONLY.isdisjoint(text)


@cache
def _converter(config: str) -> opencc.OpenCC:
    return opencc.OpenCC(config)


@cache
def _char_table() -> dict[int, str]:
    convert = _converter("s2twp").convert
    return {ord(c): convert(c) for c in SIMPLIFIED_ONLY}


def to_simplified(text: str) -> str:
    """OpenCC `t2s` (used to spell mainland terms both ways)."""
    return _converter("t2s").convert(text)


def convert_prose(prose: str) -> str:
    """Convert prose that is known to be mostly Simplified: `s2twp`, then the extra terms."""
    return apply_extra_terms(_converter("s2twp").convert(prose))


def _decide(pieces: list[tuple[bool, str]], previous: str | None) -> tuple[str, str | None]:
    """The output for one segment, given as (protected, text) pieces, and the script it was
    read as ('simplified', 'traditional' or, with no script-specific character, the previous)."""
    prose = "".join(text for protected, text in pieces if not protected)
    simplified = _count(SIMPLIFIED_ONLY, prose)
    if not simplified:
        if not TRADITIONAL_ONLY.isdisjoint(prose):
            return "".join(text for _, text in pieces), "traditional"
        if previous != "simplified":
            return "".join(text for _, text in pieces), previous
        fix, script = convert_prose, "simplified"
    elif simplified >= _count(TRADITIONAL_ONLY, prose):
        fix, script = convert_prose, "simplified"
    else:
        table = _char_table()
        fix, script = (lambda text: text.translate(table)), "traditional"
    return "".join(text if protected else fix(text) for protected, text in _merged(pieces)), script


def _merged(pieces: list[tuple[bool, str]]) -> list[tuple[bool, str]]:
    """Join neighbouring pieces of the same kind, so prose is converted in whole runs."""
    out: list[tuple[bool, str]] = []
    for protected, text in pieces:
        if out and out[-1][0] == protected:
            out[-1] = (protected, out[-1][1] + text)
        else:
            out.append((protected, text))
    return out


@dataclass
class _Scanner:
    """Cuts a growing buffer into segments; shared by normalize, is_simplified and streams.

    Positions are absolute in ``buf``; ``start`` is where the undecided text begins (cutting by
    offset, not by slicing, keeps a whole-text pass linear)."""

    buf: str = ""
    start: int = 0
    pos: int = 0
    """How far into buf the current (prose) segment has been scanned."""
    pieces: list[tuple[bool, str]] = field(default_factory=list)
    fence: str | None = None
    """The marker of the open code fence (``` or ~~~), or None in prose."""
    line_start: bool = True

    def append(self, chunk: str) -> None:
        self.buf = self.buf[self.start:] + chunk
        self.pos -= self.start
        self.start = 0

    def segments(self, final: bool):
        """Yield ('code', text) or ('prose', pieces) for every segment whose end is decided."""
        while self.start < len(self.buf):
            step = self._fence_step(final) if self.fence else self._prose_step(final)
            if step is None:
                return
            yield step

    # --- code fences: emitted verbatim line by line; only a closing fence line is waited for

    def _fence_step(self, final: bool):
        buf, start, marker = self.buf, self.start, self.fence
        assert marker is not None
        newline = buf.find("\n", start)
        end = len(buf) if newline < 0 else newline + 1
        if self.line_start:
            line = buf[start:end]
            closing = re.fullmatch(r" {0,3}%s{%d,}[ \t]*\n?" % (re.escape(marker[0]), len(marker)), line)
            if newline < 0 and not final and (closing or _could_close(line, marker)):
                return None
            if closing:
                self.fence = None
        return self._take_verbatim(end)

    def _take_verbatim(self, end: int):
        text = self.buf[self.start:end]
        self.start = self.pos = end
        self.line_start = text.endswith("\n")
        return ("code", text)

    # --- prose: tokens until a boundary or the cap

    def _prose_step(self, final: bool):
        buf, start = self.buf, self.start
        if self.line_start and self.pos == start:
            opened = _FENCE_OPEN.match(buf, start)
            if opened and (opened.end() < len(buf) or final):
                self.fence = opened.group(1)
                return self._take_verbatim(opened.end())
            if not final and (opened or _MAYBE_FENCE.fullmatch(buf, start)):
                return None
        pos, cap = self.pos, start + SEGMENT_CAP
        while True:
            if pos >= cap or (final and pos >= len(buf)):
                return self._cut(pos, line_start=False)
            if pos >= len(buf):
                self.pos = pos
                return None
            char = buf[pos]
            if char in BOUNDARIES:
                self.pieces.append((False, char))
                return self._cut(pos + 1, line_start=char == "\n")
            if char == "`":
                end = _inline_code_end(buf, pos, final)
            elif char.isascii() and (char.isalnum() or char == "_"):
                end = _ascii_token_end(buf, pos, final)
            else:
                run = _PROSE.match(buf, pos, cap)
                assert run is not None
                self.pieces.append((False, run.group(0)))
                pos = run.end()
                continue
            if end is None:
                self.pos = pos
                return None
            self.pieces.append((True, buf[pos:end]))
            pos = end

    def _cut(self, end: int, *, line_start: bool):
        pieces, self.pieces = self.pieces, []
        self.start = self.pos = end
        self.line_start = line_start
        return ("prose", pieces)


def _could_close(line: str, marker: str) -> bool:
    """Could this unfinished line still become the closing fence?"""
    return bool(re.fullmatch(r" {0,3}%s*" % re.escape(marker[0]), line))


def _inline_code_end(buf: str, pos: int, final: bool) -> int | None:
    """End of the backtick token at pos: a whole `code` span, or just the backticks when the
    line (or SEGMENT_CAP characters) ends without a closing run. None: not decided yet."""
    end = pos
    while end < len(buf) and buf[end] == "`":
        end += 1
    if end == len(buf) and not final:
        return None
    width, i, limit = end - pos, end, end + SEGMENT_CAP
    while i < min(len(buf), limit):
        if buf[i] == "\n":
            return end
        if buf[i] == "`":
            j = i
            while j < len(buf) and buf[j] == "`":
                j += 1
            if j == len(buf) and not final:
                return None
            if j - i == width:
                return j
            i = j
        else:
            i += 1
    return end if final or i >= limit else None


def _ascii_token_end(buf: str, pos: int, final: bool) -> int | None:
    """End of the URL or ASCII word at pos; None while more input could extend it."""
    rest = buf[pos:pos + 8].lower()
    if not final and pos + len(rest) == len(buf) and any(s.startswith(rest) and s != rest for s in _SCHEMES):
        return None
    scheme = next((s for s in _SCHEMES if rest.startswith(s)), None)
    if scheme is None:
        word = _WORD.match(buf, pos)
        assert word is not None
        if word.end() == len(buf) and not final and word.end() - pos < SEGMENT_CAP:
            return None
        return word.end()
    return _url_end(buf, pos, pos + len(scheme), final)


def _url_end(buf: str, pos: int, i: int, final: bool) -> int | None:
    """End of a URL whose body starts at i: ASCII URL characters, plus runs of non-ASCII
    letters (an IRI path: /wiki/軟體) when a /?#&= follows them. At most SEGMENT_CAP long."""
    limit = i + SEGMENT_CAP
    while i < min(len(buf), limit):
        char = buf[i]
        if char in _URL_CHARS:
            i += 1
            continue
        if char.isascii() or not char.isalnum():
            return i
        j = i
        while j < len(buf) and not buf[j].isascii() and buf[j].isalnum():
            j += 1
        if j == len(buf):
            return i if final else None
        if buf[j] not in "/?#&=":
            return i
        i = j
    return i if final or i >= limit else None


class StreamNormalizer:
    """Normalises a stream: feed() returns what is safe to emit now, flush() the rest.

    For any chunking, ``"".join(feed(c) for c in chunks) + flush() == normalize(text)``.
    Text is held back only until its segment ends (at most SEGMENT_CAP characters of prose).
    """

    def __init__(self) -> None:
        self._scanner = _Scanner()
        self._script: str | None = None

    def feed(self, chunk: str) -> str:
        self._scanner.append(chunk)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        out = []
        for kind, value in self._scanner.segments(final):
            if kind == "code":
                out.append(value)
            else:
                text, self._script = _decide(value, self._script)
                out.append(text)
        return "".join(out)


def normalize(text: str) -> str:
    """``text`` with its Simplified segments in Taiwan Traditional; Traditional text unchanged."""
    if not _has_simplified(text):
        return text
    stream = StreamNormalizer()
    return stream.feed(text) + stream.flush()


def prose_runs(text: str) -> list[str]:
    """The prose of ``text``: runs between code, URLs and ASCII words (what normalize converts)."""
    runs = [""]
    for kind, value in _Scanner(buf=text).segments(final=True):
        for protected, piece in [(True, "")] if kind == "code" else value:
            if protected:
                runs.append("")
            else:
                runs[-1] += piece
    return [run for run in runs if run]


def is_simplified(text: str) -> bool:
    """Does ``text`` contain Simplified-only characters outside code, URLs and ASCII words?"""
    if not _has_simplified(text):
        return False
    return any(_has_simplified(run) for run in prose_runs(text))
