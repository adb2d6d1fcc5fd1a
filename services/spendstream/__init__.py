"""spendstream: govern what an organisation spends on LLM APIs.

The public API (docs/architecture.md §9) is importable from here; heavy modules load on first use,
so ``import spendstream`` inside a service costs almost nothing.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "UsageEvent": "spendstream.core.events",
    "Decision": "spendstream.core.events",
    "Alert": "spendstream.core.events",
    "Action": "spendstream.core.events",
    "UsageStatus": "spendstream.core.events",
    "Settings": "spendstream.core.config",
    "Emitter": "spendstream.edge.emitter",
    "Enforcer": "spendstream.edge.enforcer",
    "Verdict": "spendstream.edge.verdict",
    "instrument": "spendstream.edge.instrument",
    "SpendBlocked": "spendstream.edge.instrument",
}

__all__ = [
    "Action",
    "Alert",
    "Decision",
    "Emitter",
    "Enforcer",
    "Settings",
    "SpendBlocked",
    "UsageEvent",
    "UsageStatus",
    "Verdict",
    "instrument",
]

if TYPE_CHECKING:
    from spendstream.core.config import Settings
    from spendstream.core.events import Action, Alert, Decision, UsageEvent, UsageStatus
    from spendstream.edge.emitter import Emitter
    from spendstream.edge.enforcer import Enforcer
    from spendstream.edge.instrument import SpendBlocked, instrument
    from spendstream.edge.verdict import Verdict


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'spendstream' has no attribute {name!r}")
    return getattr(import_module(module), name)
