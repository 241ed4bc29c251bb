"""Forwarding one request to its service's upstream, with the credential applied.

The forwarder never knows how a credential was obtained: it asks the service's
credential manager for one, lets the scheme apply it, streams the request and
the response through the HTTP engine, and when the scheme recognises a
rejection it drops the credential and replays the request once (if its body
was kept).

Order matters: every check runs and the credential is at hand *before* the
request body is read, so a client that sent ``Expect: 100-continue`` gets the
refusal instead of a ``100`` (and never uploads a body that would be refused).
Reading a body that may be read twice (kept for the replay, peeked at for the
scheme) is in ``bodies.py``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, AsyncIterator, NamedTuple

from multidict import CIMultiDict

from authproxy.credentials import Unavailable
from authproxy.http1.tunnel import relay
from authproxy.http1.errors import (
    BodyError,
    RequestBodyError,
    ResponseBodyError,
    UpstreamError,
    UpstreamTimeout,
)
from authproxy.access import fingerprint
from authproxy.observe import log_event
from authproxy.proxy.bodies import peek_reply, read_request_body, reply_stream
from authproxy.proxy.cookies import scope_set_cookie
from authproxy.proxy.location import rewrite_location
from authproxy.proxy.errors import ProxyError
from authproxy.proxy.headers import REQUEST_DROP, RESPONSE_DROP, end_to_end
from authproxy.proxy.scrub import Scrubber, injected_values, is_compressed
from authproxy.schemes.base import Credential, Forbidden, Keyed, Outgoing, ReadsRejectionBodies, RepliesLocally, UpstreamReply
from authproxy.schemes.base import exported as exported_parts
from authproxy.secret import SECRET_PARAMS
from authproxy.tracing import tracing

if TYPE_CHECKING:
    from authproxy.http1.pool import Response
    from authproxy.http1.server import Exchange
    from authproxy.metrics import Metrics
    from authproxy.runtime import ServiceRuntime

log = logging.getLogger("authproxy.proxy")

COALESCE_MAX = 64 * 1024  # replies up to this size (with a Content-Length) are read whole, then sent in one write
ON_BEHALF_OF = "X-Authproxy-On-Behalf-Of"
SCRUB_CACHE_MAX = 256  # scrubbers kept per service (one per credential: the service's own, OBO users')


class Forwarded(NamedTuple):
    """What :meth:`Forwarder.forward` did: the upstream's status (None when none was
    had), how many secrets were masked in the response (``scrubbed=N``), whether the
    answer came from the one replay after a rejection, and the fingerprint of the
    credential injected into the answered attempt (never the value)."""

    upstream_status: int | None
    scrubbed: int = 0
    replayed: bool = False
    credential: str | None = None


class Passthrough(Exception):
    """The credential endpoint's reply goes back to the client (see UpstreamReply),
    already scrubbed when it is raised by the forwarder (``scrubbed``: how many)."""

    def __init__(self, reply: UpstreamReply, scrubbed: int = 0) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.scrubbed = scrubbed


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
        self.body_timeout = cfg.timeout.total
        keyed = isinstance(rt.scheme, Keyed)
        self.drop = REQUEST_DROP | {h.lower() for h in (rt.scheme.consumed_headers if keyed else ())}  # type: ignore[attr-defined]
        self.secret_names = SECRET_PARAMS | {p.lower() for p in rt.scheme.secret_params}
        # Only schemes that pick a credential per request (on-behalf-of) pay for asking.
        self.wants_key = keyed
        self.answers_locally = isinstance(rt.scheme, RepliesLocally)
        self.reads_bodies = isinstance(rt.scheme, ReadsRejectionBodies)
        self.scrub = cfg.scrub_responses
        self._scrubbers: dict[Credential, tuple[tuple[tuple[str, str], ...], Scrubber]] = {}

    # ------------------------------------------------------------------ request side
    def _headers(self, ex: "Exchange", request_id: str, proto: str) -> CIMultiDict[str]:
        out = end_to_end(ex.headers, self.drop)
        remote = ex.peer or ""
        prior = ex.headers.getall("X-Forwarded-For", ())
        if prior or remote:
            out["X-Forwarded-For"] = ", ".join([*prior, remote] if remote else prior)
        out["X-Forwarded-Proto"] = proto
        host = ex.headers.get("Host")
        if host:
            out["X-Forwarded-Host"] = host
        out["X-Request-Id"] = request_id
        return out

    # ------------------------------------------------------------------ the exchange
    async def forward(
        self, ex: "Exchange", rest: str, query: str, request_id: str, direct: bool = False, proto: str = "http"
    ) -> Forwarded:
        """Forward and answer; returns the upstream's status and the scrub count.
        ``direct``: a forward-proxy request (the client addresses the upstream's own
        paths, so ``Location`` and ``Set-Cookie`` keep them)."""
        name = self.name
        key = None
        if self.wants_key:
            try:
                key = self.scheme.credential_key(ex.headers)  # type: ignore[attr-defined]
            except Forbidden as e:
                raise ProxyError(e.code, e.message, name) from None
        elif ON_BEHALF_OF in ex.headers:
            raise ProxyError("obo_forbidden", f"service {name} does not issue on-behalf-of tokens", name)
        headers = self._headers(ex, request_id, proto)
        websocket = ex.upgrade and ex.method == "GET" and ex.headers.get("Upgrade", "").strip().lower() == "websocket"
        if websocket:
            headers["Upgrade"] = "websocket"  # the one upgrade that is forwarded (the pool adds Connection: Upgrade)
        cred = self.creds.ready(key)
        if cred is None:
            cred = await self._credential(key)  # before the body: no 100-continue for a request that will be refused
        body: bytes | None = None
        stream: AsyncIterator[bytes] | None = None
        replayable = True
        if ex.has_body:
            body, stream, replayable = await read_request_body(ex, self.max_replay, self.body_timeout, name)
        length = ex.content_length if stream is not None else None
        method = ex.method
        path = self.base_path + rest if rest else (self.base_path or "/")
        if self.answers_locally:
            out = Outgoing(headers=headers, query=query, body=body, method=method, path=path)
            local = self.scheme.local_reply(out)  # type: ignore[attr-defined]
            if local is not None:
                raise self._passthrough(local, cred)
        attempt = 0
        while True:
            out = Outgoing(headers=headers, query=query, body=body, method=method, path=path)
            self.scheme.apply(out, cred)
            scrubber = self._scrubber(cred, out) if self.scrub else None
            target = f"{out.path}?{out.query}" if out.query else out.path
            if tracing.enabled:  # a CLIENT span; its traceparent goes upstream
                resp = await tracing.upstream_attempt(self._send, name, self.upstream, attempt + 1, method, target, out, stream, length)
            else:
                resp = await self._send(method, target, out, stream, length)
            try:
                small: bytes | None = None
                rest_stream: AsyncIterator[bytes] | None = None
                if self.reads_bodies and self.scheme.rejection_needs_body(resp.status, resp.headers):  # type: ignore[attr-defined]
                    small, rest_stream = await peek_reply(resp, self.max_replay, self.upstream.origin, name)
                if self.scheme.is_rejection(resp.status, resp.headers, small if rest_stream is None else None):
                    self.creds.rejected(cred)
                    renewed = await self._renewed(key) if replayable and attempt == 0 and self.scheme.refetch_renews else None
                    if renewed is not None:
                        attempt += 1
                        cred = renewed
                        if self.metrics is not None:
                            self.metrics.auth_retry(name)
                        if small is None and resp.content_length is not None and resp.content_length <= COALESCE_MAX:
                            try:
                                await resp.read_all()  # read the small rejection so its connection is reused
                            except UpstreamError:
                                pass
                        continue
                if resp.upgraded and websocket:
                    scrubbed = await self._tunnel(ex, resp, cred, scrubber, direct)
                else:
                    scrubbed = await self._respond(ex, resp, cred, small, rest_stream, request_id, scrubber, direct)
                return Forwarded(resp.status, scrubbed, attempt > 0, fingerprint(cred.token.reveal()))
            finally:
                resp.release()

    async def _tunnel(self, ex: "Exchange", resp: "Response", cred: Credential, scrubber: Scrubber | None, direct: bool = False) -> int:
        """After the upstream's ``101``: the handshake's reply goes to the client, then
        bytes are relayed both ways untouched until either side closes (no idle
        timeout: a quiet WebSocket is not a dead one)."""
        headers, scrubbed = self._response_headers(resp, cred, scrubber, direct)
        headers.append(("Upgrade", resp.headers.get("Upgrade", "websocket")))
        await ex.respond(101, resp.reason, headers)
        up_transport, up_stream = resp.takeover()
        client_transport, client_stream = ex.takeover()
        sent, received = await relay(client_transport, client_stream, up_transport, up_stream)
        ex.bytes_in += sent
        ex.bytes_out += received
        return scrubbed

    async def _send(self, method: str, target: str, out: Outgoing, stream: AsyncIterator[bytes] | None, length: int | None) -> "Response":
        name = self.name
        try:
            return await self.pool.request(
                method, target, out.headers, body=out.body, stream=stream if out.body is None else None, content_length=length
            )
        except UpstreamTimeout:
            raise ProxyError("upstream_timeout", f"{self.upstream.origin} did not answer in time", name) from None
        except RequestBodyError as e:
            if isinstance(e.__cause__, BodyError):
                raise ProxyError("bad_request", "the request body did not arrive whole", name) from None
            raise ProxyError("upstream_unreachable", f"{self.upstream.origin} stopped reading the request: {e}", name) from None
        except UpstreamError as e:
            raise ProxyError("upstream_unreachable", f"cannot reach {self.upstream.origin}: {e}", name) from None
        except OSError as e:
            raise ProxyError("upstream_unreachable", f"cannot reach {self.upstream.origin}: {e.strerror or e}", name) from None
        except ValueError:
            # Only a credential with a line break can get here (the engine refuses such client input).
            raise ProxyError("upstream_unreachable", "the request could not be built (a header value contains a line break)", name) from None

    async def _renewed(self, key: str | None) -> Credential | None:
        """A fresh credential for the one replay, or None when the service is in
        ``error`` (the upstream refused what it was configured with, e.g. a rejected
        API token): then the rejection itself goes to the client, which says more
        than a 503. A transient failure (``backoff``) or ``login_required`` is the
        proxy's own 503, which names what to do."""
        try:
            return await self._credential(key)
        except ProxyError:
            if self.creds.status().state == "error":
                return None
            raise

    async def _credential(self, key: str | None) -> Credential:
        try:
            return await self.creds.get(key)
        except Unavailable as e:
            raise ProxyError(e.code, e.message, self.name, retry_after=e.retry_after) from None
        except UpstreamReply as e:
            raise self._passthrough(e, self.creds.current(None)) from None

    # ------------------------------------------------------------------ scrubbing
    def _scrubber(self, cred: Credential, out: Outgoing) -> Scrubber:
        """The scrubber for the values ``cred`` injects, built once per credential: the
        headers it was built from are compared with what was just applied (a scheme
        may inject more than the credential, e.g. a rotated app token)."""
        entry = self._scrubbers.get(cred)
        if entry is not None:
            applied = out.headers
            for k, v in entry[0]:
                if applied.get(k) != v:
                    break
            else:
                return entry[1]
        exported = exported_parts(self.scheme, cred)
        scrubber = Scrubber(injected_values(exported))
        if len(self._scrubbers) >= SCRUB_CACHE_MAX:
            self._scrubbers.clear()
        self._scrubbers[cred] = (tuple(exported.get("headers", {}).items()), scrubber)
        return scrubber

    def _passthrough(self, reply: UpstreamReply, cred: Credential | None) -> Passthrough:
        """A credential endpoint's (or the scheme's own) reply for the client, with what
        was injected (the service's own credential) and every configured secret masked."""
        if not self.scrub:
            return Passthrough(reply)
        values: list[str] = []
        if cred is not None:
            values = injected_values(exported_parts(self.scheme, cred))
        values += [s.reveal() if hasattr(s, "reveal") else s for s in self.scheme.ctx.known_secrets() if s]
        scrubber = Scrubber(values)
        headers, scrubbed = scrubber.headers(list(reply.headers.items()))
        body = reply.body
        if body and not is_compressed(v for k, v in headers if k.lower() == "content-encoding"):
            body, n = scrubber.body(body)
            scrubbed += n
        if scrubbed:
            reply = UpstreamReply(reply.status, dict(headers), body)
        return Passthrough(reply, scrubbed)

    # ------------------------------------------------------------------ response side
    def _response_headers(
        self, resp: "Response", cred: Credential, scrubber: Scrubber | None, direct: bool = False
    ) -> tuple[list[tuple[str, str]], int]:
        out: list[tuple[str, str]] = []
        for k, v in end_to_end(resp.headers, RESPONSE_DROP).items():
            lk = k.lower()
            if lk == "location":
                v = rewrite_location(v, self.upstream, self.prefix, self.secret_names, cred.token.reveal() if cred is not None else None, direct)
            elif lk == "set-cookie" and not direct:
                v = scope_set_cookie(v, self.prefix, self.base_path)
            out.append((k, v))
        if scrubber is None:
            return out, 0
        return scrubber.headers(out)

    async def _respond(
        self,
        ex: "Exchange",
        resp: "Response",
        cred: Credential,
        small: bytes | None,
        rest_stream: AsyncIterator[bytes] | None,
        request_id: str,
        scrubber: Scrubber | None,
        direct: bool = False,
    ) -> int:
        """Send the upstream's reply; returns how many secrets were masked in it."""
        headers, scrubbed = self._response_headers(resp, cred, scrubber, direct)
        if "X-Request-Id" not in resp.headers:
            headers.append(("X-Request-Id", request_id))
        length = resp.content_length
        if ex.method == "HEAD" or resp.status in (204, 304):
            await ex.start(resp.status, resp.reason, headers, content_length=length)  # no body, whatever was said
            await ex.end()
            return scrubbed
        if scrubber is not None and (not scrubber or is_compressed(resp.headers.getall("Content-Encoding", ()))):
            scrubber = None  # compressed bodies pass byte for byte
        if small is None and rest_stream is None and length is not None and length <= COALESCE_MAX:
            try:
                small = await resp.read_all()
            except UpstreamError as e:
                raise ProxyError("upstream_unreachable", f"{self.upstream.origin} broke off its reply: {e}", self.name) from None
        if small is not None and rest_stream is None:
            # A small reply goes out as one write: status line, headers and body together.
            if scrubber is not None and small:
                small, n = scrubber.body(small)
                scrubbed += n
            await ex.respond(resp.status, resp.reason, headers, small)
            return scrubbed
        await ex.start(resp.status, resp.reason, headers, content_length=length)
        pieces = rest_stream if rest_stream is not None else reply_stream(resp, [])
        body = scrubber.stream() if scrubber is not None else None
        try:
            if body is None:
                async for chunk in pieces:
                    await ex.write(chunk)
            else:
                # A secret split between two reads is still masked: only the tail that
                # could begin one is held back until the next read.
                async for chunk in pieces:
                    await ex.write(body.feed(chunk))
                await ex.write(body.flush())
        except (ResponseBodyError, UpstreamError) as e:
            # The upstream broke off mid-body: the client must see a broken response,
            # not a short one that looks complete.
            log_event(log, logging.WARNING, "upstream_body_broken", service=self.name, error=str(e))
            ex.abort()
            return scrubbed + (body.count if body is not None else 0)
        except ConnectionError:
            ex.abort()  # the client went away
            return scrubbed + (body.count if body is not None else 0)
        await ex.end()
        return scrubbed + (body.count if body is not None else 0)

