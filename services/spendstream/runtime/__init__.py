"""The embedded runtime: a real Kafka-protocol broker and topic provisioning on one machine."""
