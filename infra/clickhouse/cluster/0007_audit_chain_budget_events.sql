-- = schemas/clickhouse/0010_audit_chain_budget_events.sql: the chain columns on every shard, then on the
-- Distributed tables; budget_events and policy_versions as <table>_local + Distributed.
--
-- Each audited stream has one writer (the audit sink), which numbers its records with chain_seq as it
-- inserts them; the records of one stream are spread over the shards by their own sharding key. Chain
-- verification (`spendstream audit verify`) still sees one unbroken sequence: it reads the Distributed
-- table with ORDER BY chain_seq, every shard returns its part sorted, and the initiator merges those sorted
-- streams into the global chain_seq order before a single hash is checked. No shard sees, or needs, a
-- whole chain. The sink publishes a stream's head only after its insert returned, so its inserts must
-- reach the shards before they return (distributed_foreground_insert = 1, see README.md).
ALTER TABLE {db}.decisions_local ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS chain_seq UInt64 DEFAULT 0, ADD COLUMN IF NOT EXISTS prev_hash String DEFAULT '', ADD COLUMN IF NOT EXISTS record_hash String DEFAULT '';
ALTER TABLE {db}.decisions ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS chain_seq UInt64 DEFAULT 0, ADD COLUMN IF NOT EXISTS prev_hash String DEFAULT '', ADD COLUMN IF NOT EXISTS record_hash String DEFAULT '';
ALTER TABLE {db}.alerts_local ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS chain_seq UInt64 DEFAULT 0, ADD COLUMN IF NOT EXISTS prev_hash String DEFAULT '', ADD COLUMN IF NOT EXISTS record_hash String DEFAULT '';
ALTER TABLE {db}.alerts ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS chain_seq UInt64 DEFAULT 0, ADD COLUMN IF NOT EXISTS prev_hash String DEFAULT '', ADD COLUMN IF NOT EXISTS record_hash String DEFAULT '';

-- Sharded by the request id: every step of one budget request lands on one shard.
CREATE TABLE IF NOT EXISTS {db}.budget_events_local ON CLUSTER '{cluster}'
(
    id             String,
    kind           LowCardinality(String),
    scope          LowCardinality(String),
    period         LowCardinality(String),
    amount_nanos   Int64,
    starts_at      DateTime64(6, 'UTC'),
    expires_at     Nullable(DateTime64(6, 'UTC')),
    status         LowCardinality(String),
    requested_by   String,
    requested_at   DateTime64(6, 'UTC'),
    reason         String,
    step           LowCardinality(String),
    step_by        String,
    step_at        DateTime64(6, 'UTC'),
    step_reason    String,
    approver_level LowCardinality(String),
    chain_seq      UInt64,
    prev_hash      String,
    record_hash    String,
    ingested_at    DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/{db}/budget_events', '{replica}')
ORDER BY chain_seq;

CREATE TABLE IF NOT EXISTS {db}.budget_events ON CLUSTER '{cluster}' AS {db}.budget_events_local
ENGINE = Distributed('{cluster}', {db}, budget_events_local, cityHash64(id));

-- Sharded by the policy version: a redelivered copy of a version lands beside the first one.
CREATE TABLE IF NOT EXISTS {db}.policy_versions_local ON CLUSTER '{cluster}'
(
    name         String,
    version      String,
    document     String,
    published_at DateTime64(6, 'UTC'),
    published_by String,
    chain_seq    UInt64,
    prev_hash    String,
    record_hash  String,
    ingested_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/{db}/policy_versions', '{replica}')
ORDER BY chain_seq;

CREATE TABLE IF NOT EXISTS {db}.policy_versions ON CLUSTER '{cluster}' AS {db}.policy_versions_local
ENGINE = Distributed('{cluster}', {db}, policy_versions_local, cityHash64(version));
