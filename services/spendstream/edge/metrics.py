"""The Emitter's metrics: its own counters (``Emitter.stats``), read at scrape time, never per event."""

from __future__ import annotations

from typing import TYPE_CHECKING

from spendstream.core.metrics import Family, Reading, register_collector

if TYPE_CHECKING:
    from spendstream.edge.emitter import Emitter


def _emitter_reading(emitter: Emitter) -> Reading:
    s = emitter.stats
    return {
        "spendstream_emitter_emitted": s.emitted,
        "spendstream_emitter_sent": s.sent,
        "spendstream_emitter_spooled": s.spooled,
        "spendstream_emitter_replayed": s.replayed,
        "spendstream_emitter_failed": s.failed,
        "spendstream_emitter_queued_events": s.queued,
        "spendstream_emitter_spool_bytes": s.spool_bytes,
        "spendstream_emitter_spool_events": s.spool_events,
    }


EMITTERS = register_collector(
    [
        Family("spendstream_emitter_emitted", "Usage events handed to Emitter.emit().", "counter"),
        Family("spendstream_emitter_sent", "Usage events acked by the broker (replayed ones included).", "counter"),
        Family(
            "spendstream_emitter_spooled", "Usage events written to the disk spool (broker unreachable).", "counter"
        ),
        Family("spendstream_emitter_replayed", "Spooled usage events acked by the broker after replay.", "counter"),
        Family(
            "spendstream_emitter_failed",
            "Usage events dropped: spool full or unwritable, unencodable, or rejected by the broker for good.",
            "counter",
        ),
        Family("spendstream_emitter_queued_events", "Usage events in memory: queue plus producer.", "gauge"),
        Family("spendstream_emitter_spool_bytes", "Size of the disk spool in bytes.", "gauge"),
        Family("spendstream_emitter_spool_events", "Usage events waiting in the disk spool.", "gauge"),
    ],
    _emitter_reading,
)
