-- The tamper-evident audit trail (core/audit_chain.py): every audited record carries its position in its
-- stream's hash chain, the previous record's hash and its own. Rows written before this migration have
-- chain_seq 0 and are outside the chain.
ALTER TABLE {db}.decisions ADD COLUMN IF NOT EXISTS chain_seq UInt64 DEFAULT 0, ADD COLUMN IF NOT EXISTS prev_hash String DEFAULT '', ADD COLUMN IF NOT EXISTS record_hash String DEFAULT '';
ALTER TABLE {db}.alerts ADD COLUMN IF NOT EXISTS chain_seq UInt64 DEFAULT 0, ADD COLUMN IF NOT EXISTS prev_hash String DEFAULT '', ADD COLUMN IF NOT EXISTS record_hash String DEFAULT '';

-- Every step of a budget request (requested, approved, denied, expired) from spendstream.budget_adjustments:
-- who, when and why. Plain MergeTree: an audit entry is never replaced.
CREATE TABLE IF NOT EXISTS {db}.budget_events
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
ENGINE = MergeTree
ORDER BY chain_seq;

-- Every policy version published on spendstream.policy, valid or not, in the order it was published.
CREATE TABLE IF NOT EXISTS {db}.policy_versions
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
ENGINE = MergeTree
ORDER BY chain_seq;
