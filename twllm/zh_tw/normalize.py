"""Simplified → Taiwan Traditional normalisation that leaves Taiwan Traditional text byte-identical.

One left-to-right scanner cuts text into segments (a segment ends after 。！？；!? or a newline,
or once it holds SEGMENT_CAP characters). Inside a segment, text a program reads is protected:
never converted, never counted — fenced and inline code, URLs and IRIs, e-mail addresses, file
paths, Markdown link targets, HTML/XML tags, ASCII words (spans.py says where each starts and
ends; ``protected_spans`` lists them). The rest, the prose, is read in order and each segment's script is decided locally:

- at its first script-specific character (charsets.py). A Simplified-only character makes the
  segment Simplified: its prose goes through `s2twp` (characters and Taiwan phrasing: 软件 →
  軟體) and then terms.EXTRA_TERMS. A Traditional-only character makes it Traditional: only
  Simplified-only characters met later are replaced, one by one (a stray 体 → 體), so every
  Traditional character stays as it was. OpenCC's `s2twp` would turn Taiwan's 干擾 into 幹擾 and
  台灣 into 臺灣, so Traditional text must never reach it. The few Traditional-only characters
  that OpenCC's own Simplified phrases contain (著 in 著名, phrases.SHARED_TRADITIONAL) decide
  nothing;
- when a Traditional-only character follows in a segment decided Simplified, the segment falls
  back to character fixes from the last cut before it (see below), so 这个干擾 gives 這個干擾;
- a segment with no script-specific character at all (最后。好的！) takes the script of the
  segment before it: converted after a Simplified one (最后 → 最後), left alone otherwise.

Converting a Simplified segment piece by piece must give what converting it whole gives, or a
stream could not release anything before the segment ends. `_Cutter` therefore cuts prose only
where no dictionary entry can span the cut, knowing OpenCC's algorithm and dictionaries
(phrases.py, generated from the installed wheel): `s2twp` segments text by greedy longest match
over its phrase keys (up to 15 characters), converts each segment, then runs the Taiwan phrase
dictionaries inside each segment; EXTRA_TERMS then runs on the result. A cut is taken at the end
of a segment once the greedy match that follows can no longer change it, no Taiwan phrase can run
across it, and the converted text before it does not end inside an EXTRA_TERMS key. Typically
the last one or two characters of a Chinese run are held, and even of those, the characters that
every phrase which may follow converts alike are sent at once (然 of 然后); protected text (Latin
words, digits) and whitespace are always cuts, and so is punctuation except the few marks inside
dictionary keys (· - 〇). Tests check on random phrase soups that cutting never changes the
conversion (tests/unit/test_zh_tw.py).

Before a segment's script is decided, the text that `s2twp` would change (面包, 后) is held; the
rest (我的, punctuation, ASCII) is released, since every outcome leaves it as it is.

StreamNormalizer runs all of this on a growing buffer, one character at a time, and every
decision depends only on text already seen, so for any chunking of a text the streamed output
equals normalize(text). `normalize` itself is a StreamNormalizer fed once.
"""

from __future__ import annotations

import base64
import bisect
import lzma
import re
from dataclasses import dataclass, field
from functools import cache

import opencc

from twllm.zh_tw import phrases, spans
from twllm.zh_tw.charsets import SIMPLIFIED_ONLY, TRADITIONAL_ONLY
from twllm.zh_tw.terms import EXTRA_TERMS, apply_extra_terms

SEGMENT_CAP = 200
"""A segment with no boundary is cut after this many characters (bounds what an undecided
segment holds, and the span of inline code and URLs)."""

BOUNDARIES = frozenset("。！？；!?\n")
_PROSE = re.compile(r"[^`A-Za-z0-9_。！？；!?\n\]</.~\\]+")
"""Prose up to the next character where a boundary, code or a protected span may start."""
_FENCE_OPEN = re.compile(r" {0,3}(`{3,}|~{3,})")
_MAYBE_FENCE = re.compile(r" {0,3}(`*|~*)")
_DECISIVE_TRADITIONAL = TRADITIONAL_ONLY - frozenset(phrases.SHARED_TRADITIONAL)
_EXTRA_SPAN = max(map(len, EXTRA_TERMS)) - 1
"""Converted characters before a cut that could start an EXTRA_TERMS key running across it."""
_EXTRA_KEY = re.compile("|".join(map(re.escape, EXTRA_TERMS)))


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


# --- where Simplified prose may be cut ---------------------------------------------------------


def _prefixes(keys) -> frozenset[str]:
    return frozenset(key[:i] for key in keys for i in range(1, len(key)))


@dataclass(frozen=True)
class _Tables:
    sorted_keys: tuple[str, ...]
    segment_keys: frozenset[str]
    segment_prefixes: frozenset[str]
    """Proper prefixes of the segmentation keys: a greedy match there may still grow."""
    taiwan_keys: frozenset[str]
    taiwan_prefixes: frozenset[str]
    extra_prefixes: frozenset[str]
    extra_inner: frozenset[str]
    """Characters an EXTRA_TERMS key has before its last: converted text ending in any other
    character cannot end inside a key."""
    compatibility: dict[str, str]
    stage1: dict[str, str]
    """Cache: a character as `s2twp`'s first step converts it alone (STCharacters)."""
    certain: dict[str, int]
    """Cache of _Cutter._certain."""
    converted: dict[str, str]
    """Cache: short pieces and their `s2twp` conversion."""


@cache
def _tables() -> _Tables:
    packed = base64.b85decode("".join(phrases.SEGMENTATION_KEYS_XZ_B85))
    sorted_keys = tuple(lzma.decompress(packed).decode("utf-8").split("\n"))
    segment_keys = frozenset(sorted_keys)
    taiwan_keys = frozenset(phrases.TAIWAN_PHRASE_KEYS.split(" "))
    pairs = phrases.COMPATIBILITY_PAIRS
    return _Tables(
        sorted_keys=sorted_keys,
        segment_keys=segment_keys,
        segment_prefixes=_prefixes(segment_keys),
        taiwan_keys=taiwan_keys,
        taiwan_prefixes=_prefixes(taiwan_keys),
        extra_prefixes=_prefixes(EXTRA_TERMS),
        extra_inner=frozenset("".join(key[:-1] for key in EXTRA_TERMS)),
        compatibility={pairs[i]: pairs[i + 1] for i in range(0, len(pairs), 2)},
        stage1={},
        certain={},
        converted={},
    )


_NO_PIECES: tuple = ()


class _Cutter:
    """Cuts one run of Simplified prose into pieces whose separate conversions concatenate to the
    conversion of the whole run (`convert_prose`), deciding each cut from the text before it and
    the few characters after it that the dictionaries need.

    Level 1 simulates OpenCC's segmentation exactly: greedy longest match over the segmentation
    keys, a match being final once no key can extend it. A cut may fall at the end of a matched
    segment; at the end of an unmatched character only if no Taiwan phrase (which OpenCC matches
    inside runs of unmatched characters, on their converted form) starting in that run can reach
    past it — checked against every start in the run, not only greedy ones, so on the safe side.
    Finally the converted text before the cut must not end inside an EXTRA_TERMS key. State is
    kept relative to the last cut: the text after a cut is converted as a run of its own.

    While the text after the last cut is one greedy match still growing (软 of 软件), `early`
    finds how much of it every possible outcome converts as the character table does (软 → 軟
    in 软件, 软体, 软 alone…): that much can be sent before the cut. ``ahead`` counts those
    characters; a piece or fallback then skips them.
    """

    __slots__ = ("_t", "_s2twp", "raw", "_norm", "_conv", "_step", "_bounds", "_buf", "_tail", "ahead")
    raw: str
    _norm: str
    _conv: list[str]
    _step: int
    _bounds: list[tuple[int, bool]]
    _buf: int
    _tail: str
    ahead: int

    def __init__(self) -> None:
        self._t = _tables()
        self._s2twp = _converter("s2twp").convert
        self._tail = ""  # the last characters of the pieces' `s2twp` output, for EXTRA_TERMS
        self._rebase(0)

    def _rebase(self, cut: int) -> None:
        self.ahead = 0
        if cut == 0 or cut == len(self.raw):
            self.raw, self._norm, self._conv = "", "", []
            self._step, self._bounds, self._buf = 0, [], 0
            return
        self.raw, self._norm, self._conv = self.raw[cut:], self._norm[cut:], self._conv[cut:]
        self._step -= cut
        self._bounds = [(end - cut, matched) for end, matched in self._bounds]
        self._buf = 0

    def push(self, char: str) -> tuple | list[tuple[str, str, int]]:
        """Add one character; return the pieces cut off, as (text, its `s2twp` conversion,
        characters of it already sent by `early`)."""
        t = self._t
        norm = t.compatibility.get(char, char)
        stage1 = t.stage1.get(norm)
        if stage1 is None:
            stage1 = t.stage1[norm] = _converter("s2t").convert(norm)
        self.raw += char
        self._norm += norm
        self._conv.append(stage1)
        # Level 1: advance OpenCC's greedy segmentation as far as the text decides it.
        norm, keys, prefixes = self._norm, t.segment_keys, t.segment_prefixes
        step, n, grew = self._step, len(norm), False
        while step < n:
            best, end = 0, step + 1
            while True:
                piece = norm[step:end]
                if piece in keys:
                    best = end - step
                if piece not in prefixes:
                    break  # no longer key: the match at step is final
                if end == n:
                    self._step = step
                    return self._cut() if grew else _NO_PIECES  # a longer key may still match
                end += 1
            step += best or 1
            self._bounds.append((step, best > 0))
            grew = True
        self._step = step
        return self._cut() if grew else _NO_PIECES

    def end(self) -> list[tuple[str, str, int]]:
        """The run is over: the rest is its last piece."""
        pieces = [(self.raw, self._s2twp(self.raw), self.ahead)] if self.raw else []
        self._tail = ""
        self._rebase(0)
        return pieces

    def drop(self) -> str:
        """Give up the text since the last cut that `early` has not sent (the segment falls
        back to character fixes, which agree with what it sent)."""
        raw = self.raw[self.ahead :]
        self._tail = ""
        self._rebase(0)
        return raw

    def early(self) -> str:
        """More of the pending text that can be sent now, converted by the character table."""
        if self._bounds or self._step != 0 or not self.raw or self.raw != self._norm:
            return ""
        certain = self._t.certain.get(self.raw)
        if certain is None:
            certain = self._certain(self.raw)
            if len(self._t.certain) > 50_000:
                self._t.certain.clear()
            self._t.certain[self.raw] = certain
        if certain <= self.ahead:
            return ""
        text = self.raw[self.ahead : certain].translate(_char_table())
        self.ahead = certain
        return text

    def _certain(self, text: str) -> int:
        """How many leading characters of ``text`` — one greedy match still growing, right after
        a cut — every outcome converts exactly as the character table does. The outcomes: a key
        that extends ``text`` becomes the segment (converted whole: s2twp(key)); or none does,
        and the longest key inside ``text`` is the segment, or its first character stands alone
        (then a Taiwan phrase may still start with it). Conversions that change length count
        as disagreeing; so does text that an EXTRA_TERMS key could overlap."""
        t, s2twp = self._t, self._s2twp
        fixed = text.translate(_char_table())

        def agree(converted: str, length: int) -> int:
            if len(converted) != length:
                return 0
            n = 0
            while n < len(text) and n < length and converted[n] == fixed[n]:
                n += 1
            return n

        best = max((n for n in range(2, len(text) + 1) if text[:n] in t.segment_keys), default=0)
        if best:
            certain = agree(s2twp(text[:best]), best)
        elif t.stage1.get(text[0], text[0]) in t.taiwan_prefixes:
            return 0
        else:
            certain = agree(s2twp(text[0]), 1)
        keys = t.sorted_keys
        i = bisect.bisect_right(keys, text)
        while certain and i < len(keys) and keys[i].startswith(text):
            certain = min(certain, agree(s2twp(keys[i]), len(keys[i])))
            i += 1
        while certain and (
            any(fixed[certain - k : certain] in t.extra_prefixes for k in range(1, min(certain, _EXTRA_SPAN) + 1))
            or _EXTRA_KEY.search(fixed, 0, certain)
        ):
            certain -= 1
        return certain

    def _cut(self) -> list[tuple[str, str, int]] | tuple:
        pieces: list[tuple[str, str, int]] | tuple = _NO_PIECES
        bounds, t = self._bounds, self._t
        while bounds:
            end, matched = bounds[0]
            if matched:
                self._buf = end
            else:
                safe = self._no_taiwan_phrase_across(end)
                if safe is None:
                    break  # wait for more text
                if not safe:
                    del bounds[0]
                    continue
            del bounds[0]
            piece = self.raw[:end]
            converted = t.converted.get(piece) if end <= 4 else None
            if converted is None:
                converted = self._s2twp(piece)
                if end <= 4:
                    if len(t.converted) > 100_000:
                        t.converted.clear()
                    t.converted[piece] = converted
            tail = (self._tail + converted)[-_EXTRA_SPAN:]
            if tail[-1:] in t.extra_inner and any(tail[-k:] in t.extra_prefixes for k in range(1, len(tail) + 1)):
                continue
            if isinstance(pieces, tuple):  # the shared empty _NO_PIECES: nothing cut yet
                pieces = []
            pieces.append((piece, converted, self.ahead))
            self._tail = tail
            self._rebase(end)
            bounds = self._bounds
        return pieces

    def _no_taiwan_phrase_across(self, end: int) -> bool | None:
        conv, keys, prefixes = self._conv, self._t.taiwan_keys, self._t.taiwan_prefixes
        n = len(conv)
        for start in range(self._buf, end):
            text, i = "", start
            while i < n:
                text += conv[i]
                i += 1
                if i > end and text in keys:
                    return False
                if text not in prefixes:
                    break
            else:
                return None
        return True


# --- the scanner -------------------------------------------------------------------------------

CODE, WORD, PROSE, END = "code", "word", "prose", "end"


@dataclass
class _Scanner:
    """Reads a growing buffer and yields, in order and as soon as each is certain:
    (CODE, text) code-fence text, verbatim; (WORD, text) protected text (inline code, a URL, an
    e-mail address, a path, a Markdown link target, an HTML/XML tag, an ASCII word — possibly in
    several parts while it grows; see spans.py); (PROSE, text) prose; (END, "") the end of a
    prose segment. Shared by normalize, is_simplified, protected_spans and streams.

    Positions are offsets into ``buf``, which keeps only text not yet yielded (and the token
    being scanned)."""

    buf: str = ""
    pos: int = 0
    """Everything before pos has been yielded."""
    seg: int = 0
    """Where the current prose segment began (may lie before buf: only pos - seg matters)."""
    fence: str | None = None
    """The marker of the open code fence (``` or ~~~), or None in prose."""
    line_start: bool = True
    tok: int | None = None
    """Start of the token (word, URL, path, link target) being scanned; its text up to pos is
    yielded."""
    memo: dict = field(default_factory=dict)
    """What spans.token_end keeps while the token grows."""
    before: str = ""
    """The character just before buf ("" at the start of the text): where a path may start."""
    base: int = 0
    """Offset of buf[0] in the whole text."""
    spans: list[tuple[int, int, str]] | None = None
    """When a list: every protected span found, (start, end, kind) in the whole text (plain
    ASCII words left out)."""

    def append(self, chunk: str) -> None:
        keep = self.pos if self.tok is None else self.tok
        if keep:
            self.before = self.buf[keep - 1]
        self.buf = self.buf[keep:] + chunk
        self.base += keep
        self.pos -= keep
        self.seg -= keep
        if self.tok is not None:
            self.tok -= keep

    def _span(self, start: int, end: int, kind: str) -> None:
        if self.spans is None or kind == spans.WORD:
            return
        start, end = self.base + start, self.base + end
        last = self.spans[-1] if self.spans else None
        if last is not None and last[2] == kind == spans.CODE_BLOCK and last[1] == start:
            self.spans[-1] = (last[0], end, kind)
        else:
            self.spans.append((start, end, kind))

    def items(self, final: bool):
        while True:
            if self.fence is not None:
                item = self._fence_step(final)
                if item is None:
                    return
                yield item
                continue
            if self.tok is not None:
                text, done = self._token_step(final)
                if text:
                    yield (WORD, text)
                if not done:
                    return
                continue
            buf, pos = self.buf, self.pos
            if self.line_start and pos == self.seg:
                opened = _FENCE_OPEN.match(buf, pos)
                if opened and (opened.end() < len(buf) or final):
                    self.fence = opened.group(1)
                    yield self._take_verbatim(opened.end())
                    continue
                if not final and (opened or _MAYBE_FENCE.fullmatch(buf, pos)):
                    return
            cap = self.seg + SEGMENT_CAP
            if pos >= cap or (final and pos >= len(buf)):
                if pos > self.seg:
                    self.seg, self.line_start = pos, False
                    yield (END, "")
                    continue
                return
            if pos >= len(buf):
                return
            char = buf[pos]
            if char in BOUNDARIES:
                self.pos = self.seg = pos + 1
                self.line_start = char == "\n"
                yield (PROSE, char)
                yield (END, "")
            elif char == "`":
                end = _inline_code_end(buf, pos, final)
                if end is None:
                    return
                self.pos = end
                if end > pos + 1 and buf[end - 1] == "`" and buf[pos:end].strip("`"):
                    self._span(pos, end, spans.INLINE_CODE)
                yield (WORD, buf[pos:end])
            elif char.isascii() and (char.isalnum() or char == "_"):
                self.tok = pos
            elif char in spans.TRIGGERS:
                found = spans.span_at(buf, pos, buf[pos - 1] if pos else self.before, final)
                if found is None:
                    return
                if found == spans.TOKEN:
                    self.tok = pos
                elif found == spans.NO:
                    self.pos = pos + 1
                    yield (PROSE, char)
                else:
                    assert isinstance(found, int)
                    self.pos = found
                    self._span(pos, found, spans.TAG)
                    yield (WORD, buf[pos:found])
            else:
                run = _PROSE.match(buf, pos, cap)
                assert run is not None
                self.pos = run.end()
                yield (PROSE, run.group(0))

    # --- tokens: their characters are protected whatever the token turns out to be (a word, a
    # URL, a path), so they are yielded as they come; only where the token ends waits for more
    # text (spans.token_end, spans.token_certain).

    def _token_step(self, final: bool) -> tuple[str, bool]:
        assert self.tok is not None
        buf, start, pos = self.buf, self.tok, self.pos
        found = spans.token_end(buf, start, final, self.memo)
        if found is None:
            certain = spans.token_certain(buf, start, self.memo)
            if certain > pos:
                self.pos = certain
                return buf[pos:certain], False
            return "", False
        end, kind = found
        self._span(start, end, kind)
        self.pos, self.tok = end, None
        self.memo = {}
        return buf[pos:end], True

    # --- code fences: emitted verbatim line by line; only a closing fence line is waited for

    def _fence_step(self, final: bool):
        buf, start, marker = self.buf, self.pos, self.fence
        assert marker is not None
        newline = buf.find("\n", start)
        end = len(buf) if newline < 0 else newline + 1
        if start >= len(buf):
            return None
        if self.line_start:
            line = buf[start:end]
            closing = re.fullmatch(r" {0,3}%s{%d,}[ \t]*\n?" % (re.escape(marker[0]), len(marker)), line)
            if newline < 0 and not final and (closing or _could_close(line, marker)):
                return None
            if closing:
                self.fence = None
        return self._take_verbatim(end)

    def _take_verbatim(self, end: int):
        text = self.buf[self.pos : end]
        self._span(self.pos, end, spans.CODE_BLOCK)
        self.pos = self.seg = end
        self.line_start = text.endswith("\n")
        return (CODE, text)


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


# --- the normaliser ----------------------------------------------------------------------------

SIMPLIFIED, TRADITIONAL = "simplified", "traditional"


class StreamNormalizer:
    """Normalises a stream: feed() returns what is safe to emit now, flush() the rest.

    For any chunking, ``"".join(feed(c) for c in chunks) + flush() == normalize(text)``.
    What is held back: the last characters of a Simplified run that a dictionary phrase could
    still extend and convert differently (usually one or two), the start of a protected span
    while it may still be one ("https:/", "docs/", a "]" until the next character, a "<" until
    its tag closes or cannot be one, at most spans.TAG_CAP characters; Chinese glued to a URL's
    end until its run ends, at most spans.RUN_CAP; the characters of words, URLs, paths and link
    targets themselves pass at once), an unclosed inline `code` span (to the end of its line, at
    most SEGMENT_CAP characters), a line's leading spaces or backticks until it is clear they do
    not open a code fence, and, until a segment's script is decided, its text that `s2twp` would
    change. ``held`` counts the input characters
    held back, ``deciding`` says whether the segment's script is still open.
    """

    def __init__(self) -> None:
        self._scanner = _Scanner()
        self._script: str | None = None
        """The script the previous segment was read as."""
        self._mode: str | None = None
        """This segment's: SIMPLIFIED (s2twp), TRADITIONAL (character fixes) or None (undecided)."""
        self._cutter = _Cutter()
        self._held: list[tuple[str, str | None, int]] = []
        """Undecided segment: (text, its s2twp conversion or None for protected text, characters
        of it already sent), in order."""
        self._fed = 0
        self._done = 0
        self.log: list[tuple[str, int]] | None = None
        """When a list: every piece released, as (text sent, input characters it stands for), in
        order (``changes`` and the structured-output normaliser read it)."""

    @property
    def held(self) -> int:
        """Input characters fed but not yet released."""
        return self._fed - self._done

    @property
    def deciding(self) -> bool:
        """Is text held because the current segment's script is not decided yet?"""
        return self._mode is None and bool(self._held or self._cutter.raw)

    def feed(self, chunk: str) -> str:
        self._fed += len(chunk)
        self._scanner.append(chunk)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        out: list[str] = []
        for kind, text in self._scanner.items(final):
            if kind is PROSE:
                self._prose(text, out)
            elif kind is WORD:
                self._protected(text, out)
            elif kind is CODE:
                self._out(out, text, len(text))
            else:
                self._end_segment(out)
        return "".join(out)

    def _out(self, out: list[str], text: str, consumed: int) -> None:
        out.append(text)
        self._done += consumed
        if self.log is not None:
            self.log.append((text, consumed))

    def _prose(self, text: str, out: list[str]) -> None:
        if self._mode is TRADITIONAL:
            self._out(out, text.translate(_char_table()), len(text))
            return
        cutter = self._cutter
        for i, char in enumerate(text):
            if self._mode is SIMPLIFIED:
                if char in _DECISIVE_TRADITIONAL:
                    self._fall_back(text[i:], out)
                    return
                self._pieces(cutter.push(char), out)
            elif char in SIMPLIFIED_ONLY:
                self._mode = SIMPLIFIED
                self._pieces(self._held, out)
                self._held = []
                self._pieces(cutter.push(char), out)
            elif char in _DECISIVE_TRADITIONAL:
                for piece, _, sent in self._held:
                    self._out(out, piece[sent:], len(piece) - sent)
                self._held = []
                self._fall_back(text[i:], out)
                return
            else:
                pieces = cutter.push(char)
                if pieces:
                    self._held += pieces
                    self._release_held(out)
                if self._held:
                    continue
            early = cutter.early()
            if early:
                self._out(out, early, len(early))

    def _pieces(self, pieces, out: list[str], convert: bool = True) -> None:
        """Release (text, its s2twp conversion or None for protected text, characters already
        sent) pieces, converted or as they are."""
        for piece, converted, sent in pieces:
            text = apply_extra_terms(converted) if convert and converted is not None else piece
            self._out(out, text[sent:], len(piece) - sent)

    def _fall_back(self, rest: str, out: list[str]) -> None:
        """From the last cut on, this segment only gets character fixes."""
        self._mode = TRADITIONAL
        text = self._cutter.drop() + rest
        self._out(out, text.translate(_char_table()), len(text))

    def _release_held(self, out: list[str]) -> None:
        """Undecided: release the leading held text that every outcome leaves unchanged."""
        held, n = self._held, 0
        while n < len(held):
            piece, converted, sent = held[n]
            if converted is not None and apply_extra_terms(converted) != piece:
                break
            self._out(out, piece[sent:], len(piece) - sent)
            n += 1
        if n:
            del held[:n]

    def _protected(self, text: str, out: list[str]) -> None:
        mode = self._mode
        if mode is SIMPLIFIED:
            self._pieces(self._cutter.end(), out)
        elif mode is None:
            self._held += self._cutter.end()
            self._held.append((text, None, 0))
            self._release_held(out)
            return
        self._out(out, text, len(text))

    def _end_segment(self, out: list[str]) -> None:
        mode = self._mode
        if mode is None:
            self._pieces(self._held + self._cutter.end(), out, convert=self._script is SIMPLIFIED)
            self._held = []
        elif mode is SIMPLIFIED:
            self._pieces(self._cutter.end(), out)
            self._script = SIMPLIFIED
        else:
            self._script = TRADITIONAL
        self._mode = None


def normalize(text: str) -> str:
    """``text`` with its Simplified segments in Taiwan Traditional; Traditional text unchanged."""
    if not _has_simplified(text):
        return text
    stream = StreamNormalizer()
    return stream.feed(text) + stream.flush()


def prose_runs(text: str) -> list[str]:
    """The prose of ``text``: runs between code, URLs and ASCII words (what normalize converts)."""
    runs = [""]
    scanner = _Scanner()
    scanner.append(text)
    for kind, value in scanner.items(final=True):
        if kind is PROSE:
            runs[-1] += value
        elif kind is not END:
            runs.append("")
    return [run for run in runs if run]


def is_simplified(text: str) -> bool:
    """Does ``text`` contain Simplified-only characters outside code, URLs and ASCII words?"""
    if not _has_simplified(text):
        return False
    return any(_has_simplified(run) for run in prose_runs(text))


def protected_spans(text: str) -> list[tuple[int, int, str]]:
    """The spans of ``text`` that normalisation never rewrites, as (start, end, kind): URLs,
    e-mail addresses, paths, Markdown link targets, HTML/XML tags, inline code and code blocks
    (spans.py names the kinds; plain ASCII words are protected too, but not listed)."""
    scanner = _Scanner(spans=[])
    scanner.append(text)
    for _ in scanner.items(final=True):
        pass
    assert scanner.spans is not None
    return scanner.spans


@dataclass(frozen=True)
class Change:
    """One rewrite: ``before`` (text[start:end] of the input) became ``after``."""

    start: int
    end: int
    before: str
    after: str


def log_changes(source: str, log: list[tuple[str, int]]) -> list[Change]:
    """The rewrites a normaliser's log records on ``source``: each released piece that differs
    from the input it stands for, narrowed to the characters that differ (a piece of the same
    length, to each run of them; a piece with a backslash, such as JSON's \\uXXXX escapes, is
    kept whole); touching rewrites are merged."""
    found: list[Change] = []

    def add(start: int, end: int, after: str) -> None:
        if found and found[-1].end == start:
            last = found.pop()
            found.append(Change(last.start, end, last.before + source[start:end], last.after + after))
        else:
            found.append(Change(start, end, source[start:end], after))

    pos = 0
    for produced, consumed in log:
        before = source[pos : pos + consumed]
        if produced != before and "\\" in before + produced:
            add(pos, pos + consumed, produced)
        elif produced != before and len(produced) == len(before):
            i = 0
            while i < len(before):
                if before[i] == produced[i]:
                    i += 1
                    continue
                j = i
                while j < len(before) and before[j] != produced[j]:
                    j += 1
                add(pos + i, pos + j, produced[i:j])
                i = j
        elif produced != before:
            head = 0
            while head < min(len(before), len(produced)) and before[head] == produced[head]:
                head += 1
            tail = 0
            while tail < min(len(before), len(produced)) - head and before[-1 - tail] == produced[-1 - tail]:
                tail += 1
            add(pos + head, pos + consumed - tail, produced[head : len(produced) - tail])
        pos += consumed
    return found


def changes(text: str) -> list[Change]:
    """What ``normalize(text)`` rewrites, span by span (for `twllm guard check`)."""
    if not _has_simplified(text):
        return []
    stream = StreamNormalizer()
    stream.log = []
    stream.feed(text)
    stream.flush()
    return log_changes(text, stream.log)
