"""zh-TW normalisation of structured answers: JSON keys and fixed values never change.

A request with ``response_format`` ``json_object`` or ``json_schema`` (the Responses API's
``text.format`` alike) expects one JSON document that a program parses. With
``guard.zh_tw.structured: values`` only the free-text string values in it are normalised:

- keys are never rewritten;
- with a schema, a string value that the schema fixes is never rewritten: one under ``enum``,
  ``const``, ``pattern``, ``format``, ``not`` or ``content*`` in any subschema that may apply to it
  (``$ref`` to ``#…``, ``allOf``/``anyOf``/``oneOf``, ``if``/``then``/``else``,
  ``properties``/``patternProperties``/``additionalProperties``, ``items``/``prefixItems``/
  ``contains``…), or inside an object or array that an ``enum``/``const``/``not`` fixes, or an
  item of a ``uniqueItems`` array (two values could become equal). A ``$ref`` that cannot be
  resolved inside the schema fixes too. A value under ``minLength``/``maxLength`` is rewritten
  only when its length stays the same. What is left is text no keyword of the schema inspects
  beyond its type, so a document valid before is valid after;
- ``json_object`` (no schema): every string value is free text; keys still never change;
- an answer that is not one JSON document (prose, a fenced block) is left as it came.

Rewritten values keep the document byte for byte around them: the text is never re-serialised,
only a changed value's characters are re-encoded (``\\uXXXX`` escapes where the model used them).
Inside a value the usual protections hold (URLs, paths, code…: normalize.py).

Streams: ``JsonStreamNormalizer`` follows the document as it arrives. Structure, keys and fixed
values pass at once; a free-text value streams through a ``StreamNormalizer`` over its decoded
characters, so it holds no more than prose does; a length-bounded value is held until it closes.
For any chunking the output equals ``normalize_json`` on the whole answer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twllm.zh_tw.normalize import Change, StreamNormalizer, _has_simplified, log_changes, normalize

KEEP, BOUNDED, TEXT = "keep", "bounded", "text"

_FIXING = frozenset(
    {"enum", "const", "pattern", "format", "not", "contentEncoding", "contentMediaType", "contentSchema"}
    | {"$dynamicRef", "$recursiveRef"}
)
"""Keywords that fix a string value (or may: it is left as the model wrote it)."""
_LOCKING = frozenset({"enum", "const", "not", "$dynamicRef", "$recursiveRef"})
"""Keywords on an enclosing object or array that fix everything inside it."""
_MISSING = object()


@dataclass(frozen=True)
class JsonFormat:
    """A request's structured-output format."""

    schema: Mapping[str, Any] | None = None
    """The JSON Schema the client sent (json_schema), or None (json_object)."""


def json_format(data: Mapping[str, Any]) -> JsonFormat | None:
    """The structured-output format a request asks for: chat's and completions'
    ``response_format``, or the Responses API's ``text.format``; None for plain text."""
    fmt: Any = data.get("response_format")
    if fmt is None and isinstance(data.get("text"), Mapping):
        fmt = data["text"].get("format")
    if hasattr(fmt, "model_dump"):
        fmt = fmt.model_dump()
    if not isinstance(fmt, Mapping):
        return None
    kind = fmt.get("type")
    if kind == "json_object":
        return JsonFormat()
    if kind == "json_schema":
        inner: Mapping[str, Any] = fmt["json_schema"] if isinstance(fmt.get("json_schema"), Mapping) else fmt
        schema = inner.get("schema")
        return JsonFormat(schema if isinstance(schema, Mapping) else None)
    return None


class SchemaRules:
    """What the schema allows for the string value at a path (a tuple of keys and indices):
    KEEP, BOUNDED (rewrite only at the same length) or TEXT."""

    def __init__(self, schema: Mapping[str, Any] | None) -> None:
        self.root = schema
        self._cache: dict[tuple, str] = {}

    def rule(self, path: tuple) -> str:
        if self.root is None:
            return TEXT
        cached = self._cache.get(path)
        if cached is None:
            cached = self._cache[path] = self._rule(path)
            if len(self._cache) > 10_000:
                self._cache.clear()
        return cached

    def _rule(self, path: tuple) -> str:
        schemas = self._expand([self.root])
        for step in path:
            if schemas is None or any(key in s for s in schemas for key in _LOCKING):
                return KEEP
            if isinstance(step, int) and any(s.get("uniqueItems") is True for s in schemas):
                return KEEP
            children: list[Any] = []
            for s in schemas:
                found = self._children(s, step)
                if found is None:
                    return KEEP
                children += found
            schemas = self._expand(children)
        if schemas is None or any(key in s for s in schemas for key in _FIXING):
            return KEEP
        if any("minLength" in s or "maxLength" in s for s in schemas):
            return BOUNDED
        return TEXT

    def _expand(self, schemas: list[Any]) -> list[Mapping[str, Any]] | None:
        """The subschemas that may apply where ``schemas`` do (applicators followed); None when
        one cannot be read."""
        found: list[Mapping[str, Any]] = []
        seen: set[int] = set()
        stack = list(schemas)
        while stack:
            s = stack.pop()
            if isinstance(s, bool):
                continue  # true: anything; false: nothing valid to keep valid
            if not isinstance(s, Mapping):
                return None
            if id(s) in seen:
                continue
            seen.add(id(s))
            found.append(s)
            for key in ("allOf", "anyOf", "oneOf"):
                if isinstance(s.get(key), list):
                    stack += s[key]
            for key in ("if", "then", "else"):
                if key in s:
                    stack.append(s[key])
            for key in ("dependentSchemas", "dependencies"):
                if isinstance(s.get(key), Mapping):
                    stack += [v for v in s[key].values() if isinstance(v, (Mapping, bool))]
            if "$ref" in s:
                target = self._resolve(s["$ref"])
                if target is _MISSING:
                    return None
                stack.append(target)
        return found

    def _resolve(self, ref: Any) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            return _MISSING
        node: Any = self.root
        pointer = ref[1:]
        if pointer and not pointer.startswith("/"):
            return _MISSING  # a named anchor
        for part in pointer.split("/")[1:]:
            part = re.sub(r"%([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), part)
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return _MISSING
        return node

    @staticmethod
    def _children(s: Mapping[str, Any], step: str | int) -> list[Any] | None:
        found: list[Any] = []
        if isinstance(step, str):
            props = s.get("properties")
            named = isinstance(props, Mapping) and step in props
            if named:
                found.append(props[step])  # type: ignore[index]
            matched = False
            patterns = s.get("patternProperties")
            for pattern, sub in patterns.items() if isinstance(patterns, Mapping) else ():
                try:
                    hit = re.search(pattern, step) is not None
                except re.error:
                    return None
                if hit:
                    found.append(sub)
                    matched = True
            if not named and not matched:
                found += [s[key] for key in ("additionalProperties", "unevaluatedProperties") if key in s]
            return found
        prefix, items = s.get("prefixItems"), s.get("items")
        if isinstance(prefix, list) and step < len(prefix):
            found.append(prefix[step])
        elif isinstance(items, list):  # draft 4-7 tuple form
            if step < len(items):
                found.append(items[step])
            elif "additionalItems" in s:
                found.append(s["additionalItems"])
        elif items is not None:
            found.append(items)
        found += [s[key] for key in ("contains", "unevaluatedItems") if key in s]
        return found


# --- the streaming normaliser --------------------------------------------------------------------

_START, _JSON, _RAW = "start", "json", "raw"
_PLAIN = re.compile(r'[^"\\]+')
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


class _String:
    """The string being read: a key, or a value with its rule."""

    __slots__ = ("key", "rule", "raw", "pending", "chars", "raws", "normalizer", "start")

    def __init__(self, key: bool, rule: str, start: int) -> None:
        self.key = key
        self.rule = rule
        self.start = start
        self.raw: list[str] = []
        """Key or BOUNDED value: its raw text so far."""
        self.pending = ""
        """An escape sequence not complete yet (TEXT values)."""
        self.chars: list[str] = []
        self.raws: list[str] = []
        """TEXT values: decoded characters fed to the normaliser and not yet released, with the
        raw text each came from."""
        self.normalizer: StreamNormalizer | None = None


class JsonStreamNormalizer:
    """Normalises a streamed JSON answer: ``feed`` returns what may be sent now, ``flush`` the
    rest. Only free-text string values change (see the module docstring). ``log`` and ``spans``
    (when lists) record what was released and which keys and fixed values were kept."""

    def __init__(self, fmt: JsonFormat) -> None:
        self.rules = SchemaRules(fmt.schema)
        self._state = _START
        self._frames: list[list[Any]] = []
        """Open containers: ["o", expecting a key?, current key] or ["a", None, index]."""
        self._string: _String | None = None
        self._escape = False
        """A backslash just read inside a passed-through string."""
        self._fed = 0
        self._done = 0
        self.log: list[tuple[str, int]] | None = None
        self.spans: list[tuple[int, int, str]] | None = None

    @property
    def held(self) -> int:
        return self._fed - self._done

    def feed(self, chunk: str) -> str:
        out: list[str] = []
        i, n = 0, len(chunk)
        while i < n:
            if self._state is _RAW:
                self._emit(out, chunk[i:], n - i)
                break
            if self._string is not None:
                i = self._in_string(chunk, i, out)
                continue
            char = chunk[i]
            i += 1
            self._structure(char, out)
        self._fed += n
        return "".join(out)

    def flush(self) -> str:
        out: list[str] = []
        string = self._string
        if string is not None:  # the answer ended inside a string: what is held goes out as it came
            held = "".join(string.raws) + string.pending if string.rule == TEXT else ""
            if string.rule == BOUNDED:
                held = "".join(string.raw)
            self._emit(out, held, len(held))
            self._string = None
        self._state = _RAW
        return "".join(out)

    # --- bookkeeping -----------------------------------------------------------------------
    def _emit(self, out: list[str], text: str, consumed: int) -> None:
        if text or consumed:
            out.append(text)
            self._done += consumed
            if self.log is not None:
                self.log.append((text, consumed))

    def _span(self, start: int, end: int, kind: str) -> None:
        if self.spans is not None and end > start:
            self.spans.append((start, end, kind))

    def _path(self) -> tuple:
        return tuple(frame[2] for frame in self._frames)

    # --- outside strings -------------------------------------------------------------------
    def _structure(self, char: str, out: list[str]) -> None:
        frames = self._frames
        if self._state is _START:
            if char in " \t\r\n":
                self._emit(out, char, 1)
                return
            if char not in '{["-0123456789tfn':
                self._state = _RAW  # not a JSON document: left as it came
                self._emit(out, char, 1)
                return
            self._state = _JSON
        top = frames[-1] if frames else None
        if char == '"':
            key = top is not None and top[0] == "o" and top[1]
            rule = KEEP if key else self.rules.rule(self._path())
            string = self._string = _String(key, rule, self._done)
            if rule == TEXT:
                string.normalizer = StreamNormalizer()
                string.normalizer.log = []
            self._emit(out, char, 1)
            return
        if char == "{":
            frames.append(["o", True, None])
        elif char == "[":
            frames.append(["a", None, 0])
        elif char in "}]":
            if frames:
                frames.pop()
            if not frames:
                self._state = _RAW  # the document is complete: the rest passes as it is
        elif char == ":" and top is not None and top[0] == "o":
            top[1] = False
        elif char == "," and top is not None:
            if top[0] == "o":
                top[1] = True
            else:
                top[2] += 1
        self._emit(out, char, 1)

    # --- inside strings --------------------------------------------------------------------
    def _in_string(self, chunk: str, i: int, out: list[str]) -> int:
        string = self._string
        assert string is not None
        if string.rule == TEXT:
            return self._text_string(string, chunk, i, out)
        # A key, a fixed value or a bounded one: read to the closing quote.
        n = len(chunk)
        while i < n:
            char = chunk[i]
            if self._escape:
                self._escape = False
                piece = char
            elif char == "\\":
                self._escape = True
                piece = char
            elif char == '"':
                self._close(string, out)
                return i + 1
            else:
                plain = _PLAIN.match(chunk, i)
                assert plain is not None
                piece = plain.group(0)
            i += len(piece)
            if string.rule == BOUNDED or string.key:
                string.raw.append(piece)
            if string.rule != BOUNDED:
                self._emit(out, piece, len(piece))
        return i

    def _close(self, string: _String, out: list[str]) -> None:
        """The closing quote of a key, fixed or bounded value."""
        raw = "".join(string.raw)
        try:
            value = json.loads('"' + raw + '"')
        except ValueError:
            value = None
        if string.key:
            self._span(string.start, self._done + 1, "json_key")
            if value is None:
                self._state = _RAW
            else:
                self._frames[-1][2] = value
        elif string.rule == BOUNDED:
            text = raw
            if isinstance(value, str):
                converted = normalize(value)
                if converted != value and len(converted) == len(value):
                    text = _encode(converted, "\\u" in raw)
            self._emit(out, text, len(raw))
        else:
            self._span(string.start, self._done + 1, "json_fixed_value")
        self._string = None
        self._emit(out, '"', 1)

    def _text_string(self, string: _String, chunk: str, i: int, out: list[str]) -> int:
        """A free-text value: decode, normalise, and send each piece re-encoded (or as it came,
        where it did not change)."""
        n = len(chunk)
        chars: list[str] = []
        raws: list[str] = []
        while i < n:
            char = chunk[i]
            if string.pending:
                string.pending += char
                i += 1
                decoded = _escape_status(string.pending)
                if decoded is _MORE:
                    continue
                if decoded is _BAD:  # a lone surrogate or a bad escape: no text to convert
                    raws.append(string.pending)
                    string.pending = ""
                    self._abandon(string, raws, out)
                    return i
                assert isinstance(decoded, str)
                chars.append(decoded)
                raws.append(string.pending)
                string.pending = ""
                continue
            if char == "\\":
                string.pending = char
                i += 1
                continue
            if char == '"':
                self._feed_text(string, chars, raws, out)
                assert string.normalizer is not None
                string.normalizer.flush()
                self._release(string, out)
                self._string = None
                self._emit(out, '"', 1)
                return i + 1
            plain = _PLAIN.match(chunk, i)
            assert plain is not None
            text = plain.group(0)
            chars += text
            raws += text
            i += len(text)
        self._feed_text(string, chars, raws, out)
        return i

    def _feed_text(self, string: _String, chars: list[str], raws: list[str], out: list[str]) -> None:
        if not chars:
            return
        string.chars += chars
        string.raws += raws
        assert string.normalizer is not None
        string.normalizer.feed("".join(chars))
        self._release(string, out)

    def _release(self, string: _String, out: list[str]) -> None:
        """Turn the pieces the normaliser released back into JSON text: as the model wrote them
        where they did not change, re-encoded where they did."""
        normalizer = string.normalizer
        assert normalizer is not None and normalizer.log is not None
        taken = 0
        for text, consumed in normalizer.log:
            chars = string.chars[taken : taken + consumed]
            raws = string.raws[taken : taken + consumed]
            taken += consumed
            raw = "".join(raws)
            if text == "".join(chars):
                self._emit(out, raw, len(raw))
            else:
                escaped = any(r.startswith("\\u") and c > "\x7f" for c, r in zip(chars, raws))
                self._emit(out, _encode(text, escaped), len(raw))
        normalizer.log.clear()
        del string.chars[:taken]
        del string.raws[:taken]

    def _abandon(self, string: _String, raws: list[str], out: list[str]) -> None:
        """Not text after all: send what the normaliser holds, and the rest of the document, as
        they came."""
        raw = "".join(string.raws) + "".join(raws)
        self._emit(out, raw, len(raw))
        string.chars.clear()
        string.raws.clear()
        self._string = None
        self._state = _RAW


_MORE, _BAD = object(), object()


def _escape_status(seq: str) -> object:
    """The character a JSON escape sequence stands for; _MORE while it is incomplete; _BAD when
    it is invalid or a lone surrogate."""
    if len(seq) < 2:
        return _MORE
    if seq[1] != "u":
        return _ESCAPES.get(seq[1], _BAD)
    digits = seq[2:6]
    if not all(c in "0123456789abcdefABCDEF" for c in digits):
        return _BAD
    if len(seq) < 6:
        return _MORE
    unit = int(digits, 16)
    if not 0xD800 <= unit <= 0xDFFF:
        return chr(unit)
    if unit >= 0xDC00:
        return _BAD
    if len(seq) > 6 and seq[6] != "\\" or len(seq) > 7 and seq[7] != "u":
        return _BAD
    low = seq[8:12]
    if not all(c in "0123456789abcdefABCDEF" for c in low):
        return _BAD
    if len(seq) < 12:
        return _MORE
    unit2 = int(low, 16)
    if not 0xDC00 <= unit2 <= 0xDFFF:
        return _BAD
    return chr(0x10000 + ((unit - 0xD800) << 10) + (unit2 - 0xDC00))


def _encode(text: str, ascii_escapes: bool) -> str:
    """``text`` as the inside of a JSON string."""
    return json.dumps(text, ensure_ascii=ascii_escapes)[1:-1]


# --- whole answers ---------------------------------------------------------------------------------


def normalize_json(text: str, fmt: JsonFormat) -> str:
    """A structured answer with its free-text values normalised; unchanged when it is not one
    JSON document."""
    if not _may_change(text):
        return text
    try:
        json.loads(text)
    except ValueError:
        return text
    stream = JsonStreamNormalizer(fmt)
    return stream.feed(text) + stream.flush()


def json_changes(text: str, fmt: JsonFormat) -> tuple[list[Change], list[tuple[int, int, str]]]:
    """What ``normalize_json`` rewrites, span by span, and the keys and fixed values it kept."""
    try:
        json.loads(text)
    except ValueError:
        return [], []
    stream = JsonStreamNormalizer(fmt)
    stream.log, stream.spans = [], []
    stream.feed(text)
    stream.flush()
    return log_changes(text, stream.log), stream.spans


def _may_change(text: str) -> bool:
    return "\\u" in text or _has_simplified(text)
