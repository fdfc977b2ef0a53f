"""API key secrets: how they look, how they are hashed, what people see of them."""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "sk-tw-"
"""Tenant keys look like OpenAI's (`sk-…`); `sk-tw-` tells them apart from the master key."""
PREFIX_CHARS = 12
"""How much of a key `twllm keys list` shows: 'sk-tw-3fA9c1'."""


def generate_key() -> str:
    """A new secret: sk-tw- and 40 URL-safe random characters (240 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(30)


def hash_key(secret: str) -> bytes:
    """sha256 of the secret: what the database stores and looks keys up by.

    A fast hash is right here: the secret has 240 bits of entropy, so there is nothing for a
    slow password hash to protect, and the lookup sits on every request's path."""
    return hashlib.sha256(secret.encode("utf-8")).digest()


def display_prefix(secret: str) -> str:
    """The part of a key shown to people."""
    return secret[:PREFIX_CHARS]


def looks_like_key(value: str) -> bool:
    return value.startswith(KEY_PREFIX) and 30 <= len(value) <= 80
