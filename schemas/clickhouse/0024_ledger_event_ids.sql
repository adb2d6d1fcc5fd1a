-- The event ids the ledger holds, keyed by (org, team, event_id): what the sink looks a batch up in before
-- inserting it (first version wins). The ledger's own sorting key puts the UTC day of occurred_at before
-- event_id, so a copy re-sent with another occurred_at day (a client that stamps the time when it sends,
-- retrying across midnight UTC) was a second row there, counted twice by every report; here it is the same
-- key whatever day it names. A materialized view fills this on every ledger insert, and the insert below
-- copies what the ledger held before. Rows expire with the ledger's (SPENDSTREAM_LEDGER_TTL_MONTHS).
CREATE TABLE IF NOT EXISTS {db}.ledger_event_ids
(
    org      LowCardinality(String),
    team     LowCardinality(String),
    event_id UUID,
    day      Date
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (org, team, event_id)
TTL day + INTERVAL {ttl_months} MONTH;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.ledger_event_ids_mv TO {db}.ledger_event_ids AS
SELECT org, team, event_id, toDate(occurred_at) AS day FROM {db}.usage_ledger;

INSERT INTO {db}.ledger_event_ids SELECT org, team, event_id, toDate(occurred_at) FROM {db}.usage_ledger;
