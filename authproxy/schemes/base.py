"""The interface every authentication scheme implements.

A scheme is pure protocol code, in the spirit of httpx's ``Auth.auth_flow``: it
says how to obtain a credential, how to apply it to an outgoing request, how to
recognise the upstream rejecting it, and how to revoke it. Everything about
time and concurrency — caching, expiry, single-flight, backoff, persistence,
shutdown — belongs to :class:`authproxy.credentials.ServiceCredentials`, so a
scheme reads top to bottom as the API's documentation would.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from authproxy.secret import Secret, redact

if TYPE_CHECKING:
    from authproxy.service_config import ServiceConfig
    from authproxy.store.base import DocStore


# --------------------------------------------------------------------------- credentials


@dataclass(eq=False)
class Credential:
    """One credential as a scheme obtained it. ``repr()`` never shows the secret."""

    token: Secret
    expires_at: float | None = None  # wall-clock seconds; None = good until the upstream rejects it
    created: bool = False  # authproxy made it upstream, so authproxy revokes it
    key: str | None = None  # None for the service's own credential; a user id for OBO
    obtained_at: float = field(default_factory=time.time)
    meta: dict[str, Any] = field(default_factory=dict)  # non-secret facts a scheme wants kept

    def lifetime(self) -> float | None:
        return None if self.expires_at is None else self.expires_at - self.obtained_at

    def to_record(self) -> dict[str, Any]:
        return {
            "token": self.token.reveal(),
            "expires_at": self.expires_at,
            "created": self.created,
            "key": self.key,
            "obtained_at": self.obtained_at,
            "meta": self.meta,
        }

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> "Credential":
        return cls(
            token=Secret(str(rec["token"])),
            expires_at=None if rec.get("expires_at") is None else float(rec["expires_at"]),
            created=bool(rec.get("created", False)),
            key=rec.get("key"),
            obtained_at=float(rec.get("obtained_at") or time.time()),
            meta=dict(rec.get("meta") or {}),
        )


# --------------------------------------------------------------------------- failures


class CredentialError(Exception):
    """A credential could not be had. ``refused`` means the upstream said no (bad
    password, invalid_client): retrying soon will not help, so back off harder."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.refused = refused


class LoginRequired(CredentialError):
    """Only a person can fix this (``authproxy login SERVICE``)."""


class UpstreamReply(Exception):
    """The credential endpoint's own reply should go back to the client as is (e.g. an
    on-behalf-of user id the upstream rejects): the client asked for something wrong."""

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        super().__init__(f"upstream replied {status}")
        self.status = status
        self.headers = dict(headers)
        self.body = body


class Forbidden(Exception):
    """The client may not ask for this (``obo_forbidden``); nothing goes upstream."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------- the outgoing request


@dataclass(slots=True)
class Outgoing:
    """The parts of a request a scheme may change before it is forwarded."""

    headers: CIMultiDict[str]
    query: str  # the raw query string, without '?'
    body: bytes | None  # the kept body, or None when it streams (or there is none)
    method: str = "GET"
    path: str = "/"  # the raw upstream path


def set_query_param(query: str, name: str, value: str) -> str:
    """Replace every ``name=`` parameter of a raw query string by one with ``value``,
    leaving every other byte as the client sent it."""
    from urllib.parse import quote, unquote_plus

    encoded = f"{quote(name, safe='')}={quote(value, safe='')}"
    if not query:
        return encoded
    kept = [p for p in query.split("&") if unquote_plus(p.partition("=")[0]) != name]
    kept.append(encoded)
    return "&".join(p for p in kept if p)


# --------------------------------------------------------------------------- talking to credential endpoints


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
        self._secrets: list[Secret] = []

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


# --------------------------------------------------------------------------- the scheme interface


class Scheme:
    """Base class: the defaults suit a scheme that is rejected with 401 and revokes nothing."""

    #: The scheme's settings (a frozen dataclass, read by authproxy.settings' loader).
    Config: ClassVar[type]
    #: Query parameters this scheme puts secrets in: masked in logged URLs.
    secret_params: ClassVar[tuple[str, ...]] = ()
    #: Whether a credential replaced before it expired should be revoked at once.
    revoke_replaced: ClassVar[bool] = False
    #: Whether credentials authproxy creates are recorded in the state dir (reused after a restart).
    persist_created: ClassVar[bool] = False

    def __init__(self, ctx: SchemeContext) -> None:
        self.ctx = ctx
        self.config = ctx.service.auth

    # ---- what a scheme must say
    async def obtain(self, key: str | None) -> Credential:
        raise NotImplementedError

    def apply(self, out: Outgoing, cred: Credential) -> None:
        raise NotImplementedError

    # ---- what a scheme may refine
    @property
    def refresh_margin(self) -> float:
        return float(getattr(self.config, "refresh_margin", 0) or 0)

    @property
    def revoke_on_exit(self) -> bool:
        return False

    def identity(self) -> str:
        """What a persisted credential must have been made for to be reused (e.g. the
        upstream and the user name): a config change never reuses another account's token."""
        return self.ctx.service.upstream.url

    def credential_key(self, headers: Mapping[str, str]) -> str | None:
        """Which credential a request needs (None: the service's own). May raise Forbidden."""
        return None

    def strip_headers(self) -> tuple[str, ...]:
        """Request headers the scheme consumes and never forwards."""
        return ()

    def rejection_needs_body(self, status: int, headers: Mapping[str, str]) -> bool:
        return False

    def is_rejection(self, status: int, headers: Mapping[str, str], body: bytes | None) -> bool:
        return status == 401

    def local_reply(self, out: Outgoing) -> UpstreamReply | None:
        """Answer a request here instead of forwarding it — for a request that would
        harm every client sharing the credential (a client's own logoff of it).
        Only called when a scheme overrides it; ``out`` has no credential yet."""
        return None

    def on_rejected(self, cred: Credential) -> None:
        """The upstream rejected ``cred`` and the manager dropped it, so the next
        ``obtain()`` replaces it. A scheme may note which one (to check it is really
        dead, or to know that a configured credential is)."""

    async def revoke(self, cred: Credential) -> None:
        """Invalidate a credential authproxy created (log off, expire, RFC 7009)."""

    async def logout(self) -> int | None:
        """Forget and revoke whatever else the scheme keeps (e.g. a refresh token);
        returns how many credentials that revoked upstream."""

    def exported(self, cred: Credential) -> dict[str, dict[str, str]]:
        """Every part injected into requests, for ``authproxy token --json``."""
        out = Outgoing(headers=CIMultiDict(), query="", body=None)
        self.apply(out, cred)
        from urllib.parse import parse_qsl

        return {"headers": dict(out.headers), "query": dict(parse_qsl(out.query, keep_blank_values=True))}

    def printable(self, cred: Credential) -> str:
        """What ``authproxy token SERVICE`` prints."""
        return cred.token.reveal()

    async def close(self) -> None:
        """Release what the scheme holds open (listeners etc.)."""

    async def prepare(self) -> None:
        """Before the first credential is asked for: read what the scheme keeps in the
        store (e.g. a rotated app token), which :meth:`apply` may need at once."""

    async def reload(self) -> None:
        """SIGHUP with this service's config unchanged: re-read what the CLI may have
        changed in the store (e.g. a rotated app token). Credentials stay."""

    def bind(self, credentials: Any) -> None:
        """Called once by the service's credential manager (``ServiceCredentials``). A
        scheme whose credentials depend on each other (an on-behalf-of token is made
        with the service's own token) keeps it to ask for that one through the
        manager's cache, single-flight and persistence instead of fetching its own."""

    # ---- hooks for the CLI and the running proxy (only some schemes have them)
    async def login(self, cli: "CliIO") -> None:
        """``authproxy login SERVICE``: an interactive flow run by a person."""
        raise NotSupported(f"scheme {self.ctx.service.scheme} has no login step")

    async def rotate(self, cli: "CliIO", seconds: int | None, expire_old: bool) -> None:
        """``authproxy rotate SERVICE``."""
        raise NotSupported(f"scheme {self.ctx.service.scheme} has nothing to rotate")

    async def callback(self, params: Mapping[str, str]) -> tuple[int, str]:
        """``GET /-/callback/SERVICE`` on the running proxy: (status, HTML text)."""
        return 404, "<p>This service has no login callback.</p>"


class NotSupported(Exception):
    """A CLI command that does not apply to the service's scheme (exit 2)."""


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
