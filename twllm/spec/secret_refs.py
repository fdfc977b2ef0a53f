"""Secret values in the spec: always read from the environment, only ever written as references."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import PlainSerializer, PlainValidator, WithJsonSchema

from twllm.settings import MASTER_KEY_ENV
from twllm.spec.source import EnvStr

_ENV_REF_SCHEMA = {
    "type": "string",
    "pattern": r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}$",
    "description": f"A reference to an environment variable, e.g. ${{{MASTER_KEY_ENV}}}.",
}


class SecretRef:
    """A secret taken from an environment variable. Its repr and str never show the value."""

    __slots__ = ("var", "_value")

    def __init__(self, var: str | None, value: str) -> None:
        self.var = var
        self._value = value

    def reveal(self) -> str:
        """The secret itself; call only where it is handed to a process, never to print."""
        return self._value

    def reference(self) -> str:
        """How rendered files name it: LiteLLM's ``os.environ/VAR`` form."""
        if self.var is None:
            raise ValueError("a literal value has no environment reference")
        return f"os.environ/{self.var}"

    def __repr__(self) -> str:
        return f"SecretRef(var={self.var!r})"

    def __str__(self) -> str:
        return f"${{{self.var}}}" if self.var else "<literal>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretRef) and (self.var, self._value) == (other.var, other._value)

    def __hash__(self) -> int:
        return hash((self.var, self._value))


def _env_secret(value: Any) -> SecretRef:
    if isinstance(value, SecretRef):
        return value
    if isinstance(value, EnvStr):
        if value.has_default:
            raise ValueError(
                f"a secret cannot have a default in the spec file: write ${{{value.var}}} and set the variable"
            )
        if not value:
            raise ValueError(f"environment variable {value.var} is empty")
        return SecretRef(value.var, str(value))
    if isinstance(value, str):
        raise ValueError(
            "secrets are never written in the spec file: put the value in an environment "
            f"variable and write ${{{MASTER_KEY_ENV}}} (or another variable name)"
        )
    raise ValueError("expected a ${VAR} reference")


def _database_url(value: Any) -> SecretRef:
    if isinstance(value, (SecretRef, EnvStr)):
        return _env_secret(value)
    if isinstance(value, str):
        parts = urlsplit(value)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError("must be a postgresql:// URL")
        if parts.password:
            raise ValueError("this URL holds a password: put it in an environment variable and write ${DATABASE_URL}")
        return SecretRef(None, value)
    raise ValueError("expected a postgresql:// URL or a ${VAR} reference")


def _serialize(ref: SecretRef) -> str:
    return str(ref) if ref.var else ref.reveal()


EnvSecret = Annotated[
    SecretRef,
    PlainValidator(_env_secret),
    PlainSerializer(_serialize, return_type=str),
    WithJsonSchema(_ENV_REF_SCHEMA),
]
"""A secret that must come from ``${VAR}``."""

DatabaseUrl = Annotated[
    SecretRef,
    PlainValidator(_database_url),
    PlainSerializer(_serialize, return_type=str),
    WithJsonSchema(
        {
            "type": "string",
            "description": "postgresql:// URL without a password, or a ${VAR} reference.",
        }
    ),
]
"""A database URL: a ``${VAR}`` reference, or a literal URL that holds no password."""
