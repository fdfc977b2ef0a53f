"""Connecting to a database with errors that never show its password, and masking a DSN for display."""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

import psycopg

from twllm.errors import RuntimeFailure

CONNECT_TIMEOUT_S = 5


def connect(url: str, *, autocommit: bool = True) -> psycopg.Connection:
    """A connection to ``url``; RuntimeFailure naming the server (never the password) if it fails."""
    try:
        return psycopg.connect(url, autocommit=autocommit, connect_timeout=CONNECT_TIMEOUT_S)
    except (psycopg.Error, OSError) as exc:
        reason = _redact(" ".join(str(exc).split()), url)
        raise RuntimeFailure(
            f"cannot connect to the database {mask_password(url)}: {reason}",
            hint="is the deployment running? (twllm status; an embedded database runs only while the deployment does)",
        ) from None


def _redact(text: str, url: str) -> str:
    """``text`` with every spelling of the URL's password replaced by ***."""
    from psycopg.conninfo import conninfo_to_dict

    found: set[str] = set()
    try:
        found.add(str(conninfo_to_dict(url).get("password") or ""))
    except psycopg.Error:
        pass
    try:
        raw = urlsplit(url).password or ""
    except ValueError:
        raw = ""
    found |= {raw, unquote(raw)}
    for secret in sorted((s for s in found if s), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def mask_password(dsn: str) -> str:
    """``dsn`` (URL or key=value form) with any password replaced by ``***``."""
    scheme, sep, rest = dsn.partition("://")
    if not sep:
        return re.sub(r"(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S*)", r"\1***", dsn)
    # Mask up to the last '@' (a password may hold characters that end a URL part elsewhere).
    head = rest.split("?", 1)[0]
    at = head.rfind("@") if "@" in head else rest.rfind("@")
    if at != -1 and ":" in rest[:at]:
        rest = rest[:at].split(":", 1)[0] + ":***" + rest[at:]
    rest = re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", rest)
    return f"{scheme}://{rest}"
