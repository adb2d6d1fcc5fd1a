"""Range-checked argparse types for numeric options.

A number out of range is refused by argparse with the command's usage, before anything starts: a negative
``--batch-size`` must not reach a processor. An option that overrides a setting takes that setting's range
(``setting_number``), so ``--batch-size`` and ``SPENDSTREAM_PROCESSOR_BATCH_SIZE`` accept the same values.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable

_WHOLE = re.compile(r"[+-]?\d+")


def whole_number(low: int, high: int | None = None, setting: str | None = None) -> Callable[[str], int]:
    """An argparse type for a whole number from ``low`` to ``high`` (no upper bound when None)."""
    span = f"from {low} to {high}" if high is not None else f"of {low} or more"
    source = f" (the range of {setting})" if setting else ""

    def parse(text: str) -> int:
        value = int(text) if _WHOLE.fullmatch(text.strip()) else None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected a whole number {span}{source}, got {text!r}")
        return value

    return parse


def seconds(low: float, high: float) -> Callable[[str], float]:
    """An argparse type for a number of seconds from ``low`` to ``high`` (``nan`` and ``inf`` refused)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not low <= value <= high:  # also false for nan
            raise argparse.ArgumentTypeError(f"expected seconds from {low:g} to {high:g}, got {text!r}")
        return value

    return parse


def setting_number(name: str) -> Callable[[str], int]:
    """An argparse type for an option that overrides the whole-number setting ``name``, with that setting's range."""
    from spendstream.core.config import Settings

    field = Settings.model_fields[name]
    low, high = None, None
    for bound in field.metadata:  # pydantic's Field(ge=..., le=...) constraints
        if getattr(bound, "ge", None) is not None:
            low = int(bound.ge)
        elif getattr(bound, "gt", None) is not None:
            low = int(bound.gt) + 1
        elif getattr(bound, "le", None) is not None:
            high = int(bound.le)
        elif getattr(bound, "lt", None) is not None:
            high = int(bound.lt) - 1
    if low is None:
        raise ValueError(f"setting {name} has no lower bound to check an option against")
    return whole_number(low, high, f"SPENDSTREAM_{name.upper()}")
