-- Tenants, API keys, the spend ledger and its daily roll-up, and shared rate-limit windows.
-- Applied once by `twllm db migrate` (and on deploy); recorded in twllm_migrations.

CREATE TABLE tenants (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id            bigserial PRIMARY KEY,
    tenant_id     bigint NOT NULL REFERENCES tenants (id),
    key_hash      bytea NOT NULL UNIQUE,          -- sha256 of the secret; the secret is never stored
    prefix        text NOT NULL,                  -- first characters, for people: 'sk-tw-3fA9c1'
    name          text,
    models        text[],                         -- NULL: every model of the deployment
    rpm           integer CHECK (rpm > 0),
    tpm           integer CHECK (tpm > 0),
    budget        numeric(18, 6) CHECK (budget >= 0),
    budget_period text CHECK (budget_period IN ('daily', 'monthly', 'total')),
    expires_at    timestamptz,
    revoked_at    timestamptz,
    rotated_from  bigint REFERENCES api_keys (id),
    created_at    timestamptz NOT NULL DEFAULT now(),
    CHECK ((budget IS NULL) = (budget_period IS NULL))
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);

-- One row per request the gateway answered (success or failure, streams included).
-- Partitioned by month so old months can be rolled up and dropped (retention).
CREATE TABLE spend_ledger (
    ts                timestamptz NOT NULL,
    request_id        text NOT NULL,
    tenant_id         bigint,                     -- NULL: the master key
    key_id            bigint,
    model             text NOT NULL,              -- the client-facing model name
    deployment        text,                       -- which replica served it
    prompt_tokens     integer NOT NULL DEFAULT 0,
    completion_tokens integer NOT NULL DEFAULT 0,
    cost              numeric(18, 8) NOT NULL DEFAULT 0,
    currency          char(3) NOT NULL DEFAULT 'TWD',
    latency_ms        integer,
    ttft_ms           integer,                    -- time to first token, streams only
    status_code       integer NOT NULL,
    error_class       text,
    stream            boolean NOT NULL DEFAULT false,
    guard             jsonb,                      -- guard verdicts (category and rule, never raw PII)
    PRIMARY KEY (ts, request_id)                  -- replays of a spooled row are no-ops
) PARTITION BY RANGE (ts);
CREATE TABLE spend_ledger_default PARTITION OF spend_ledger DEFAULT;
CREATE INDEX spend_ledger_tenant_ts ON spend_ledger (tenant_id, ts);
CREATE INDEX spend_ledger_key_ts ON spend_ledger (key_id, ts);

-- Daily totals; what usage reports read for days whose ledger partitions were dropped.
CREATE TABLE spend_daily (
    day               date NOT NULL,
    tenant_id         bigint NOT NULL DEFAULT 0,  -- 0: the master key
    key_id            bigint NOT NULL DEFAULT 0,
    model             text NOT NULL,
    currency          char(3) NOT NULL,
    requests          bigint NOT NULL DEFAULT 0,
    errors            bigint NOT NULL DEFAULT 0,
    prompt_tokens     bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    cost              numeric(20, 8) NOT NULL DEFAULT 0,
    PRIMARY KEY (day, tenant_id, key_id, model, currency)
);

-- Per-key request and token counts per minute, shared by every gateway worker.
CREATE UNLOGGED TABLE rate_windows (
    key_id        bigint NOT NULL,
    window_start  timestamptz NOT NULL,
    requests      integer NOT NULL DEFAULT 0,
    tokens        bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, window_start)
);
