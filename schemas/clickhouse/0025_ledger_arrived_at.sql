-- When each event's message reached the broker (its Kafka timestamp, which the processor judges lateness by).
-- The processor counts in no budget an event that arrived later than its allowed lateness after occurred_at,
-- while the ledger records it (finance sees every cost); a rebuild of the budgets from the ledger (a restart of
-- the embedded stack) counted it all the same, so a team's spend jumped at a restart and it could be shut off
-- by what no budget had counted (a user session). The rebuild now leaves such rows out. Rows written before
-- this column existed read their ingested_at, the time the sink inserted them (a little after they arrived).
ALTER TABLE {db}.usage_ledger ADD COLUMN IF NOT EXISTS arrived_at DateTime64(3, 'UTC') DEFAULT ingested_at;
