"""Tenants, API keys, limits and the spend ledger (see issue 4)."""
