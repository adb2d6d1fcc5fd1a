-- = schemas/clickhouse/0025_ledger_arrived_at.sql for a cluster: the column on every shard's table and on the
-- Distributed table the services use.
ALTER TABLE {db}.usage_ledger_local ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS arrived_at DateTime64(3, 'UTC') DEFAULT ingested_at;
ALTER TABLE {db}.usage_ledger ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS arrived_at DateTime64(3, 'UTC') DEFAULT ingested_at;
