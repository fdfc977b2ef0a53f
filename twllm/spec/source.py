"""Read a YAML spec into plain data, remembering the line of every field and expanding ${VAR}.

The result keeps three things the rest of the spec code needs:
- ``data``: plain dicts, lists and scalars (no YAML-library types);
- ``lines``: field path (a tuple of keys and list indexes) -> 1-based line;
- ``env_refs``: field path -> environment variable, for scalars written as exactly ``${VAR}``
  or ``${VAR:-default}``, so secrets can be rendered as references instead of values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.constructor import ConstructorError, RoundTripConstructor
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.reader import ReaderError
from ruamel.yaml.scalarbool import ScalarBoolean

from twllm.errors import SpecError, SpecIssue

Path_ = tuple[str | int, ...]

# ${VAR} or ${VAR:-default}; $$ escapes a literal dollar sign.
_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SURROGATE = re.compile("[\ud800-\udfff]")
_WHOLE_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}$")


class EnvStr(str):
    """A string that came from exactly one ``${VAR}`` reference; remembers the variable."""

    var: str
    has_default: bool

    def __new__(cls, value: str, var: str, has_default: bool = False) -> EnvStr:
        obj = super().__new__(cls, value)
        obj.var = var
        obj.has_default = has_default
        return obj


@dataclass
class SpecSource:
    """A spec file as plain data plus where each field came from."""

    file: str
    data: Any
    lines: dict[Path_, int] = field(default_factory=dict)
    env_refs: dict[Path_, str] = field(default_factory=dict)

    def line_of(self, path: Path_) -> int | None:
        """The line of ``path``, or of its nearest ancestor that has one."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return None


def format_path(path: Path_) -> str:
    """('models', 2, 'gpus') -> 'models[2].gpus'; an empty key is written ""."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = str(part) or '""'
            out += f".{name}" if out else name
    return out


def load_source(path: Path, env: Mapping[str, str]) -> SpecSource:
    """Parse ``path``; raise SpecError for unreadable files, YAML errors and unset variables."""
    name = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SpecError([SpecIssue(name, None, "", "file not found")]) from None
    except OSError as exc:
        raise SpecError([SpecIssue(name, None, "", f"cannot read file: {exc}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        message = (
            f"cannot read file: not UTF-8 text: byte 0x{raw[exc.start]:02x} at column {column} ({exc.reason}); "
            "save the file as UTF-8"
        )
        raise SpecError([SpecIssue(name, line, "", message)]) from None
    return parse_source(text, name, env)


def parse_source(text: str, name: str, env: Mapping[str, str]) -> SpecSource:
    """Parse YAML text (see load_source)."""
    yaml = YAML(typ="rt")
    yaml.Constructor = _LocatedConstructor
    yaml.allow_duplicate_keys = False
    deep = _deepest_line(text) if _flow_too_deep(text) else None  # the count may be wrong; the scanner is not
    if deep is not None:
        raise SpecError([_too_deep(name, deep)])
    try:
        raw = yaml.load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = _text_of(" ".join(p for p in (exc.context, exc.problem) if p))
        raise SpecError([SpecIssue(name, line, "", f"YAML syntax error: {problem}")]) from None
    except ReaderError as exc:  # a character YAML does not allow (control characters)
        line = text.count("\n", 0, exc.position) + 1 if isinstance(exc.position, int) else None
        what = f"character #x{exc.character:04x}" if isinstance(exc.character, int) else "character"
        message = f"YAML syntax error: unacceptable {what}: {exc.reason}"
        raise SpecError([SpecIssue(name, line, "", message)]) from None
    except YAMLError as exc:
        raise SpecError([SpecIssue(name, None, "", f"YAML syntax error: {exc}")]) from None
    except RecursionError:
        raise SpecError([_too_deep(name, _deepest_line(text))]) from None
    if raw is None:
        raise SpecError([SpecIssue(name, 1, "", "the file is empty; expected a mapping")])
    if not isinstance(raw, CommentedMap):
        raise SpecError([SpecIssue(name, 1, "", "the top level must be a mapping of fields")])

    source = SpecSource(file=name, data=None)
    issues: list[SpecIssue] = []
    source.lines[()] = 1
    try:
        source.data = _walk(raw, (), source, env, issues)
    except _TooLarge as exc:
        raise SpecError([SpecIssue(name, source.line_of(exc.path), format_path(exc.path), exc.message)]) from None
    except RecursionError:
        raise SpecError([_too_deep(name, _deepest_line(text))]) from None
    if issues:
        raise SpecError(issues)
    return source


MAX_DEPTH = 64
"""Mappings and lists nest at most this deep (a real spec nests about 6 levels)."""
MAX_VALUES = 100_000
"""Fields and list items a spec may hold once aliases are expanded (aliases of aliases grow
exponentially: ten levels of ten make 10**10)."""
MAX_DIGITS = 1000
"""Whole numbers longer than this are refused (no setting takes one; Python stops printing
numbers of 4300 digits)."""
_TOO_LONG = 10**MAX_DIGITS


class _TooLarge(Exception):
    """The spec nests too deep or expands to too many values; stops the walk at ``path``."""

    def __init__(self, path: Path_, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


class _LocatedConstructor(RoundTripConstructor):
    """Reports a value YAML recognises but Python cannot build (a date that does not exist, a
    whole number of over 4300 digits) as a YAML error at its line, not as a bare ValueError."""

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:
            value = node.value if isinstance(node.value, str) else ""
            shown = repr(value[:40] + "…") if len(value) > 40 else repr(value)
            reason = str(exc).split(";")[0]
            raise ConstructorError(None, None, f"cannot read the value {shown}: {reason}", node.start_mark) from None


def _too_deep(name: str, line: int | None) -> SpecIssue:
    return SpecIssue(name, line, "", f"the document nests too deep (at most {MAX_DEPTH} levels)")


def _flow_too_deep(text: str) -> bool:
    """Whether flow collections (``[…]``, ``{…}``) seem to nest deeper than MAX_DEPTH, counted
    in one pass: the YAML parser takes quadratic time on them (3000 levels: 20 s) before it
    fails, while the scanner, stopped at MAX_DEPTH (``_deepest_line``), takes under a second."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return False
    # Brackets inside quotes, comments and plain words do not count: outside a collection a
    # bracket opens one only where a value starts (line start, after `:`, `-` or `?`). Block
    # scalars (|, >) are not told apart: the scanner confirms what this count finds.
    depth, quote, escaped, comment, previous, last = 0, "", False, False, "\n", "\n"
    for char in text:
        if char == "\n":
            comment = False
        if comment:
            pass
        elif quote:
            if escaped:
                escaped = False
            elif char == "\\" and quote == '"':
                escaped = True
            elif char == quote:
                quote = ""
        elif char in "[{" and (depth or last in "\n:-?"):
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif char in "]}" and depth:
            depth -= 1
        elif char in "'\"" and (depth or last in "\n:-?"):
            quote = char
        elif char == "#" and previous in " \t\n":
            comment = True
        previous = char
        if char == "\n" or char not in " \t\r":
            last = char
    return False


_OPENERS = ("BlockMappingStartToken", "BlockSequenceStartToken", "FlowMappingStartToken", "FlowSequenceStartToken")
_CLOSERS = ("BlockEndToken", "FlowMappingEndToken", "FlowSequenceEndToken")


def _deepest_line(text: str) -> int | None:
    """The first line where the YAML text nests deeper than MAX_DEPTH (its scanner does not
    recurse, so this works on a document too deep for the parser)."""
    depth = 0
    try:
        for token in YAML(typ="rt").scan(text):
            kind = type(token).__name__
            if kind in _OPENERS:
                depth += 1
                if depth > MAX_DEPTH:
                    return token.start_mark.line + 1
            elif kind in _CLOSERS:
                depth -= 1
    except (YAMLError, RecursionError):
        pass
    return None


def _walk(node: Any, path: Path_, src: SpecSource, env: Mapping[str, str], issues: list) -> Any:
    if isinstance(node, (CommentedMap, CommentedSeq)):
        if len(path) >= MAX_DEPTH:
            raise _TooLarge(path, f"nests too deep (at most {MAX_DEPTH} levels)")
        if len(src.lines) + len(node) > MAX_VALUES:
            raise _TooLarge(path, f"the spec holds more than {MAX_VALUES} values (aliases inside aliases?)")
    if isinstance(node, CommentedMap):
        out: dict[str, Any] = {}
        for key in node:
            line = _key_line(node, key)
            name = _pairs_joined(key) if isinstance(key, str) else key
            text = _text_of(name)
            child = (*path, text)
            src.lines[child] = line
            if not isinstance(key, str):
                issues.append(SpecIssue(src.file, line, format_path(child), "keys must be text"))
            elif (problem := _not_text(name)) is not None:
                issues.append(SpecIssue(src.file, line, format_path(child), problem))
            out[text] = _walk(node[key], child, src, env, issues)
        return out
    if isinstance(node, CommentedSeq):
        items = []
        for index, item in enumerate(node):
            child = (*path, index)
            position = node.lc.item(index) if node.lc.data is not None and index in node.lc.data else None
            src.lines[child] = int(position[0]) + 1 if position else _node_line(node)
            items.append(_walk(item, child, src, env, issues))
        return items
    if isinstance(node, str):
        node = _pairs_joined(node)
        problem = _not_text(node)
        if problem is not None:
            issues.append(SpecIssue(src.file, src.line_of(path), format_path(path), problem))
            return _text_of(node)
        return _interpolate(str(node), path, src, env, issues)
    if isinstance(node, (bool, ScalarBoolean)):  # an anchored boolean is a ScalarBoolean (an int)
        return bool(node)
    if isinstance(node, int):
        if abs(node) >= _TOO_LONG:
            message = f"a whole number of more than {MAX_DIGITS} digits; no setting takes one"
            issues.append(SpecIssue(src.file, src.line_of(path), format_path(path), message))
            return 0
        return int(node)
    if isinstance(node, float):
        return float(node)
    return node


def _pairs_joined(text: str) -> str:
    """``text`` with each UTF-16 surrogate pair, as JSON writes characters beyond U+FFFF
    ("\\ud83d\\ude00"), made the one character it stands for; YAML leaves the halves apart."""
    if _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")


def _not_text(text: str) -> str | None:
    """Why a string of the spec cannot be used (in a path, an argv, a message), or None."""
    if "\x00" in text:
        return "holds a NUL character (written as \\0), which no setting can carry"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "holds a lone surrogate (written as \\ud800 … \\udfff), which is not text"
    return None


def _text_of(value: Any) -> str:
    """``value`` as text that can be printed: NUL and lone surrogates (from "\\0" and "\\ud800"
    escapes) written as escapes."""
    try:
        text = str(value)
    except ValueError:  # a whole number too long to print
        return f"<a number of {value.bit_length()} bits>"
    if _not_text(text) is None:
        return text
    return text.replace("\x00", "\\0").encode("utf-8", "backslashreplace").decode("utf-8")


def _key_line(node: CommentedMap, key: Any) -> int:
    """The 1-based line of ``key``, also when a merge key (``<<: *anchor``) brought it in."""
    if node.lc.data is not None and key in node.lc.data:
        return int(node.lc.key(key)[0]) + 1
    for merged in node.merge:
        if isinstance(merged, CommentedMap) and merged is not node and key in merged:
            return _key_line(merged, key)
    return _node_line(node)


def _node_line(node: CommentedMap | CommentedSeq) -> int:
    return int(node.lc.line or 0) + 1


def _interpolate(text: str, path: Path_, src: SpecSource, env: Mapping[str, str], issues: list) -> str:
    whole = _WHOLE_REF.match(text)
    missing: list[str] = []

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        var, default = match.group(1), match.group(2)
        value = env.get(var)
        if value is None or (value == "" and default is not None):
            if default is not None:
                return default
            missing.append(var)
            return ""
        return value

    result = _REF.sub(substitute, text)
    for var in missing:
        issues.append(
            SpecIssue(
                src.file,
                src.line_of(path),
                format_path(path),
                f"environment variable {var} is not set (write ${{{var}:-default}} for a default)",
            )
        )
    if whole:
        src.env_refs[path] = whole.group(1)
        return EnvStr(result, whole.group(1), whole.group(2) is not None)
    return result
