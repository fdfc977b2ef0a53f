"""Accounting in PostgreSQL: tenants, API keys, rate limits and budgets, the spend ledger, usage reports."""
