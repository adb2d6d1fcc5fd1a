-- schemas/clickhouse/0015_notifications.sql for a cluster: sharded by notification_id, so every state of one
-- notification lands on one shard and ReplacingMergeTree(revision) with FINAL stays exact.
CREATE TABLE IF NOT EXISTS {db}.notifications_local ON CLUSTER '{cluster}'
(
    notification_id String,
    source_id       String,
    kind            LowCardinality(String),
    scope           LowCardinality(String),
    channel         LowCardinality(String),
    channel_kind    LowCardinality(String),
    audience        Array(String),
    title           String,
    payload         String,
    status          Enum8('pending' = 1, 'failed' = 2, 'sent' = 3, 'dead_letter' = 4),
    attempts        UInt32,
    last_error      String,
    created_at      DateTime64(3, 'UTC'),
    updated_at      DateTime64(3, 'UTC'),
    sent_at         Nullable(DateTime64(3, 'UTC')),
    next_attempt_at Nullable(DateTime64(3, 'UTC')),
    revision        UInt64
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{db}/notifications', '{replica}', revision)
ORDER BY notification_id;

CREATE TABLE IF NOT EXISTS {db}.notifications ON CLUSTER '{cluster}' AS {db}.notifications_local
ENGINE = Distributed('{cluster}', {db}, notifications_local, cityHash64(notification_id));
