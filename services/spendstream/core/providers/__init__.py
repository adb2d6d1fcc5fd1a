"""One dialect per provider kind, and the registry pricing, the gateway and ``instrument()`` read.

Adding a provider is one module: subclass :class:`Dialect` and ``register`` an instance (see ``openai.py``).
"""

# The built-in dialects register themselves on import, in this order (OpenAI's first: the fallback).
from spendstream.core.providers import openai  # isort: skip
from spendstream.core.providers import anthropic, google  # isort: skip
from spendstream.core.providers.dialect import (
    NO_DETAIL,
    Dialect,
    Endpoint,
    NormalisedUsage,
    SdkResource,
    StreamState,
    UsageDetail,
)
from spendstream.core.providers.registry import dialect_for, dialect_for_sdk, dialect_of_kind, dialects, register

__all__ = [
    "NO_DETAIL",
    "Dialect",
    "Endpoint",
    "NormalisedUsage",
    "SdkResource",
    "StreamState",
    "UsageDetail",
    "anthropic",
    "dialect_for",
    "dialect_for_sdk",
    "dialect_of_kind",
    "dialects",
    "google",
    "openai",
    "register",
]
