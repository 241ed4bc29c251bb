"""The interface every authentication scheme implements, and the optional capabilities.

A scheme is pure protocol code, in the spirit of httpx's ``Auth.auth_flow``: it
says how to obtain a credential, how to apply it to an outgoing request, how to
recognise the upstream rejecting it, and how to revoke it. Everything about
time and concurrency — caching, expiry, single-flight, backoff, persistence,
sharing between processes, shutdown — belongs to the credential manager
(:mod:`authproxy.credentials`), which a scheme never sees.

What only some schemes do is a small capability class of its own, which the
manager, the proxy and the CLI discover with ``isinstance``:

* :class:`Interactive` — a person logs in (``authproxy login``), and the running
  proxy may receive the redirect (``/-/callback/NAME``);
* :class:`Rotatable` — ``authproxy rotate`` makes a new long-lived secret;
* :class:`Keyed` — credentials per key (an on-behalf-of user) chosen from the
  request's headers;
* :class:`Stateful` — the scheme keeps something beside its credentials (store
  documents, a listener) and wants to hear of reloads, rejections, logout, exit;
* :class:`RepliesLocally` and :class:`ReadsRejectionBodies` — a request answered
  without the upstream, a rejection that hides in a 200 body (FogBugz).

Adding a scheme is one module with a ``Config`` dataclass and a ``Scheme``
subclass, and one line in :mod:`authproxy.schemes` (the registry).
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

from authproxy.schemes.context import MASK_WINDOW as MASK_WINDOW
from authproxy.schemes.context import CliIO as CliIO
from authproxy.schemes.context import CredentialAccess as CredentialAccess
from authproxy.schemes.context import Reply as Reply
from authproxy.schemes.context import SchemeContext as SchemeContext
from authproxy.schemes.credential import Credential as Credential
from authproxy.schemes.credential import CredentialError as CredentialError
from authproxy.schemes.credential import Forbidden as Forbidden
from authproxy.schemes.credential import LoginRequired as LoginRequired
from authproxy.schemes.credential import NotSupported as NotSupported
from authproxy.schemes.credential import Outgoing as Outgoing
from authproxy.schemes.credential import UpstreamReply as UpstreamReply
from authproxy.schemes.credential import set_query_param as set_query_param


class Scheme:
    """What every scheme is. The defaults suit a credential that is rejected with 401,
    lives in memory only and is revoked by nothing."""

    #: The scheme's settings (a frozen dataclass, read by authproxy.settings' loader).
    Config: ClassVar[type]
    #: Query parameters this scheme puts secrets in: masked in logged URLs.
    secret_params: ClassVar[tuple[str, ...]] = ()
    #: Credentials authproxy creates are recorded in the store (reused after a restart,
    #: revoked at exit and by ``logout``).
    persist_created: ClassVar[bool] = False
    #: A created credential replaced before it expired is revoked at once.
    revoke_replaced: ClassVar[bool] = False
    #: Obtaining again after a rejection may bring a credential that works, so the request
    #: is replayed with it. False for a configured value: the same one would come back (a
    #: re-read of its k_file / k_command renews it, for the next request: proxy/reread.py).
    refetch_renews: ClassVar[bool] = True

    def __init__(self, ctx: SchemeContext) -> None:
        self.ctx = ctx
        self.config: Any = ctx.service.auth

    # ---- what every scheme says
    async def obtain(self, key: str | None) -> Credential:
        """Ask the upstream (or the configuration) for a credential. ``key`` is None for
        the service's own credential, or a :class:`Keyed` scheme's key."""
        raise NotImplementedError

    def apply(self, out: Outgoing, cred: Credential) -> None:
        """Put the credential into the outgoing request (headers, query, body)."""
        raise NotImplementedError

    def is_rejection(self, status: int, headers: Mapping[str, str], body: bytes | None) -> bool:
        """Whether the upstream's reply says the credential is no good (then it is
        dropped, a new one obtained, and the request replayed once)."""
        return status == 401

    async def revoke(self, cred: Credential) -> None:
        """Invalidate a credential authproxy created (log off, expire, RFC 7009)."""

    # ---- facts the credential manager reads (defaults from the settings)
    @property
    def refresh_margin(self) -> float:
        return float(getattr(self.config, "refresh_margin", 0) or 0)

    @property
    def revoke_on_exit(self) -> bool:
        return False

    def identity(self) -> str:
        """What a stored credential must have been made for to be reused (e.g. the
        upstream and the user name): a config change never reuses another account's token."""
        return self.ctx.service.upstream.url


# --------------------------------------------------------------------------- capabilities


class Interactive:
    """A person runs a flow (``authproxy login SERVICE [--device]``)."""

    async def login(self, cli: CliIO, device: bool = False) -> None:
        raise NotImplementedError

    async def callback(self, params: Mapping[str, str]) -> tuple[int, str]:
        """``GET /-/callback/SERVICE`` on the running proxy: (status, HTML page)."""
        return 404, "<p>This service has no login callback.</p>"


class Rotatable:
    """``authproxy rotate SERVICE``: make a new long-lived secret and keep it in the store."""

    async def rotate(self, cli: CliIO, seconds: int | None, expire_old: bool) -> None:
        raise NotImplementedError


class Keyed:
    """Credentials per key (an on-behalf-of user id) chosen from the request."""

    #: Request headers the scheme consumes and never forwards.
    consumed_headers: ClassVar[tuple[str, ...]] = ()

    def credential_key(self, headers: Mapping[str, str]) -> str | None:
        """Which credential a request needs (None: the service's own). May raise Forbidden."""
        raise NotImplementedError


class Stateful:
    """A scheme that keeps something beside its credentials: documents in the store
    (a refresh token, a rotated app token), a task, a listener."""

    async def prepare(self) -> None:
        """Before the first credential is asked for: read what apply() may need at once."""

    async def reload(self) -> None:
        """SIGHUP with this service's config unchanged: re-read what the CLI may have
        changed in the store (a rotated app token, a new login). Credentials stay."""

    def on_rejected(self, cred: Credential) -> None:
        """The upstream rejected ``cred`` and the manager dropped it."""

    async def logout(self) -> int:
        """Forget and revoke what the scheme keeps itself (a refresh token); → how many
        credentials that revoked upstream."""
        return 0

    async def close(self) -> None:
        """Release what the scheme holds open (tasks, listeners)."""


class RepliesLocally:
    """Some requests are answered by authproxy instead of the upstream — one that
    would harm every client sharing the credential (a client's own logoff of it)."""

    def local_reply(self, out: Outgoing) -> UpstreamReply | None:
        raise NotImplementedError


class ReadsRejectionBodies:
    """A rejection can hide in a reply's body (an error code in a 200): the proxy keeps
    small bodies of such replies for :meth:`Scheme.is_rejection`."""

    def rejection_needs_body(self, status: int, headers: Mapping[str, str]) -> bool:
        raise NotImplementedError


def exported(scheme: Scheme, cred: Credential) -> dict[str, dict[str, str]]:
    """Every part ``cred`` puts into a request (``authproxy token --json``, scrubbing)."""
    from urllib.parse import parse_qsl

    from multidict import CIMultiDict

    out = Outgoing(headers=CIMultiDict(), query="", body=None)
    scheme.apply(out, cred)
    return {"headers": dict(out.headers), "query": dict(parse_qsl(out.query, keep_blank_values=True))}
