-- = schemas/clickhouse/0007_decision_critical_throttle.sql: the column on every shard, then on the Distributed table.
ALTER TABLE {db}.decisions_local ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS critical_throttle_rps Map(String, Float64);
ALTER TABLE {db}.decisions ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS critical_throttle_rps Map(String, Float64);
