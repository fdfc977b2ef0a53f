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
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.scalarbool import ScalarBoolean

from twllm.errors import SpecError, SpecIssue

Path_ = tuple[str | int, ...]

# ${VAR} or ${VAR:-default}; $$ escapes a literal dollar sign.
_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
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
    """('models', 2, 'gpus') -> 'models[2].gpus'."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def load_source(path: Path, env: Mapping[str, str]) -> SpecSource:
    """Parse ``path``; raise SpecError for unreadable files, YAML errors and unset variables."""
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([SpecIssue(name, None, "", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([SpecIssue(name, None, "", f"cannot read file: {exc}")]) from None
    return parse_source(text, name, env)


def parse_source(text: str, name: str, env: Mapping[str, str]) -> SpecSource:
    """Parse YAML text (see load_source)."""
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    try:
        raw = yaml.load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        raise SpecError([SpecIssue(name, line, "", f"YAML syntax error: {problem}")]) from None
    except YAMLError as exc:
        raise SpecError([SpecIssue(name, None, "", f"YAML syntax error: {exc}")]) from None
    if raw is None:
        raise SpecError([SpecIssue(name, 1, "", "the file is empty; expected a mapping")])
    if not isinstance(raw, CommentedMap):
        raise SpecError([SpecIssue(name, 1, "", "the top level must be a mapping of fields")])

    source = SpecSource(file=name, data=None)
    issues: list[SpecIssue] = []
    source.lines[()] = 1
    source.data = _walk(raw, (), source, env, issues)
    if issues:
        raise SpecError(issues)
    return source


def _walk(node: Any, path: Path_, src: SpecSource, env: Mapping[str, str], issues: list) -> Any:
    if isinstance(node, CommentedMap):
        out: dict[str, Any] = {}
        for key in node:
            line = node.lc.key(key)[0] + 1
            child = (*path, str(key))
            src.lines[child] = line
            if not isinstance(key, str):
                issues.append(SpecIssue(src.file, line, format_path(child), "keys must be text"))
            out[str(key)] = _walk(node[key], child, src, env, issues)
        return out
    if isinstance(node, CommentedSeq):
        items = []
        for index, item in enumerate(node):
            child = (*path, index)
            src.lines[child] = node.lc.item(index)[0] + 1
            items.append(_walk(item, child, src, env, issues))
        return items
    if isinstance(node, str):
        return _interpolate(str(node), path, src, env, issues)
    if isinstance(node, (bool, ScalarBoolean)):  # an anchored boolean is a ScalarBoolean (an int)
        return bool(node)
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    return node


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
