"""What a scheme may use: :class:`SchemeContext` (the service's settings, an HTTP
client bound to its TLS and timeouts, its corner of the store, a logger, and a
narrow door to the service's other credentials) and :class:`CliIO` for the
flows a person runs.

A scheme never holds the credential manager: an on-behalf-of token made with
the service's own token asks for that one through ``ctx.credentials``, which
offers exactly get / current / rejected, with the manager's cache,
single-flight and persistence behind it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Protocol

import aiohttp
from multidict import CIMultiDictProxy

from authproxy.schemes.credential import Credential, CredentialError
from authproxy.secret import Secret, redact

if TYPE_CHECKING:
    from authproxy.service_config import ServiceConfig
    from authproxy.store.base import DocStore


class CredentialAccess(Protocol):
    """The service's credentials, as a scheme may use them (set by the manager)."""

    async def get(self, key: str | None = None) -> Credential:
        """The credential for ``key`` (None: the service's own); raises CredentialError."""

    def current(self, key: str | None = None) -> Credential | None:
        """The cached one, if any, without fetching."""

    def rejected(self, cred: Credential) -> None:
        """The upstream refused ``cred``: the next get() fetches anew."""


MASK_WINDOW = 4096  # how much of an upstream's error text is masked before it is cut to size


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    url: str

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            raise CredentialError(f"{self.url} answered {self.status} with a body that is not JSON") from None

    def text(self, limit: int = 300) -> str:
        return self.body[:limit].decode("utf-8", "replace").strip()


class SchemeContext:
    """What a scheme may use: the service's settings, an HTTP client bound to the
    service's TLS and timeouts, its corner of the store (state dir or Redis), and a logger."""

    def __init__(
        self,
        service: "ServiceConfig",
        http: aiohttp.ClientSession,
        store: "DocStore",
        log: logging.Logger | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.service = service
        self.http = http
        self.store = store
        self.log = log or logging.getLogger("authproxy.scheme")
        self.ssl_context = ssl_context
        #: The service's credentials (set by the credential manager when it takes the scheme).
        self.credentials: CredentialAccess | None = None

    def upstream_url(self, path: str) -> str:
        """A scheme path (``api_path``, ``login_path``...) is relative to the full upstream, base path included."""
        base = self.service.upstream.url
        return base + (path if path.startswith("/") else "/" + path)

    def known_secrets(self, *more: Secret | str | None) -> list[Secret | str | None]:
        return [*_config_secrets(self.service.auth), *more]

    async def request(
        self,
        method: str,
        url: str,
        *,
        what: str,
        data: Any = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        max_body: int = 1 << 20,
    ) -> Reply:
        """Send one credential request; any transport failure becomes a CredentialError
        whose message names the endpoint but nothing that was sent."""
        timeout = aiohttp.ClientTimeout(
            total=self.service.timeout.total, sock_connect=self.service.timeout.connect
        )
        try:
            async with self.http.request(
                method,
                url,
                data=data,
                json=json_body,
                headers=headers,
                allow_redirects=False,
                timeout=timeout,
                ssl=self.ssl_context if self.ssl_context is not None else True,
            ) as resp:
                body = await resp.content.read(max_body + 1)
                if len(body) > max_body:
                    raise CredentialError(f"{what}: {_safe_url(url)} answered with a body larger than {max_body} bytes")
                return Reply(resp.status, resp.headers, body, _safe_url(url))
        except CredentialError:
            raise
        except asyncio.TimeoutError:
            raise CredentialError(f"{what}: {_safe_url(url)} did not answer within {self.service.timeout.total:g}s") from None
        except aiohttp.ClientError as e:
            raise CredentialError(f"{what}: cannot reach {_safe_url(url)}: {_describe(e)}") from None

    def error_text(self, text: str, *more: Secret | str | None) -> str:
        """An upstream's message made safe to show: whatever it echoes of our secrets is masked."""
        return redact(text, self.known_secrets(*more))


def _safe_url(url: str) -> str:
    from authproxy.secret import mask_url

    return mask_url(url)


def _describe(e: BaseException) -> str:
    if isinstance(e, aiohttp.ClientConnectorError):
        return str(e.os_error.strerror or e.os_error) if e.os_error else "connection failed"
    if isinstance(e, aiohttp.ClientResponseError):
        return f"HTTP {e.status}"
    return type(e).__name__ + (f": {e}" if str(e) else "")


def _config_secrets(cfg: Any) -> list[Secret]:
    out: list[Secret] = []
    for value in getattr(cfg, "__dict__", {}).values():
        if isinstance(value, Secret):
            out.append(value)
        elif isinstance(value, (tuple, list)):
            out.extend(v for v in value if isinstance(v, Secret))
        elif isinstance(value, dict):
            out.extend(v for v in value.values() if isinstance(v, Secret))
    return out


class CliIO:
    """How a scheme's CLI flow talks to the person: print to stdout, ask on stdin.
    Tests replace both."""

    def __init__(self, out: Any = None, ask: Any = None) -> None:
        import sys

        self.out = out or (lambda text: print(text, flush=True))
        self.ask = ask or (lambda prompt: input(prompt))
        self.stderr = lambda text: print(text, file=sys.stderr, flush=True)

    def say(self, text: str) -> None:
        self.out(text)

    async def prompt(self, text: str) -> str:
        return await asyncio.to_thread(self.ask, text)
