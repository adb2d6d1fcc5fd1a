-- UsageEvent version 3: what a call used beyond the four token counts, so the ledger can say what was billed
-- (reasoning, audio and image tokens, 1-hour cache writes, web searches) and at which service tier (batch,
-- flex, priority). Rows written before this migration read 0 and ''; so do events from older edges.
ALTER TABLE {db}.usage_ledger
    ADD COLUMN IF NOT EXISTS reasoning_tokens Int64 DEFAULT 0 AFTER cache_hit,
    ADD COLUMN IF NOT EXISTS input_audio_tokens Int64 DEFAULT 0 AFTER reasoning_tokens,
    ADD COLUMN IF NOT EXISTS output_audio_tokens Int64 DEFAULT 0 AFTER input_audio_tokens,
    ADD COLUMN IF NOT EXISTS input_image_tokens Int64 DEFAULT 0 AFTER output_audio_tokens,
    ADD COLUMN IF NOT EXISTS output_image_tokens Int64 DEFAULT 0 AFTER input_image_tokens,
    ADD COLUMN IF NOT EXISTS cache_write_1h_tokens Int64 DEFAULT 0 AFTER output_image_tokens,
    ADD COLUMN IF NOT EXISTS web_search_requests Int64 DEFAULT 0 AFTER cache_write_1h_tokens,
    ADD COLUMN IF NOT EXISTS service_tier LowCardinality(String) DEFAULT '' AFTER web_search_requests;
