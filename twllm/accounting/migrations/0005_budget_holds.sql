-- Budgets shared exactly by every gateway process (twllm.accounting.limits, "Budget"):
--
-- budget_spend: each key's cost per UTC day, added in the same statement that writes its ledger
-- rows (so it always equals the ledger), with the day's most expensive request, the estimate of
-- what one more request may cost.
CREATE TABLE budget_spend (
    key_id   bigint NOT NULL,
    day      date NOT NULL,
    cost     numeric(20, 8) NOT NULL DEFAULT 0,
    max_cost numeric(18, 8) NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, day)
);
INSERT INTO budget_spend (key_id, day, cost, max_cost)
SELECT key_id, day, sum(cost), max(max_cost) FROM (
    SELECT key_id, (ts AT TIME ZONE 'UTC')::date AS day, sum(cost) AS cost, max(cost) AS max_cost
    FROM spend_ledger WHERE key_id IS NOT NULL GROUP BY 1, 2
    UNION ALL
    SELECT key_id, day, sum(cost), 0 FROM spend_daily WHERE key_id <> 0 GROUP BY 1, 2
) AS both_tables
GROUP BY key_id, day;

-- budget_holds: a request of a key with a budget, admitted and not yet in the ledger. The ledger
-- writer deletes the hold in the statement that writes the request's row; a hold whose request
-- never got a row (its gateway was killed) expires.
CREATE UNLOGGED TABLE budget_holds (
    hold_id    text PRIMARY KEY,
    key_id     bigint NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX budget_holds_key ON budget_holds (key_id, expires_at);
