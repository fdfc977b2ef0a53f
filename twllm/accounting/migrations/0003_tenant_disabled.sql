-- A tenant can be disabled (the console's "disable", `twllm tenants disable`): its keys are
-- refused by the gateway while disabled_at is set, and accepted again once it is cleared.
ALTER TABLE tenants ADD COLUMN disabled_at timestamptz;
