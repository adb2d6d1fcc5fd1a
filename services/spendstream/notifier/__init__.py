"""The notifier: alerts, decisions and scheduled reports delivered to the people who own the spend."""
