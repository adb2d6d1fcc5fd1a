"""Processor service (faust-streaming): spend windows, budgets, thresholds, spikes, decisions."""
