-- = schemas/clickhouse/0008_usage_detail.sql: the columns on every shard, then on the Distributed table.
ALTER TABLE {db}.usage_ledger_local ON CLUSTER '{cluster}'
    ADD COLUMN IF NOT EXISTS reasoning_tokens Int64 DEFAULT 0 AFTER cache_hit,
    ADD COLUMN IF NOT EXISTS input_audio_tokens Int64 DEFAULT 0 AFTER reasoning_tokens,
    ADD COLUMN IF NOT EXISTS output_audio_tokens Int64 DEFAULT 0 AFTER input_audio_tokens,
    ADD COLUMN IF NOT EXISTS input_image_tokens Int64 DEFAULT 0 AFTER output_audio_tokens,
    ADD COLUMN IF NOT EXISTS output_image_tokens Int64 DEFAULT 0 AFTER input_image_tokens,
    ADD COLUMN IF NOT EXISTS cache_write_1h_tokens Int64 DEFAULT 0 AFTER output_image_tokens,
    ADD COLUMN IF NOT EXISTS web_search_requests Int64 DEFAULT 0 AFTER cache_write_1h_tokens,
    ADD COLUMN IF NOT EXISTS service_tier LowCardinality(String) DEFAULT '' AFTER web_search_requests;
ALTER TABLE {db}.usage_ledger ON CLUSTER '{cluster}'
    ADD COLUMN IF NOT EXISTS reasoning_tokens Int64 DEFAULT 0 AFTER cache_hit,
    ADD COLUMN IF NOT EXISTS input_audio_tokens Int64 DEFAULT 0 AFTER reasoning_tokens,
    ADD COLUMN IF NOT EXISTS output_audio_tokens Int64 DEFAULT 0 AFTER input_audio_tokens,
    ADD COLUMN IF NOT EXISTS input_image_tokens Int64 DEFAULT 0 AFTER output_audio_tokens,
    ADD COLUMN IF NOT EXISTS output_image_tokens Int64 DEFAULT 0 AFTER input_image_tokens,
    ADD COLUMN IF NOT EXISTS cache_write_1h_tokens Int64 DEFAULT 0 AFTER output_image_tokens,
    ADD COLUMN IF NOT EXISTS web_search_requests Int64 DEFAULT 0 AFTER cache_write_1h_tokens,
    ADD COLUMN IF NOT EXISTS service_tier LowCardinality(String) DEFAULT '' AFTER web_search_requests;
