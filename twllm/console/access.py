"""Who calls the console's API and what each caller may do.

The caller sends a key as ``Authorization: Bearer``. The master key is the admin; a tenant's
active key (of a tenant not disabled) is that tenant, who may read only its own view. Every
other key is refused with the same words the gateway uses (401 missing / invalid / revoked /
expired key, 403 for a disabled tenant), and a tenant calling an admin route gets 403.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum

from twllm.accounting.keys import looks_like_key


class Access(StrEnum):
    """Who may call a route."""

    ADMIN = "admin"
    """The master key only."""
    TENANT = "tenant"
    """A tenant's key only (its own view)."""
    ANY = "any"
    """Any valid key."""


@dataclass(frozen=True)
class TenantKey:
    """What the console needs to know of a tenant key (looked up by its whole secret)."""

    id: int
    prefix: str
    tenant: str
    status: str
    """active | revoked | expired."""
    tenant_disabled: bool = False


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: the admin (``key`` None) or a tenant key."""

    key: TenantKey | None

    @property
    def admin(self) -> bool:
        return self.key is None

    def to_dict(self) -> dict[str, object]:
        if self.key is None:
            return {"role": "admin"}
        return {"role": "tenant", "tenant": self.key.tenant, "key": self.key.prefix}


class Denied(Exception):
    """A refused console request: the HTTP status, a code and a message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


KeyLookup = Callable[[str], Awaitable[TenantKey | None]]


def bearer(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header (None without one)."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


async def identify(secret: str | None, master_key: str | None, lookup: KeyLookup) -> Caller:
    """The caller of ``secret``; ``Denied`` when it is not a usable key."""
    if not secret:
        raise Denied(401, "missing_api_key", "No API key: send it as 'Authorization: Bearer sk-…'.")
    if master_key and hmac.compare_digest(secret.encode("utf-8"), master_key.encode("utf-8")):
        return Caller(None)
    if not looks_like_key(secret):  # never a prefix match: only whole keys are looked up
        raise Denied(401, "invalid_api_key", "Incorrect API key provided.")
    key = await lookup(secret)
    if key is None:
        raise Denied(401, "invalid_api_key", "Incorrect API key provided.")
    if key.status != "active":
        raise Denied(401, f"{key.status}_api_key", f"The API key {key.prefix}… was {key.status}.")
    if key.tenant_disabled:
        raise Denied(403, "tenant_disabled", f"The tenant of the API key {key.prefix}… is disabled.")
    return Caller(key)


def authorize(caller: Caller, access: Access) -> None:
    """``Denied`` (403) when ``caller`` may not use a route open to ``access``."""
    if access is Access.ADMIN and not caller.admin:
        raise Denied(403, "admin_only", "This part of the console is for the gateway's administrator.")
    if access is Access.TENANT and caller.admin:
        raise Denied(403, "tenant_only", "This part of the console is a tenant's own view; log in with its key.")
