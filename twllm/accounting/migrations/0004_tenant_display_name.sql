-- A name for people (`twllm tenants create X --display-name '臺大醫院 放射科'`, the console): any
-- text of 1-100 characters without control characters (checked by twllm.accounting.store). The
-- tenant's name stays the slug used in commands, URLs and metrics labels; NULL: none given.
ALTER TABLE tenants ADD COLUMN display_name text;
