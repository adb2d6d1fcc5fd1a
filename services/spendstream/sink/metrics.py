"""The ledger sink's metrics: its own counters (``LedgerSink.stats``), read at scrape time, never per record."""

from __future__ import annotations

from typing import TYPE_CHECKING

from spendstream.core.metrics import Family, Reading, register_collector

if TYPE_CHECKING:
    from spendstream.sink.ledger_sink import LedgerSink


def _sink_reading(sink: LedgerSink) -> Reading:
    s = sink.stats
    return {
        "spendstream_sink_consumed": s.consumed,
        "spendstream_sink_inserted": s.inserted,
        "spendstream_sink_dead_lettered": {(reason,): n for reason, n in s.dead_lettered.items()},
        "spendstream_sink_batches": s.batches,
        "spendstream_sink_commits": s.commits,
        "spendstream_sink_insert_retries": s.insert_retries,
    }


SINKS = register_collector(
    [
        Family("spendstream_sink_consumed", "Usage events the ledger sink consumed from spendstream.usage.", "counter"),
        Family("spendstream_sink_inserted", "Usage events inserted into the ledger (usage_ledger).", "counter"),
        Family(
            "spendstream_sink_dead_lettered",
            "Usage events the ledger sink sent to spendstream.usage.dlq, by reason kind.",
            "counter",
            ("reason",),
        ),
        Family("spendstream_sink_batches", "Batches the ledger sink inserted and settled.", "counter"),
        Family("spendstream_sink_commits", "Offset commits after a batch landed in the ledger.", "counter"),
        Family("spendstream_sink_insert_retries", "Ledger inserts retried after a failure.", "counter"),
    ],
    _sink_reading,
)
