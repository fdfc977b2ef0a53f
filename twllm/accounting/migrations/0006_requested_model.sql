-- The name a client asked for, beside the model that answered it (`model`): an alias
-- (gateway.aliases: gpt-4o-mini -> taide-8b) or a model a fallback stood in for. Written by the
-- spend logger from LiteLLM's router metadata (original_model_group); NULL in rows from before.
ALTER TABLE spend_ledger ADD COLUMN requested_model text;
