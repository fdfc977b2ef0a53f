"""Every error twllm raises on purpose, in one hierarchy.

    TwllmError                  base; carries an exit code and an optional hint
    ├── SpecError               the deployment file is invalid (exit 2)
    │     holds one or more SpecIssue(file, line, path, message)
    ├── RegistryError           an unknown or malformed model registry entry (exit 2)
    ├── PlanError               the spec is valid but cannot be placed on this fleet (exit 2)
    └── RuntimeFailure          something failed while running (exit 1)
          └── ContractError     plan.json or gateway.json does not read back (also a ValueError)

Only the CLI entry point turns these into text for people; library code raises them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_INVALID = 2
EXIT_NOT_READY = 3
EXIT_INTERRUPTED = 130


class TwllmError(Exception):
    """Base class: a message for people, an exit code and an optional hint."""

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class SpecIssue:
    """One problem in a spec file, located by file, line and field path."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where} {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class SpecError(TwllmError):
    """The deployment file does not validate; holds every issue found."""

    exit_code = EXIT_INVALID

    def __init__(self, issues: Sequence[SpecIssue], *, hint: str | None = None) -> None:
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues), hint=hint)


class RegistryError(TwllmError):
    """A registry id is unknown or a catalog file is malformed."""

    exit_code = EXIT_INVALID


class PlanError(TwllmError):
    """The spec is valid but the plan cannot be made (GPUs do not fit, ports clash)."""

    exit_code = EXIT_INVALID


class RuntimeFailure(TwllmError):
    """A runtime step failed."""

    exit_code = EXIT_RUNTIME


class ContractError(RuntimeFailure, ValueError):
    """A file one twllm process wrote for another (plan.json, gateway.json) does not read back:
    an unknown key, a missing or mistyped field. Also a ValueError, so that code guarding a read
    with ``except (OSError, ValueError)`` (the gateway's hooks) treats it as an unreadable file."""

    @classmethod
    def from_validation(
        cls, what: str, issues: Iterable[Mapping[str, Any]], *, hint: str | None = None
    ) -> ContractError:
        """From pydantic's ``ValidationError.errors()``: ``<what>: <field>: <problem>; ...``."""
        lines = []
        for issue in issues:
            where = ".".join(str(part) for part in issue.get("loc", ())) or "(the whole file)"
            problem = "unknown key" if issue.get("type") == "extra_forbidden" else str(issue.get("msg", "invalid"))
            lines.append(f"{where}: {problem}")
        return cls(
            f"{what}: " + "; ".join(lines[:5]) + (f" (and {len(lines) - 5} more)" if len(lines) > 5 else ""), hint=hint
        )


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean 'x'?)' suffix, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
