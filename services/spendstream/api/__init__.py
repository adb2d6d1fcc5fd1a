"""API service: HTTP usage ingest for non-Python services, reports as JSON, the dashboard."""
