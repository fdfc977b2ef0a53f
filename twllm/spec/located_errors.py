"""Turn pydantic validation errors into SpecIssues that name the file, line and field path."""

from __future__ import annotations

import re
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from twllm.errors import SpecIssue, did_you_mean
from twllm.spec.source import Path_, SpecSource, format_path

_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*): (.*)$", re.S)


def issues_from_validation(exc: ValidationError, source: SpecSource, root: type[BaseModel]) -> list[SpecIssue]:
    """One SpecIssue per pydantic error, sorted by line."""
    issues: dict[Path_, SpecIssue] = {}
    union_misses: dict[Path_, list[str]] = {}
    for err in exc.errors(include_url=False):
        loc = _clean_loc(err["loc"], source)
        member = _union_member(err["loc"], loc)
        if member is not None:
            # A value that matches none of a union's types: one issue, not one per type.
            union_misses.setdefault(loc, []).append(member)
            message = f"has the wrong type ({type(err.get('input')).__name__}); expected one of: " + ", ".join(
                union_misses[loc]
            )
        else:
            message = _message(err, loc, root)
            if err["type"] == "value_error":
                loc, message = _refine(loc, message, source)
            if loc in issues:
                message = f"{issues[loc].message}; {message}"
        issues[loc] = SpecIssue(source.file, source.line_of(loc), format_path(loc), message)
    return sorted(issues.values(), key=lambda i: (i.line or 0, i.path))


def _union_member(raw: tuple, cleaned: Path_) -> str | None:
    """The union member a pydantic error was raised for, when its location names one."""
    dropped = [p for p in raw if isinstance(p, str) and p not in cleaned]
    members = [p for p in dropped if p in _UNION_MEMBERS or p.startswith("list[")]
    return members[-1] if members else None


_UNION_MEMBERS = {"bool", "int", "float", "str"}


def _clean_loc(loc: tuple, source: SpecSource) -> Path_:
    """Drop the pseudo-locations pydantic adds for unions and validators ('function-after[...]')."""
    out: list[str | int] = []
    for part in loc:
        real = (*out, part) in source.lines
        if not real and isinstance(part, str) and ("[" in part or "(" in part or part in _UNION_MEMBERS):
            continue
        out.append(part)
    return tuple(out)


def _refine(loc: Path_, message: str, source: SpecSource) -> tuple[Path_, str]:
    """A model validator's 'field: text' message points at that field when it exists."""
    message = message.removeprefix("Value error, ")
    match = _PREFIX.match(message)
    if match:
        candidate = (*loc, *match.group(1).split("."))
        if candidate in source.lines:
            return candidate, match.group(2)
    return loc, message


def _message(err: ErrorDetails, loc: Path_, root: type[BaseModel]) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "extra_forbidden":
        fields = _fields_at(root, loc[:-1])
        hint = did_you_mean(str(loc[-1]), fields)
        allowed = f"; allowed: {', '.join(sorted(fields))}" if fields and not hint else ""
        return f"unknown field '{loc[-1]}'{hint}{allowed}"
    if kind == "missing":
        return "required field is missing"
    if kind == "greater_than_equal":
        return f"must be ≥ {ctx['ge']}, got {_shown(value)}"
    if kind == "greater_than":
        return f"must be > {ctx['gt']}, got {_shown(value)}"
    if kind == "less_than_equal":
        return f"must be ≤ {ctx['le']}, got {_shown(value)}"
    if kind == "less_than":
        return f"must be < {ctx['lt']}, got {_shown(value)}"
    if kind == "literal_error":
        hint = did_you_mean(str(value), re.findall(r"'([^']*)'", ctx.get("expected", "")))
        return f"must be one of {ctx.get('expected')}, got {_shown(value)}{hint}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"must be a whole number, got {_shown(value)}"
    if kind in ("float_parsing", "float_type"):
        return f"must be a number, got {_shown(value)}"
    if kind in ("bool_parsing", "bool_type"):
        return f"must be true or false, got {_shown(value)}"
    if kind in ("string_type",):
        return f"must be text, got {_shown(value)}"
    if kind in ("list_type",):
        return f"must be a list, got {type(value).__name__}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping of fields, got {_shown(value)}"
    if kind == "string_pattern_mismatch":
        return f"{_shown(value)} does not have the expected form ({ctx.get('pattern')})"
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length')} item(s)"
    if kind == "too_long":
        return f"takes at most {ctx.get('max_length')} item(s)"
    return str(err["msg"]).removeprefix("Value error, ")


def _shown(value: Any, limit: int = 80) -> str:
    """``value`` as the message quotes it: its repr, cut short when long (a pasted file, a
    number of a thousand digits)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}… ({len(text)} characters)"


def _fields_at(root: type[BaseModel], loc: Path_) -> list[str]:
    """Names of the fields allowed at ``loc`` (walking lists, dicts and optionals)."""
    tp: Any = root
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(str(part))
            if field is None:
                return []
            tp = field.annotation
        else:
            args = typing.get_args(tp)
            tp = args[-1] if args else None
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    return []


def _unwrap(tp: Any) -> Any:
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            models = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(models) != 1:
                return tp
            tp = models[0]
        else:
            return tp
