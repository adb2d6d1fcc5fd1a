"""The timezone every report cuts days, weeks and months in: the policy in force's, as budgets are enforced and the
scheduled report e-mails are cut. Reports cut by ``SPENDSTREAM_TIMEZONE`` instead disagreed with both: a CFO
e-mail said $0.0786 for a Berlin week, the ``report weekly`` command it suggests $0.0873.

``SPENDSTREAM_TIMEZONE`` is the timezone of the default policy (no budgets) that processors enforce before any policy
is in force, so reports cut by it only then. The API follows the policy topic (``api.otlp_policy``); a report read
straight from the ledger (no API owns it) reads the policy in force here.
"""

from __future__ import annotations

import sys

from spendstream.core.config import Settings
from spendstream.core.policy import Policy, PolicyError, load_policy

POLICY_READ_TIMEOUT_S = 5.0


def report_timezone(policy: Policy | None, settings: Settings) -> str:
    """The policy's timezone; with no policy in force (nor a ``SPENDSTREAM_POLICY`` file to seed one), the default
    policy's, ``SPENDSTREAM_TIMEZONE``."""
    return policy.timezone if policy is not None else settings.timezone


def policy_in_force_offline(settings: Settings, command: str = "report") -> Policy | None:
    """The policy in force for a command that reads the ledger itself. An embedded ledger no process holds has no
    broker running either (it is memory-only): its policy in force is the one ``spendstream dev`` recorded in the
    data directory, which the next ``dev`` restores. A ClickHouse server's deployment has a broker: its topic says.
    Before any policy, the ``SPENDSTREAM_POLICY`` file that seeds the topic; else None (the default policy)."""
    from spendstream.core.policy_log import last_policy_recorded

    if settings.ledger_dsn.startswith("chdb://"):
        recorded = last_policy_recorded(settings.data_dir)
        if recorded is not None:
            return recorded[2]
    else:
        from confluent_kafka import KafkaException

        from spendstream.core.policy_log import PolicyLogUnreadable, read_policy_log

        try:
            found = read_policy_log(
                settings.kafka_client_config(),
                settings.schema_registry_url,
                timeout=POLICY_READ_TIMEOUT_S,
                verifier=settings.record_verifier(),
            )
            if found.in_force is not None:
                return found.in_force.policy
        except (KafkaException, PolicyLogUnreadable) as exc:
            seeded = settings.policy or "SPENDSTREAM_TIMEZONE"
            print(
                f"spendstream {command}: cannot read the policy in force on {settings.kafka_bootstrap} ({exc}): "
                f"periods are cut in the timezone of {seeded}, which may not be the policy's; check "
                "SPENDSTREAM_KAFKA_BOOTSTRAP",
                file=sys.stderr,
            )
    if settings.policy is None:
        return None
    try:
        return load_policy(settings.policy)
    except (OSError, PolicyError):
        return None  # `policy validate` says what is wrong with it
