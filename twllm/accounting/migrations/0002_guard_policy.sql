-- Named guard policies (spec: guard.policies) for a tenant and, overriding it, for one key.
ALTER TABLE tenants ADD COLUMN guard_policy text;
ALTER TABLE api_keys ADD COLUMN guard_policy text;
