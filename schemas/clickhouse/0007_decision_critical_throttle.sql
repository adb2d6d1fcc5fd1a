-- Decisions carry the critical features a shutoff throttles instead of stopping (feature -> requests/s),
-- so the audit trail shows why a critical feature kept running past an exhausted budget.
ALTER TABLE {db}.decisions ADD COLUMN IF NOT EXISTS critical_throttle_rps Map(String, Float64);
