"""Forwarding one request to its service's upstream, with the credential applied.

The forwarder never knows how a credential was obtained: it asks the service's
credential manager for one, lets the scheme apply it, streams the request and
the response, and when the scheme recognises a rejection it drops the
credential and replays the request once (if its body was kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any, AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from authproxy.credentials import Unavailable
from authproxy.observe import log_event
from authproxy.proxy.errors import ProxyError
from authproxy.proxy.upstream import UpstreamResponse
from authproxy.schemes.base import Credential, Forbidden, Outgoing, Scheme, UpstreamReply
from authproxy.secret import SECRET_PARAMS

if TYPE_CHECKING:
    from authproxy.observe import Metrics
    from authproxy.runtime import ServiceRuntime

log = logging.getLogger("authproxy.proxy")

# RFC 9110 §7.6.1, plus the proxy-only headers of RFC 9110 §11.7.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)
# Request headers the proxy itself consumes or sets.
_REQUEST_DROP = HOP_BY_HOP | {
    "host",
    "content-length",
    "expect",
    "x-authproxy-key",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
}
COALESCE_MAX = 64 * 1024  # replies up to this size (with a Content-Length) are read whole, then sent in one write
ON_BEHALF_OF = "X-Authproxy-On-Behalf-Of"


_NO_NAMES: frozenset[str] = frozenset()
_NAMED_CACHE: dict[str, frozenset[str]] = {}


def _connection_named(headers: "CIMultiDict[str] | web.BaseRequest") -> frozenset[str]:
    """The header names a ``Connection`` header lists (hop-by-hop too). Peers send the
    same few values ("keep-alive", "close"), so parsed values are remembered."""
    values = headers.getall("Connection", ())  # type: ignore[union-attr]
    if not values:
        return _NO_NAMES
    joined = ",".join(values) if len(values) > 1 else values[0]
    names = _NAMED_CACHE.get(joined)
    if names is None:
        names = frozenset(t.strip().lower() for t in joined.split(",") if t.strip())
        if len(_NAMED_CACHE) < 256:
            _NAMED_CACHE[joined] = names
    return names


def _end_to_end(headers: Any, drop: frozenset[str]) -> CIMultiDict[str]:
    """A copy of ``headers`` without ``drop`` and the names ``Connection`` lists (both
    directions of the proxy use it)."""
    named = _connection_named(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        lk = k.lower()
        if lk in drop or lk in named:
            continue
        out.add(k, v)
    return out


def strip_params(query: str, names: frozenset[str], values: frozenset[str]) -> str:
    from urllib.parse import unquote_plus

    kept = []
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if unquote_plus(name).lower() in names or (value and unquote_plus(value) in values):
            continue
        kept.append(part)
    return "&".join(kept)


class Forwarder:
    def __init__(self, rt: "ServiceRuntime", metrics: "Metrics | None") -> None:
        cfg = rt.config
        self.rt = rt
        self.name = rt.name
        self.scheme = rt.scheme
        self.creds = rt.creds
        self.pool = rt.pool
        self.metrics = metrics
        self.prefix = cfg.prefix
        self.base_path = cfg.upstream.base_path
        self.upstream = cfg.upstream
        self.max_replay = cfg.max_replay_body
        self.drop = _REQUEST_DROP | {h.lower() for h in rt.scheme.strip_headers()}
        self.secret_names = SECRET_PARAMS | {p.lower() for p in rt.scheme.secret_params}
        self.origin = cfg.upstream.origin
        # Only schemes that pick a credential per request (on-behalf-of) pay for asking.
        self.wants_key = type(rt.scheme).credential_key is not Scheme.credential_key
        self.answers_locally = type(rt.scheme).local_reply is not Scheme.local_reply

    # ------------------------------------------------------------------ request side
    def _headers(self, request: web.BaseRequest, request_id: str) -> CIMultiDict[str]:
        out = _end_to_end(request.headers, self.drop)
        remote = request.remote or ""
        prior = request.headers.getall("X-Forwarded-For", ())
        if prior or remote:
            out["X-Forwarded-For"] = ", ".join([*prior, remote] if remote else prior)
        out["X-Forwarded-Proto"] = request.scheme
        host = request.headers.get("Host")
        if host:
            out["X-Forwarded-Host"] = host
        out["X-Request-Id"] = request_id
        return out

    async def _read_body(self, request: web.BaseRequest) -> tuple[bytes | None, object | None, bool]:
        """→ (kept body, data to send, replayable). Bodies up to ``max_replay_body`` are
        kept; larger ones stream through without ever being held in memory."""
        if not request.body_exists:
            return None, None, True
        if request.headers.get("Expect", "").lower() == "100-continue" and request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        content = request.content
        length = request.content_length
        try:
            if length is not None:
                if length <= self.max_replay:
                    body = await content.readexactly(length) if length else b""
                    return body, body, True
                return None, content, False
            # Chunked: read up to the limit; past it, send what was read and stream the rest.
            parts: list[bytes] = []
            size = 0
            while size <= self.max_replay:
                chunk = await content.readany()
                if not chunk:
                    body = b"".join(parts)
                    return body, body, True
                parts.append(chunk)
                size += len(chunk)
            return None, _prepend(parts, content), False
        except (asyncio.IncompleteReadError, aiohttp.ClientPayloadError, ConnectionError) as e:
            raise ProxyError("bad_request", "the request body ended before its declared length", self.name) from e

    # ------------------------------------------------------------------ the exchange
    async def forward(self, request: web.BaseRequest, rest: str, query: str, request_id: str) -> web.StreamResponse:
        name = self.name
        key = None
        if self.wants_key:
            try:
                key = self.scheme.credential_key(request.headers)
            except Forbidden as e:
                raise ProxyError(e.code, e.message, name) from None
        elif ON_BEHALF_OF in request.headers:
            raise ProxyError("obo_forbidden", f"service {name} does not issue on-behalf-of tokens", name)
        headers = self._headers(request, request_id)
        if request.body_exists:
            body, data, replayable = await self._read_body(request)
        else:
            body, data, replayable = None, None, True
        length = request.content_length if body is None and data is not None else None
        method = request.method
        path = self.base_path + rest if rest else (self.base_path or "/")
        if self.answers_locally:
            local = self.scheme.local_reply(Outgoing(headers=headers, query=query, body=body, method=method, path=path))
            if local is not None:
                raise _Passthrough(local)
        attempt = 0
        while True:
            cred = self.creds.ready(key) if attempt == 0 else None
            if cred is None:
                cred = await self._credential(key)
            out = Outgoing(headers=headers, query=query, body=body, method=method, path=path)  # apply() replaces, so a replay can reuse them
            self.scheme.apply(out, cred)
            target = f"{out.path}?{out.query}" if out.query else out.path
            try:
                resp = await self.pool.request(
                    method,
                    target,
                    out.headers,
                    body=out.body,
                    stream=data if out.body is None else None,
                    content_length=length,
                )
            except asyncio.TimeoutError:
                raise ProxyError("upstream_timeout", f"{self.upstream.origin} did not answer in time", name) from None
            except aiohttp.ClientPayloadError:
                raise ProxyError("bad_request", "the request body could not be read", name) from None
            except (aiohttp.ClientError, OSError) as e:
                raise ProxyError("upstream_unreachable", f"cannot reach {self.upstream.origin}: {_why(e)}", name) from None
            except ValueError:
                # Only a credential with a line break can get here (aiohttp's server refuses such client input).
                raise ProxyError("upstream_unreachable", "the request could not be built (a header value contains a line break)", name) from None
            try:
                small: bytes | None = None
                rest_stream: AsyncIterator[bytes] | None = None
                if self.scheme.rejection_needs_body(resp.status, resp.headers):
                    small, rest_stream = await self._peek(resp)
                if self.scheme.is_rejection(resp.status, resp.headers, small if rest_stream is None else None):
                    self.creds.rejected(cred)
                    if replayable and attempt == 0:
                        attempt += 1
                        if self.metrics is not None:
                            self.metrics.auth_retry(name)
                        if small is None and resp.content_length is not None and resp.content_length <= COALESCE_MAX:
                            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                                await resp.read()  # read the small rejection so its connection is reused
                        resp.release()
                        continue
                return await self._respond(request, resp, cred, small, rest_stream, request_id)
            finally:
                resp.release()

    async def _credential(self, key: str | None) -> Credential:
        try:
            return await self.creds.get(key)
        except Unavailable as e:
            raise ProxyError(e.code, e.message, self.name, retry_after=e.retry_after) from None
        except UpstreamReply as e:
            raise _Passthrough(e) from None

    async def _peek(self, resp: UpstreamResponse) -> tuple[bytes, AsyncIterator[bytes] | None]:
        """Read a reply up to ``max_replay_body`` for the scheme to inspect; past that
        the reply is not inspected and streams on (what was read goes first)."""
        length = resp.content_length
        if length is not None and length > self.max_replay:
            return b"", _prepend([], resp.content)
        parts: list[bytes] = []
        size = 0
        while True:
            chunk = await resp.content.readany()
            if not chunk:
                return b"".join(parts), None
            parts.append(chunk)
            size += len(chunk)
            if size > self.max_replay:
                return b"", _prepend(parts, resp.content)

    # ------------------------------------------------------------------ response side
    def _response_headers(self, resp: UpstreamResponse, cred: Credential) -> CIMultiDict[str]:
        out = _end_to_end(resp.headers, HOP_BY_HOP)
        location = out.get("Location")
        if location is not None:
            out["Location"] = self.rewrite_location(location, cred)
        return out

    def rewrite_location(self, location: str, cred: Credential | None) -> str:
        """A redirect into the upstream's base path is pointed back at the proxy's prefix
        (never followed: following would carry the credential wherever it points), and
        any credential in it is removed. Other locations are left alone."""
        try:
            u = URL(location, encoded=True)
        except ValueError:
            return location
        up = self.upstream
        if u.is_absolute():
            if (u.scheme or "").lower() != up.scheme or (u.host or "").lower() != up.host.lower() or u.port != up.port:
                return location
        elif not location.startswith("/") or location.startswith("//"):
            return location
        path = u.raw_path
        base = self.base_path
        if base and not (path == base or path.startswith(base + "/")):
            return location
        tail = path[len(base):]
        new_path = (self.prefix.rstrip("/") + tail) or "/"
        query = u.raw_query_string
        if query:
            values = frozenset({cred.token.reveal()}) if cred is not None else frozenset()
            query = strip_params(query, self.secret_names, values)
        frag = f"#{u.raw_fragment}" if u.raw_fragment else ""
        return new_path + (f"?{query}" if query else "") + frag

    async def _respond(
        self,
        request: web.BaseRequest,
        resp: UpstreamResponse,
        cred: Credential,
        small: bytes | None,
        rest_stream: AsyncIterator[bytes] | None,
        request_id: str,
    ) -> web.StreamResponse:
        headers = self._response_headers(resp, cred)
        if "X-Request-Id" not in headers:
            headers["X-Request-Id"] = request_id
        out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=headers)
        if small is None and rest_stream is None:
            length = resp.content_length
            if length is not None and length <= COALESCE_MAX:
                try:
                    small = await resp.read()
                except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
                    raise ProxyError("upstream_unreachable", f"{self.upstream.origin} broke off its reply: {_why(e)}", self.name) from None
        try:
            if small is not None and rest_stream is None:  # (_peek gives b"" + a stream for a large reply)
                # A small reply goes out as one write: status line, headers and body together.
                out._send_headers_immediately = False  # type: ignore[attr-defined]
                await out.prepare(request)
                await out.write_eof(small)
                return out
            await out.prepare(request)
            if rest_stream is not None:
                async for chunk in rest_stream:
                    await out.write(chunk)
            else:
                read = resp.content.readany
                write = out.write
                while True:
                    chunk = await read()
                    if not chunk:
                        break
                    await write(chunk)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            _abort(request)  # the client went away (writes to it raise these)
            return out
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
            # The upstream broke off mid-body: the client must see a broken response,
            # not a short one that looks complete.
            log_event(log, logging.WARNING, "upstream_body_broken", service=self.name, error=_why(e))
            _abort(request)
            return out
        except ConnectionError:
            _abort(request)
            return out
        await out.write_eof()
        return out


class _Passthrough(Exception):
    """The credential endpoint's reply goes back to the client (see UpstreamReply)."""

    def __init__(self, reply: UpstreamReply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def _abort(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


async def _prepend(parts: list[bytes], stream: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    for p in parts:
        yield p
    while True:
        chunk = await stream.readany()
        if not chunk:
            return
        yield chunk


def _why(e: BaseException) -> str:
    if isinstance(e, aiohttp.ClientConnectorError) and e.os_error is not None:
        return e.os_error.strerror or str(e.os_error)
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return "the upstream closed the connection"
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
