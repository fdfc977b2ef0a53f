"""Where machine-readable text starts and ends inside prose: the spans the zh-TW normaliser never
rewrites.

Kinds (what ``normalize.protected_spans`` reports): ``url`` (any scheme followed by ``://``, the
schemes in NO_SLASH_SCHEMES followed by ``:``, and ``www.`` hosts; Chinese in host, path, query or
fragment, raw or percent-encoded), ``email`` (an ASCII local part; its domain may be Chinese),
``path`` (``/…``, ``./``, ``../``, ``~/``, ``C:\\``, ``\\\\server``, and relative paths such as
``docs/说明.md``), ``link_target`` (what follows a Markdown ``](``: a link's or an image's target and
title), ``html_tag`` (an HTML/XML start, end or empty tag with its attributes, ``<!DOCTYPE …>``,
``<?xml …?>``), and, found by the scanner in normalize.py, ``inline_code`` and ``code_block``.
Plain ASCII words are protected too (``word``; never listed): OpenCC leaves ASCII as it is, so a
span only matters for the non-ASCII characters it holds.

Every function here reads a buffer that may still grow (a stream) and answers from the text it
has, or None while more text could change the answer; ``final`` says no more text will come. An
answer never depends on the buffer's length beyond "more text may come", which is what lets a
stream release exactly what the whole text gives (normalize.py).

Chinese inside a URL or path: a run of non-ASCII letters belongs to the span when it follows a
separator (``/ \\ ? # & = @ : + - _ ~ ( [ .``: ``/wiki/软件``, ``?q=软件``, ``//维基.中国``) or when more
of the span follows it (``/v2数据.csv``). A run glued to a Latin letter or digit at the span's end
(``详见https://example.com/docs了解更多``) is read as the prose that follows, since a Chinese
sentence often runs on after a link without a space; such a run is held until its end shows which
it is (at most RUN_CAP characters). What ends a span: whitespace, CJK or other non-ASCII
punctuation (，。「」（）), ``< > " ' ` | { } ^``, an unbalanced ``)`` or ``]``, or PROTECTED_CAP.
"""

from __future__ import annotations

import re

PROTECTED_CAP = 2048
"""Longest URL, path, e-mail address or link target; what follows is scanned afresh (its ASCII
stays protected as words)."""
TAG_CAP = 512
"""Longest HTML/XML tag: a ``<`` with no tag closed within this many characters is prose. This
bounds what a stream holds while a tag may still be open."""
RUN_CAP = 64
"""Longest non-ASCII run glued to a span's end that may still turn out to belong to it."""

URL, EMAIL, PATH, LINK, TAG, WORD = "url", "email", "path", "link_target", "html_tag", "word"
INLINE_CODE, CODE_BLOCK = "inline_code", "code_block"

TRIGGERS = frozenset("]</.~\\")
"""Characters in prose where a protected span may start (ASCII letters and digits, backticks and
code fences are the scanner's own triggers)."""
NO_SLASH_SCHEMES = frozenset({"mailto", "tel", "urn", "data", "magnet", "sms", "geo", "xmpp", "sip", "sips"})
"""Schemes written without ``//`` (``mailto:用户@例子.中国``)."""

_WORD = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+\-@]{0,199}", re.ASCII)
"""An ASCII word: identifiers, numbers, host names, e-mail addresses (200 characters at most)."""
WORD_CAP = 200
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]{0,31}", re.ASCII)
_EMAIL = re.compile(r"[A-Za-z0-9_.+\-]+@[A-Za-z0-9\-]+(\.[A-Za-z0-9\-]+)+", re.ASCII)

_SPACE = frozenset(" \t\n\r\x0b\x0c")
_ENDS = {
    URL: frozenset("<>\"'`|{}^\\") | _SPACE,
    PATH: frozenset("<>\"'`|{}^") | _SPACE,
}
"""ASCII characters that end a URL or a path (an e-mail domain takes letters, digits, - and . only)."""
_ANCHORS = {URL: frozenset("/\\?#&=@:+-_~([."), PATH: frozenset("/\\?#&=@:+-_~([."), EMAIL: frozenset("@.-")}
"""A non-ASCII run right after one of these belongs to the span."""
_GOES_ON = {URL: frozenset("/\\?#&=.-_~%+"), PATH: frozenset("/\\?#&=.-_~%+"), EMAIL: frozenset(".-")}
"""A non-ASCII run glued to a letter or digit belongs to the span when one of these follows it."""
_OPENING = frozenset("([{\"'<=:")


def _letter(char: str) -> bool:
    """A non-ASCII letter or digit (CJK characters included), as a URL or path may hold."""
    return char >= "\x80" and char.isalnum()


def _body_end(
    buf: str, i: int, mode: str, final: bool, limit: int, memo: dict | None = None, base: int = 0
) -> int | None:
    """End of a URL, path or e-mail domain whose body continues at ``i`` (see the module
    docstring); None while more text could move it. ``memo`` (offsets from ``base``, the token's
    start) keeps where an earlier call on the same, shorter buffer stopped, so a stream scans each
    character once."""
    n = len(buf)
    stop = min(n, limit)
    depth = 0
    key = (i - base, mode)
    if memo is not None and memo.get("key") == key:
        i, depth = base + memo["at"], memo["depth"]
    found = _body_scan(buf, i, mode, final, limit, n, stop, depth)
    end, i, depth = found
    if memo is not None:
        memo.update(key=key, at=i - base, depth=depth)
    return end


def _body_scan(
    buf: str, i: int, mode: str, final: bool, limit: int, n: int, stop: int, depth: int
) -> tuple[int | None, int, int]:
    """_body_end's loop: (end or None, where a later call may resume, the bracket depth there)."""
    while i < stop:
        char = buf[i]
        if char < "\x80":
            if mode is EMAIL:
                if not (char.isalnum() or char in "-."):
                    return i, i, depth
            elif char in _ENDS[mode]:
                return i, i, depth
            elif char in "([":
                depth += 1
            elif char in ")]":
                if depth == 0:
                    return i, i, depth
                depth -= 1
            i += 1
            continue
        if not char.isalnum():
            return i, i, depth  # CJK punctuation, a non-ASCII space or symbol
        j = i + 1
        while j < stop and j - i < RUN_CAP and _letter(buf[j]):
            j += 1
        if buf[i - 1] in _ANCHORS[mode]:
            if j == n and j < limit:
                return (n if final else None), i, depth  # the run may go on: resume at its start
            i = j
            continue
        # Glued to a letter or digit (or after , ; ! …): part of the span only if more follows.
        if j - i >= RUN_CAP:
            return i, i, depth
        if j == n or j == limit:
            return (i if final or j == limit else None), i, depth
        if buf[j] in _GOES_ON[mode]:
            i = j
            continue
        return i, i, depth
    if i >= limit:
        return limit, i, depth
    return (i if final else None), i, depth


def token_end(buf: str, start: int, final: bool, memo: dict | None = None) -> tuple[int, str] | None:
    """End and kind of the token at ``start``: an ASCII word (which may turn out to begin a URL,
    an e-mail address or a path), a path whose start ``span_at`` found, or a Markdown link target
    (``](``). None while more text could still change it. ``memo``: a dict kept for this token
    while its buffer grows (it saves rescanning)."""
    char = buf[start]
    if char == "]":
        return _link_end(buf, start, final, memo)
    limit = start + PROTECTED_CAP
    if char in "/.~\\":
        end = _body_end(buf, start, PATH, final, limit, memo, start)
        return None if end is None else (end, PATH)
    word = _WORD.match(buf, start)
    assert word is not None
    e = word.end()
    if e == len(buf) and not final and e - start < WORD_CAP:
        return None  # the word may still grow
    text = buf[start:e]
    rest = buf[e : e + 3]
    if not final and len(rest) < 3 and rest in (":", ":/", "/", "\\"):
        return None  # "http:/" may become a URL, "docs/" a path
    kind, body, mode = WORD, -1, URL
    if rest.startswith("://") and _SCHEME.fullmatch(text):
        kind, body = URL, e + 3
    elif rest[:1] == ":" and text.lower() in NO_SLASH_SCHEMES:
        kind, body = URL, e + 1
    elif len(text) == 1 and text.isalpha() and rest[:2] in (":\\", ":/"):
        kind, body, mode = PATH, e + 2, PATH
    elif "@" in text:
        if e < len(buf) and _letter(buf[e]):
            kind, body, mode = EMAIL, e, EMAIL
        elif _EMAIL.fullmatch(text):
            kind = EMAIL
    elif text[:4].lower() == "www.":
        kind, body = URL, e
    elif len(rest) >= 2 and rest[0] in "/\\" and rest[1] not in _ENDS[PATH]:
        kind, body, mode = PATH, e, PATH
    if body < 0:
        return e, kind
    end = _body_end(buf, body, mode, final, limit, memo, start)
    return None if end is None else (end, kind)


def token_certain(buf: str, start: int, memo: dict | None = None) -> int:
    """How far the token at ``start`` surely reaches, whatever text comes next (what a stream may
    release of it now)."""
    found = token_end(buf, start, True, memo)
    assert found is not None
    return found[0]


def _link_end(buf: str, start: int, final: bool, memo: dict | None = None) -> tuple[int, str] | None:
    """A Markdown link or image target, ``](`` to the ``)`` that balances it (title included), or
    to the end of the line: what a renderer would read as the target is never prose."""
    i, n, depth = start + 2, len(buf), 0
    if memo is not None and "link" in memo:
        i, depth = start + memo["link"][0], memo["link"][1]
    limit = start + PROTECTED_CAP
    while i < n and i < limit:
        char = buf[i]
        if char == "\n":
            return i, LINK
        if char == "\\":
            if i + 1 >= n:
                break  # resume at the backslash
            i += 2
            continue
        if char == "(":
            depth += 1
        elif char == ")":
            if depth == 0:
                return i + 1, LINK
            depth -= 1
        i += 1
    if memo is not None:
        memo["link"] = (i - start, depth)
    if i >= limit:
        return limit, LINK
    return (n, LINK) if final else None


def _boundary(before: str) -> bool:
    """Can a path start right after this character (empty: the text's start)?"""
    return not before or before in _SPACE or before in _OPENING or (before >= "\x80" and not before.isalnum())


NO, TOKEN = "no", "token"


def span_at(buf: str, pos: int, before: str, final: bool) -> str | int | None:
    """At a TRIGGERS character: TOKEN (a path or link target starts here: scan it with
    ``token_end``), the end of a complete HTML/XML tag, NO (prose), or None (wait for more text).
    ``before`` is the character before ``pos`` ("" at the start of the text)."""
    char = buf[pos]
    if char == "<":
        return _tag_end(buf, pos, final)
    ahead = buf[pos + 1 : pos + 3]
    if char == "]":
        if not ahead:
            return NO if final else None
        return TOKEN if ahead[0] == "(" else NO
    if char == "/":
        if not ahead:
            return NO if final else None
        nxt = ahead[0]
        if nxt < "\x80":
            return TOKEN if nxt.isalnum() or nxt in "._~-" else NO
        return TOKEN if nxt.isalnum() and _boundary(before) else NO
    patterns = {".": ("./", "../", ".\\", "..\\"), "~": ("~/",), "\\": ("\\\\",)}[char]
    text = char + ahead
    if any(text.startswith(p) for p in patterns):
        return TOKEN
    if not final and len(text) < 3 and any(p.startswith(text) and p != text for p in patterns):
        return None
    return NO


_NAME_EXTRA = frozenset("-_.:")
_ATTR_START = frozenset("_:@#[(*.")
_ATTR_EXTRA = frozenset("-_.:@#[]()*$")
_UNQUOTED_ENDS = frozenset("\"'=<>`") | _SPACE


def _tag_end(buf: str, pos: int, final: bool) -> int | str | None:
    """End of the HTML/XML tag at ``pos`` (its ``>`` included), NO when it is not one, None while
    undecided. Names may be ASCII or Chinese (XML allows both); attribute values are quoted or
    bare; at most TAG_CAP characters."""
    n = len(buf)
    limit = min(n, pos + TAG_CAP)
    i = pos + 1

    def more() -> int | str | None:
        return NO if final or n >= pos + TAG_CAP else None

    def name(i: int, extra: frozenset[str]) -> int:
        while i < limit and (buf[i].isalnum() or buf[i] in extra):
            i += 1
        return i

    if i >= limit:
        return more()
    char = buf[i]
    if char in "!?":  # <!DOCTYPE html>, <?xml version="1.0"?>
        if i + 1 >= limit:
            return more()
        if char == "!" and not buf[i + 1].isalpha():
            return NO  # a comment (<!-- -->) or CDATA: text for people, or data; read as prose
        close = buf.find(">", i + 1, limit)
        if close < 0:
            return more()
        return close + 1 if "<" not in buf[i + 1 : close] else NO
    closing = char == "/"
    if closing:
        i += 1
        if i >= limit:
            return more()
    if not buf[i].isalpha():
        return NO
    i = name(i, _NAME_EXTRA)
    while True:
        start = i
        while i < limit and buf[i] in _SPACE:
            i += 1
        if i >= limit:
            return more()
        char = buf[i]
        if char == ">":
            return i + 1
        if char == "/" and not closing:
            if i + 1 >= limit:
                return more()
            return i + 2 if buf[i + 1] == ">" else NO
        if closing or i == start or not (char.isalpha() or char in _ATTR_START):
            return NO  # attributes are separated by whitespace; an end tag has none
        i = name(i + 1, _ATTR_EXTRA)
        j = i
        while j < limit and buf[j] in _SPACE:
            j += 1
        if j >= limit:
            return more()
        if buf[j] != "=":
            continue
        j += 1
        while j < limit and buf[j] in _SPACE:
            j += 1
        if j >= limit:
            return more()
        quote = buf[j]
        if quote in "\"'":
            close = buf.find(quote, j + 1, limit)
            if close < 0:
                return more()
            i = close + 1
        else:
            k = j
            while k < limit and buf[k] not in _UNQUOTED_ENDS:
                k += 1
            if k == j:
                return NO
            i = k
