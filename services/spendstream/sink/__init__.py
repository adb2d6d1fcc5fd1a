"""Ledger sink service: usage (and later decisions and alerts) from Kafka into ClickHouse, exactly once."""
