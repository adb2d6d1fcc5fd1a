"""Registered dialects, found by provider name, by kind, or by the SDK module of a client."""

from __future__ import annotations

from typing import TypeVar

from spendstream.core.providers.dialect import Dialect

D = TypeVar("D", bound=Dialect)

_BY_KIND: dict[str, Dialect] = {}
_BY_PROVIDER: dict[str, Dialect] = {}
_BY_SDK: dict[str, Dialect] = {}


def register(dialect: D) -> D:
    """Make ``dialect`` the one for its kind, its provider names and its SDK module; returns it."""
    _BY_KIND[dialect.kind] = dialect
    for name in dialect.providers:
        _BY_PROVIDER[name.lower()] = dialect
    if dialect.sdk_module:
        _BY_SDK[dialect.sdk_module] = dialect
    return dialect


def dialect_of_kind(kind: str) -> Dialect:
    """The dialect of a provider kind (the gateway's upstream kinds); an unknown kind speaks OpenAI's."""
    return _BY_KIND.get(kind) or _BY_KIND["openai"]


def dialect_for(provider: str) -> Dialect:
    """The dialect that reads ``provider``'s usage blocks; providers not registered are OpenAI-compatible."""
    return _BY_PROVIDER.get(provider.lower()) or _BY_KIND["openai"]


def dialect_for_sdk(module: str) -> Dialect | None:
    """The dialect of an SDK client whose top-level module is ``module``, or None."""
    return _BY_SDK.get(module)


def provider_names() -> frozenset[str]:
    """The provider names of every registered dialect, lower-cased (``openai``, ``anthropic``, ``google-vertex``)."""
    return frozenset(_BY_PROVIDER)


def dialects() -> tuple[Dialect, ...]:
    """Every registered dialect, in registration order."""
    return tuple(_BY_KIND.values())
