-- Delivery state of every notification (notifier/), one row per notification and channel.
-- notification_id is the idempotency key (the same on every retry); the newest state wins through
-- ReplacingMergeTree(revision), revision = attempts * 10 + the rank of the status, so a state recorded
-- later in a notification's life always replaces an earlier one, whatever the clocks say. Rows with
-- status dead_letter are the dead letters: payload keeps the message, last_error why it was given up.
-- Scheduled reports are rows too (source_id report:...): what was sent survives a restart.
CREATE TABLE IF NOT EXISTS {db}.notifications
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
ENGINE = ReplacingMergeTree(revision)
ORDER BY notification_id;
