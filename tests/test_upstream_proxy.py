"""The gateway behind an egress proxy: a real proxy process (pproxy) between the upstream client and the stub
upstream, over TLS (CONNECT tunnel, a certificate of a test CA) and plain HTTP (absolute-form), NO_PROXY."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from aiohttp import web

from spendstream.core.config import ConfigError, Settings
from spendstream.gateway.app import Gateway, GatewayThread
from spendstream.gateway.config import GatewayConfig, ProviderConfig, UpstreamConfig
from spendstream.gateway.keys import VirtualKey, hash_key
from spendstream.gateway.stub_upstream import StubUpstream
from spendstream.gateway.upstream_client import UpstreamPool
from spendstream.runtime.embedded_broker import EmbeddedBroker

USER, PASSWORD = "egress", "s3cret!pw"  # the password is percent-encoded in the proxy URL ("!" as %21)
PROXY_CREDENTIALS = f"{USER}:s3cret%21pw"
CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"four words of prompt"}]}'
PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "https_proxy", "http_proxy", "no_proxy", "ALL_PROXY")


class TlsStubUpstream(StubUpstream):
    """The stub upstream served over TLS with a certificate for 127.0.0.1 and localhost."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__()
        self.context = context

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    async def start_async(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


@dataclass
class ProxyProcess:
    port: int
    log: Path

    def url(self, credentials: str = PROXY_CREDENTIALS) -> str:
        return f"http://{credentials}@127.0.0.1:{self.port}"

    def targets(self) -> str:
        """What the proxy printed about the connections it relayed ("http 127.0.0.1:… -> host:port")."""
        return self.log.read_text()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# pproxy switches to uvloop when it is installed (the gateway's loop) and then asks for a loop the way uvloop no
# longer allows; on asyncio's own loop it runs as documented.
PPROXY_WITHOUT_UVLOOP = "import sys; sys.modules['uvloop'] = None; from pproxy.server import main; sys.exit(main())"
ARGS = ("-v", "--auth", "0")  # print each relayed connection; check the credentials on every request


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[ProxyProcess]:
    """pproxy as an authenticating HTTP proxy (CONNECT and absolute-form), credentials checked on every request."""
    port, log = free_port(), tmp_path / "proxy.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", PPROXY_WITHOUT_UVLOOP, "-l", f"http://127.0.0.1:{port}#{USER}:{PASSWORD}", *ARGS],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"the proxy did not start: {log.read_text()}") from None
                time.sleep(0.05)
        yield ProxyProcess(port, log)
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No proxy variable of the machine leaks into a test; each test sets its own."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def tls_upstream(tmp_path: Path, proxy_env: pytest.MonkeyPatch) -> Iterator[TlsStubUpstream]:
    """A TLS stub upstream whose CA the client trusts (through SSL_CERT_FILE, as a deployment would)."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    proxy_env.setenv("SSL_CERT_FILE", str(ca_file))
    with TlsStubUpstream(server_context) as upstream:
        yield upstream


async def chat_and_stream(pool: UpstreamPool) -> tuple[int, bytes]:
    """A JSON answer then a streamed one on the pool; (status of the first, the streamed bytes)."""
    headers = {"Content-Type": "application/json"}
    async with await pool.request("POST", "/v1/chat/completions", CHAT, headers) as response:
        status = response.status
        assert b'"usage"' in await response.read()
    stream = CHAT[:-1] + b',"stream":true}'
    async with await pool.request("POST", "/v1/chat/completions", stream, headers) as response:
        text = b"".join([piece async for piece in response.iter_chunks()])
    return status, text


def test_an_https_upstream_is_reached_through_a_connect_tunnel(
    tls_upstream: TlsStubUpstream, proxy: ProxyProcess, proxy_env: pytest.MonkeyPatch
) -> None:
    proxy_env.setenv("https_proxy", proxy.url())  # lower-case wins over the (dead) upper-case one
    proxy_env.setenv("HTTPS_PROXY", f"http://127.0.0.1:{free_port()}")

    async def main() -> None:
        pool = UpstreamPool(tls_upstream.url, connect_timeout_s=5, read_timeout_s=5)
        status, text = await chat_and_stream(pool)
        assert status == 200 and text.rstrip().endswith(b"data: [DONE]")
        assert len(pool._open) == 1  # both requests on one tunnel, kept alive
        pool.close()

    asyncio.run(main())
    assert f"-> 127.0.0.1:{tls_upstream.port}" in proxy.targets()
    assert tls_upstream.requests == 2
    assert "proxy-authorization" not in {name.lower() for name in tls_upstream.last_headers}


def test_an_http_upstream_is_reached_through_the_proxy_by_absolute_form(
    proxy: ProxyProcess, proxy_env: pytest.MonkeyPatch
) -> None:
    proxy_env.setenv("HTTP_PROXY", proxy.url())

    async def main(url: str) -> None:
        pool = UpstreamPool(url, connect_timeout_s=5, read_timeout_s=5)
        status, text = await chat_and_stream(pool)
        assert status == 200 and text.rstrip().endswith(b"data: [DONE]")
        pool.close()

    with StubUpstream() as upstream:
        asyncio.run(main(upstream.url))
        assert upstream.requests == 2
    assert f"-> 127.0.0.1:{upstream.port}" in proxy.targets()


def test_wrong_proxy_credentials_fail_and_are_never_repeated(
    tls_upstream: TlsStubUpstream, proxy: ProxyProcess, proxy_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    proxy_env.setenv("HTTPS_PROXY", proxy.url(f"{USER}:not-{PASSWORD}"))
    proxy_env.setenv("HTTP_PROXY", proxy.url(f"{USER}:not-{PASSWORD}"))

    async def main(http_url: str) -> list[str]:
        said = []
        for url in (tls_upstream.url, http_url):  # a CONNECT refused, an absolute-form request refused
            pool = UpstreamPool(url, connect_timeout_s=5, read_timeout_s=5)
            with pytest.raises(ConnectionError, match="407") as refused:
                await pool.request("POST", "/v1/chat/completions", CHAT, {})
            said += [str(refused.value), repr(pool.proxy)]
            pool.close()
        return said

    with StubUpstream() as upstream:
        said = " ".join(asyncio.run(main(upstream.url)))
        assert upstream.requests == 0
    assert tls_upstream.requests == 0
    assert said.count(f"the proxy 127.0.0.1:{proxy.port} refused") == 2
    for text in (said, caplog.text):
        assert PASSWORD not in text and "not-s3cret" not in text


def test_no_proxy_hosts_are_called_directly(proxy: ProxyProcess, proxy_env: pytest.MonkeyPatch) -> None:
    proxy_env.setenv("HTTP_PROXY", proxy.url())
    proxy_env.setenv("no_proxy", "example.com, LOCALHOST")

    async def main(port: int) -> None:
        for host in ("localhost", "127.0.0.1"):
            pool = UpstreamPool(f"http://{host}:{port}", connect_timeout_s=5, read_timeout_s=5)
            status, _ = await chat_and_stream(pool)
            assert status == 200
            pool.close()

    with StubUpstream() as upstream:
        asyncio.run(main(upstream.port))
        assert upstream.requests == 4
    relayed = proxy.targets()
    assert f"-> 127.0.0.1:{upstream.port}" in relayed  # not exempt: through the proxy
    assert f"-> localhost:{upstream.port}" not in relayed  # exempt by NO_PROXY: direct


@pytest.mark.parametrize("url", ["socks5://egress:pw-in-url@127.0.0.1:1080", "https://egress:pw-in-url@proxy:3128"])
def test_an_unsupported_proxy_url_is_refused_naming_the_variable(proxy_env: pytest.MonkeyPatch, url: str) -> None:
    proxy_env.setenv("HTTPS_PROXY", url)
    with pytest.raises(ConfigError, match=r"HTTPS_PROXY \(or https_proxy\) must be an http://") as refused:
        UpstreamPool("https://api.openai.com", connect_timeout_s=5, read_timeout_s=5)
    assert "pw-in-url" not in str(refused.value)


def test_the_gateway_refuses_to_start_with_an_unsupported_proxy_url(
    broker: EmbeddedBroker, proxy_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "providers:\n  openai: {upstreams: [{base_url: 'https://api.openai.com'}]}\n"
        "  anthropic: {kind: anthropic, upstreams: [{base_url: 'https://api.anthropic.com'}]}\n"
    )
    proxy_env.setenv("https_proxy", "socks5://egress:pw-in-url@127.0.0.1:1080")
    proxy_env.setenv("SPENDSTREAM_KAFKA_BOOTSTRAP", broker.bootstrap)
    proxy_env.setenv("SPENDSTREAM_DATA_DIR", str(tmp_path / "data"))
    started = subprocess.run(
        [sys.executable, "-m", "spendstream.cli", "gateway", "--config", str(config), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 2, started.stderr
    assert (
        "HTTPS_PROXY (or https_proxy) must be an http://host[:port] proxy URL (got scheme 'socks5')" in started.stderr
    )
    assert "pw-in-url" not in started.stdout + started.stderr


def test_the_gateway_answers_through_the_proxy(
    settings: Settings,
    tls_upstream: TlsStubUpstream,
    proxy: ProxyProcess,
    proxy_env: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A client calls the gateway, the gateway reaches a TLS upstream only through the proxy."""
    proxy_env.setenv("HTTPS_PROXY", proxy.url())
    key = "sk-ss-test-proxy"
    config = GatewayConfig(
        keys=[VirtualKey(sha256=hash_key(key), name="proxy", team="platform")],
        providers={
            kind: ProviderConfig(kind=kind, upstreams=[UpstreamConfig(base_url=tls_upstream.url)])
            for kind in ("openai", "anthropic")
        },
    )
    with GatewayThread(Gateway(config, settings)) as gateway:
        request = urllib.request.Request(
            f"{gateway.url}/v1/chat/completions",
            data=CHAT,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
            assert json.loads(response.read())["usage"]["completion_tokens"] > 0
    assert f"-> 127.0.0.1:{tls_upstream.port}" in proxy.targets()
    out, err = capfd.readouterr()
    assert PASSWORD not in out + err and "s3cret%21pw" not in out + err
