"""The authorization-code login (RFC 6749 §4.1): ``authproxy login`` and ``/-/callback/NAME``.

A person approves access in a browser; the authorization response comes back
with a code, which is exchanged (with the PKCE verifier) for the refresh token
the proxy then lives on. The response can arrive three ways: at a loopback
address ``login`` listens on itself (RFC 8252), at the running proxy's
``/-/callback/NAME`` when the proxy owns that address (``login`` then leaves a
pending-login record in the state dir and waits for the proxy to settle it), or
pasted by the person (the oob redirect). Whichever way, the ``state`` must match
the login in flight, ``iss`` must match the configured issuer when both are
present (RFC 9207), and a code is exchanged at most once.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import html
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import parse_qsl, urlencode

from authproxy.schemes import rfc7636
from authproxy.schemes.base import CliIO, CredentialError, NotSupported
from authproxy.schemes.rfc6749 import clean_text
from authproxy.schemes.rfc8252 import OOB, LoopbackAddress, LoopbackReceiver, parse_loopback
from authproxy.secret import Secret
from authproxy.store.base import StoreError

if TYPE_CHECKING:
    from authproxy.schemes.oauth2 import OAuth2Scheme

LOGIN_TIMEOUT = 300.0  # seconds a login waits for the browser to come back
POLL_INTERVAL = 0.2  # how often login checks the state dir while the proxy completes it
LOGIN_DOC = "login"  # a login in progress that the running proxy may complete


# --------------------------------------------------------------------------- a login in progress


@dataclass
class PendingLogin:
    """What the exchange of a code needs: written to the state dir when the running
    proxy is to receive the redirect. ``repr`` shows neither state nor verifier."""

    state: str = field(repr=False)
    verifier: str | None = field(repr=False)
    redirect_uri: str
    identity: str
    expires_at: float
    status: str = "pending"  # pending | exchanging | done | failed
    error: str | None = None

    @classmethod
    def new(cls, redirect_uri: str, pkce: bool, identity: str) -> "PendingLogin":
        verifier = rfc7636.make_verifier() if pkce else None
        return cls(secrets.token_urlsafe(32), verifier, redirect_uri, identity, time.time() + LOGIN_TIMEOUT)

    @classmethod
    def from_doc(cls, doc: Any) -> "PendingLogin | None":
        if not isinstance(doc, dict):
            return None
        try:
            return cls(
                state=str(doc["state"]),
                verifier=doc.get("verifier"),
                redirect_uri=str(doc["redirect_uri"]),
                identity=str(doc.get("identity", "")),
                expires_at=float(doc["expires_at"]),
                status=str(doc.get("status", "pending")),
                error=doc.get("error"),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def to_doc(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "verifier": self.verifier if self.status in ("pending", "exchanging") else None,
            "redirect_uri": self.redirect_uri,
            "identity": self.identity,
            "expires_at": self.expires_at,
            "status": self.status,
            "error": self.error,
        }

    def matches(self, state: str | None) -> bool:
        return state is not None and hmac.compare_digest(state.encode(), self.state.encode())

    @property
    def expired(self) -> bool:
        return time.time() > self.expires_at


# --------------------------------------------------------------------------- the flow


class CodeLogin:
    """The login steps of one ``oauth2`` service; the scheme keeps the refresh token."""

    def __init__(self, scheme: "OAuth2Scheme") -> None:
        self.scheme = scheme
        self.ctx = scheme.ctx
        self.config = scheme.config
        self.name = scheme.name

    async def _read_pending(self) -> "PendingLogin | None":
        try:
            return PendingLogin.from_doc(await self.ctx.store.get(LOGIN_DOC))
        except StoreError:
            return None

    # ------------------------------------------------------------------ authproxy login
    async def login(self, cli: CliIO) -> None:
        cfg = self.config
        if cfg.grant != "authorization_code":
            raise NotSupported(
                f"login is for grant: authorization_code; {self.name} uses {cfg.grant}, which needs no login "
                f"(`authproxy token {self.name}` shows it working)"
            )
        if self.scheme.setup_error is not None:
            raise CredentialError(self.scheme.setup_error)
        pending = PendingLogin.new(cfg.redirect_uri, cfg.pkce, self.scheme.identity())
        url = self.authorize_url(pending)
        if cfg.redirect_uri == OOB:
            await self._login_oob(cli, pending, url)
        else:
            await self._login_loopback(cli, pending, url, parse_loopback(cfg.redirect_uri))
        cli.say(
            f"Logged in: {self.name}'s refresh token is stored in {self.ctx.store.where}.\n"
            f"A running proxy uses it from its next request; `authproxy token {self.name}` prints an access token."
        )

    def authorize_url(self, pending: PendingLogin) -> str:
        cfg = self.config
        query = {"response_type": "code", "client_id": cfg.client_id, "redirect_uri": pending.redirect_uri}
        if cfg.scope:
            query["scope"] = cfg.scope
        query["state"] = pending.state
        if pending.verifier is not None:
            query["code_challenge"] = rfc7636.challenge(pending.verifier)
            query["code_challenge_method"] = rfc7636.METHOD
        assert cfg.authorize_url is not None
        return cfg.authorize_url + ("&" if "?" in cfg.authorize_url else "?") + urlencode(query)

    def _show_url(self, cli: CliIO, url: str) -> None:
        cli.say(f"To log in to {self.name}, open this URL in a browser and approve access:\n\n  {url}\n")

    async def _login_oob(self, cli: CliIO, pending: PendingLogin, url: str) -> None:
        self._show_url(cli, url)
        try:
            answer = (await cli.prompt("Then paste the authorization code the server shows: ")).strip()
        except EOFError:
            raise CredentialError("login cancelled: no code was entered") from None
        if not answer:
            raise CredentialError("login cancelled: no code was entered")
        params = _pasted_response(answer)
        if "state" in params and not pending.matches(params["state"]):
            raise CredentialError("the pasted response belongs to another login (state mismatch); run login again")
        _, _, error = await self._finish(params, pending)
        if error is not None:
            raise CredentialError(f"login failed: {error}")

    async def _login_loopback(self, cli: CliIO, pending: PendingLogin, url: str, addr: LoopbackAddress) -> None:
        outcome: dict[str, str | None] = {}

        async def on_redirect(params: dict[str, str]) -> tuple[int, str, bool]:
            if not pending.matches(params.get("state")):
                return 400, _html("Not this login", "This is not the response to the login in progress (state mismatch); it was ignored."), False
            status, page, error = await self._finish(params, pending)
            outcome["error"] = error
            return status, page, True

        receiver = LoopbackReceiver(addr, on_redirect)
        try:
            await receiver.start()
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise CredentialError(f"cannot listen on {addr.display} (redirect_uri): {e.strerror or e}") from None
            await self._login_via_proxy(cli, pending, url, addr)
            return
        try:
            self._show_url(cli, url)
            cli.say(f"Waiting up to {LOGIN_TIMEOUT / 60:g} minutes for the browser to come back to {pending.redirect_uri} (Ctrl-C to cancel)...")
            try:
                await asyncio.wait_for(asyncio.shield(receiver.done), LOGIN_TIMEOUT)
            except asyncio.TimeoutError:
                raise CredentialError(f"no authorization response arrived within {LOGIN_TIMEOUT / 60:g} minutes; run login again") from None
        finally:
            await receiver.close()
        if outcome.get("error") is not None:
            raise CredentialError(f"login failed: {outcome['error']}")

    async def _login_via_proxy(self, cli: CliIO, pending: PendingLogin, url: str, addr: LoopbackAddress) -> None:
        """The redirect address is taken: if the running proxy owns it, its
        ``/-/callback/NAME`` completes the login from the pending record we leave it."""
        own_path = f"/-/callback/{self.name}"
        if addr.path != own_path:
            raise CredentialError(
                f"{addr.display} (redirect_uri) is in use by another program. If that is the running authproxy, "
                f"set redirect_uri to {addr.origin}{own_path} (and register it with the server); "
                "otherwise stop that program or pick another port"
            )
        if not await self._proxy_answers(addr):
            raise CredentialError(f"{addr.display} (redirect_uri) is in use by a program that is not authproxy; stop it or pick another port")
        store = self.ctx.store
        async with store.lock(LOGIN_DOC):
            try:
                await store.put(LOGIN_DOC, pending.to_doc())
            except StoreError as e:
                raise CredentialError(str(e)) from None
        try:
            self._show_url(cli, url)
            cli.say(
                f"The running authproxy on {addr.display} receives the redirect; waiting up to "
                f"{LOGIN_TIMEOUT / 60:g} minutes for it to complete the login (Ctrl-C to cancel)..."
            )
            await self._await_proxy(pending)
        finally:
            async with store.lock(LOGIN_DOC):
                current = await self._read_pending()
                if current is not None and current.state == pending.state:
                    await store.delete(LOGIN_DOC)

    async def _await_proxy(self, pending: PendingLogin) -> None:
        deadline = time.monotonic() + LOGIN_TIMEOUT
        while time.monotonic() < deadline:
            current = await self._read_pending()
            if current is None or current.state != pending.state:
                raise CredentialError("the login was replaced by another `authproxy login` or a logout")
            if current.status == "done":
                return
            if current.status == "failed":
                raise CredentialError(f"login failed: {current.error}")
            await asyncio.sleep(POLL_INTERVAL)
        raise CredentialError(f"the running proxy received no authorization response within {LOGIN_TIMEOUT / 60:g} minutes; run login again")

    async def _proxy_answers(self, addr: LoopbackAddress) -> bool:
        try:
            reply = await asyncio.wait_for(
                self.ctx.request("GET", f"{addr.origin}/-/healthz", what="checking the redirect address"), 5
            )
            return reply.status == 200 and reply.json() == {"status": "ok"}
        except (CredentialError, asyncio.TimeoutError):
            return False

    # ------------------------------------------------------------------ the redirect, on the running proxy
    async def callback(self, params: Mapping[str, str]) -> tuple[int, str]:
        """``GET /-/callback/NAME`` on the running proxy: complete the login that
        ``authproxy login NAME`` left pending in the state dir."""
        if self.config.grant != "authorization_code":
            return 404, _html("No login here", f"{self.name} uses grant {self.config.grant}, which has no login.")
        try:
            claimed = await self._claim_pending(params.get("state"))
            if isinstance(claimed, tuple):
                return claimed
            status, page, error = await self._finish(params, claimed)
            await self._settle_pending(claimed, error)
        except StoreError as e:
            return 500, _html("State dir unusable", str(e))
        if error is None:
            self.scheme.use_login_now()
        return status, page

    async def _claim_pending(self, state: str | None) -> PendingLogin | tuple[int, str]:
        """The pending login this response answers, marked as being exchanged so that a
        second delivery cannot present the code again; or the page refusing it."""
        store = self.ctx.store
        async with store.lock(LOGIN_DOC):
            pending = PendingLogin.from_doc(await store.get(LOGIN_DOC))
            if pending is None or pending.expired:
                return 400, _html("No login in progress", f"No `authproxy login {self.name}` is waiting for this response. Run it, then try again.")
            if not pending.matches(state):
                return 400, _html("Not this login", "This is not the response to the login in progress (state mismatch); it was ignored.")
            if pending.status != "pending":
                return 409, _html("Already handled", "This login has already been completed or is being completed.")
            if pending.identity != self.scheme.identity():
                pending.status = "failed"
                pending.error = "the running proxy's configuration of this service differs from the one `authproxy login` used; reload the proxy (SIGHUP) first"
                await store.put(LOGIN_DOC, pending.to_doc())
                return 409, _html("Configuration differs", pending.error)
            pending.status = "exchanging"
            await store.put(LOGIN_DOC, pending.to_doc())
            return pending

    async def _settle_pending(self, pending: PendingLogin, error: str | None) -> None:
        """Tell the waiting ``authproxy login`` how it went (it polls the record)."""
        store = self.ctx.store
        async with store.lock(LOGIN_DOC):
            current = PendingLogin.from_doc(await store.get(LOGIN_DOC))
            if current is not None and current.state == pending.state:
                current.status, current.error = ("failed", error) if error else ("done", None)
                await store.put(LOGIN_DOC, current.to_doc())

    async def _finish(self, params: Mapping[str, str], pending: PendingLogin) -> tuple[int, str, str | None]:
        """Check an authorization response whose state matched, exchange its code and
        store the refresh token. → (HTTP status, page for the browser, error or None)."""
        cfg = self.config
        iss = params.get("iss")
        if cfg.issuer and iss is not None and iss != cfg.issuer:
            error = (
                f"the authorization response names issuer {clean_text(iss, 120)!r}, not the configured {cfg.issuer!r} "
                "(RFC 9207: a possible mix-up attack); its code was not used"
            )
            return 400, _html("Login failed", error), error
        if params.get("error"):
            mask = self.ctx.error_text
            error = f"the authorization server answered {clean_text(mask(params['error']), 60)}"
            if params.get("error_description"):
                error += f": {clean_text(mask(params['error_description']), 300)}"
            return 400, _html("Login failed", error), error
        code = params.get("code")
        if not code:
            error = "the authorization response carries no code"
            return 400, _html("Login failed", error), error
        try:
            await self._exchange(Secret(code), pending)
        except CredentialError as e:
            return 502, _html("Login failed", e.message), e.message
        return 200, _html("Logged in", f"authproxy is logged in to {self.name}. You can close this window."), None

    async def _exchange(self, code: Secret, pending: PendingLogin) -> None:
        params = {"grant_type": "authorization_code", "code": code.reveal(), "redirect_uri": pending.redirect_uri}
        masks = [code]
        if pending.verifier is not None:
            params["code_verifier"] = pending.verifier
            masks.append(Secret(pending.verifier))
        started = time.time()
        reply = await self.scheme.endpoint.request(params, what="code exchange", secrets=tuple(masks))
        if reply.refresh_token is None:
            raise CredentialError(
                "the server issued no refresh token, so authproxy could not renew access once this one expires "
                "(some servers want an offline_access scope, or refresh tokens enabled for the client)"
            )
        await self.scheme.store_login(reply, started)


# --------------------------------------------------------------------------- helpers


def _pasted_response(answer: str) -> dict[str, str]:
    """The oob prompt takes the bare code, or the whole redirect URL / query if that is what was copied."""
    if "code=" in answer or "error=" in answer:
        query = answer.split("?", 1)[1] if "?" in answer else answer
        return dict(parse_qsl(query.split("#", 1)[0], keep_blank_values=True))
    return {"code": answer}


def _html(title: str, message: str) -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>authproxy: "
        f"{html.escape(title)}</title></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{html.escape(message)}</p></body></html>\n"
    )
