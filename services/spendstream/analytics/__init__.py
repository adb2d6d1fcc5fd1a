"""Ledger analytics shared by the CLI and the API: reports, chargeback, forecasts, ad-hoc SQL."""
