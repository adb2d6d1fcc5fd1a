"""Gateway settings: a YAML (or JSON) file named by ``SPENDSTREAM_GATEWAY_CONFIG`` or ``--config``.

Shared settings (broker, listen address, spool, policy) come from ``Settings``; this file holds what only
the gateway needs: upstreams per provider, virtual keys, body limits, enforcement mode.

Example::

    keys_file: keys.yaml
    max_body_bytes: 4194304
    providers:
      openai:
        kind: openai
        upstreams:
          - {base_url: "https://api.openai.com", api_key_env: OPENAI_API_KEY}
          - {base_url: "https://openai-proxy.internal", api_key_env: OPENAI_BACKUP_KEY}
      anthropic:
        kind: anthropic
        upstreams: [{base_url: "https://api.anthropic.com", api_key_env: ANTHROPIC_API_KEY}]
      local:
        kind: openai
        upstreams: [{base_url: "http://127.0.0.1:11434"}]
    model_routes: {"llama": local}
    hierarchy: {"team:web": "division:engineering", "division:engineering": "org:acme"}
    pricing:
      unknown_model: default_price
      overrides:
        - {provider: local, model: llama-3.2-1b, input_per_mtok: "0.02", output_per_mtok: "0.02"}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from spendstream.core.config import ConfigError
from spendstream.core.policy import Pricing
from spendstream.gateway.keys import VirtualKey
from spendstream.gateway.response_cache import CacheConfig

CONFIG_ENV = "SPENDSTREAM_GATEWAY_CONFIG"


class _Model(BaseModel):
    # Errors name the field and never repeat its value: an upstream URL may carry a password.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)


class UpstreamConfig(_Model):
    """One server of a provider; the request path (``/v1/...``) is appended to ``base_url``."""

    base_url: str
    api_key_env: str | None = Field(None, description="Environment variable holding the provider API key.")
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(120.0, gt=0, description="Longest silence while waiting for bytes.")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if "@" in parts.netloc:  # checked first, so that no message below repeats the password
            raise ValueError(
                "must not contain credentials (user:password@): they would not be sent as the provider expects, and "
                "the URL is recorded in usage events and logs; give the API key with api_key_env"
            )
        # parts.port raises ValueError itself for a port that is not a number or out of range.
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError(f"must be http(s)://host[:port][/path prefix], got {value!r}")
        if parts.port == 0:
            raise ValueError(f"must be http(s)://host[:port][/path prefix], got {value!r}")
        return value

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class ProviderConfig(_Model):
    """A provider and its upstreams, tried in order: the next one on 5xx, timeouts and connection errors."""

    kind: Literal["openai", "anthropic"] = "openai"
    upstreams: list[UpstreamConfig] = Field(min_length=1)


def _default_providers() -> dict[str, ProviderConfig]:
    return {
        "openai": ProviderConfig(
            kind="openai", upstreams=[UpstreamConfig(base_url="https://api.openai.com", api_key_env="OPENAI_API_KEY")]
        ),
        "anthropic": ProviderConfig(
            kind="anthropic",
            upstreams=[UpstreamConfig(base_url="https://api.anthropic.com", api_key_env="ANTHROPIC_API_KEY")],
        ),
    }


class GatewayConfig(_Model):
    keys_file: Path | None = Field(None, description="YAML/JSON list of virtual keys (sha256 hashes).")
    keys: list[VirtualKey] = Field(default_factory=list, description="Virtual keys given inline.")
    providers: dict[str, ProviderConfig] = Field(default_factory=_default_providers)
    openai_provider: str = Field("openai", description="Provider of the OpenAI-compatible endpoints.")
    anthropic_provider: str = Field("anthropic", description="Provider of /v1/messages.")
    model_routes: dict[str, str] = Field(
        default_factory=dict, description="Model name prefix -> provider, for OpenAI-compatible endpoints."
    )
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Larger request bodies are refused (413).")
    header_timeout_s: float = Field(
        20.0,
        gt=0,
        description="A connection must complete its request head within this many seconds of opening or of its "
        "previous response, else it is closed (slow-header clients; idle keep-alive connections too).",
    )
    body_timeout_s: float = Field(60.0, gt=0, description="Longest wait for the rest of a request body (408).")
    shutdown_timeout_s: float = Field(
        10.0,
        gt=0,
        le=600,
        description="On SIGTERM, how long requests in flight (streams too) may take to finish before they are cut "
        "(an SSE error event, metered with what was streamed); the Emitter's flush follows. Give the service "
        "manager this plus 20 s before it kills the gateway.",
    )
    fail_closed: bool = Field(False, description="Refuse requests (503) while the enforcement view is stale.")
    max_staleness_s: float = Field(30.0, gt=0)
    anthropic_version: str = Field("2023-06-01", description="Sent when the client did not send one.")
    hierarchy: dict[str, str] = Field(
        default_factory=dict,
        description="Scope -> parent scope, so a team is held to its division's decisions "
        "(with SPENDSTREAM_POLICY set, the policy's divisions and projects are used instead).",
    )
    pricing: Pricing = Field(
        default_factory=Pricing,
        description="Price overrides on top of genai-prices (with SPENDSTREAM_POLICY set, the policy's are used).",
    )
    cache: CacheConfig = Field(default_factory=CacheConfig, description="Response cache (opt-in per scope).")

    @model_validator(mode="after")
    def _providers_exist(self) -> GatewayConfig:
        for role, name in [("openai_provider", self.openai_provider), ("anthropic_provider", self.anthropic_provider)]:
            if name not in self.providers:
                raise ValueError(f"{role} {name!r} is not one of providers: {sorted(self.providers)}")
        for prefix, name in self.model_routes.items():
            if name not in self.providers:
                raise ValueError(f"model_routes[{prefix!r}] -> {name!r} is not one of providers")
        return self

    def provider_for(self, model: str, anthropic_endpoint: bool) -> str:
        if anthropic_endpoint:
            return self.anthropic_provider
        for prefix, name in self.model_routes.items():
            if model.startswith(prefix):
                return name
        return self.openai_provider


def load_gateway_config(path: Path | str | None = None) -> GatewayConfig:
    """Read the file given (else ``$SPENDSTREAM_GATEWAY_CONFIG``, else defaults); errors name the field."""
    path = path or os.environ.get(CONFIG_ENV)
    if not path:
        return GatewayConfig()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"{CONFIG_ENV}: cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML/JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the gateway configuration must be a mapping")
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        problems = [f"{'.'.join(map(str, e['loc'])) or '(config)'}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"{path}: invalid gateway configuration:\n  " + "\n  ".join(problems)) from None
    if config.keys_file is not None and not config.keys_file.is_absolute():
        config.keys_file = path.parent / config.keys_file
    return config
