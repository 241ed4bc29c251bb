"""FogBugz / Manuscript: a ``token`` query parameter, from a configured API token or ``cmd=logon``.

FogBugz's XML API (``/api.asp?cmd=...``) and JSON API (``POST /f/api/0/jsonapi``
with ``{"cmd": ..., "token": ...}``) need a token on every call. The token
either comes from the web UI (an API token, configured here and used as given)
or from ``cmd=logon`` with an email and a password. Logon tokens never expire:
they live until ``cmd=logoff``, a password change or an administrator ends
them, so every one authproxy makes is recorded (the manager's
``persist_created``) and logged off at exit — the vendor asks clients to
invalidate tokens they no longer need.

A token that stopped working shows up not as a 401 but as an error inside an
ordinary reply: XML ``<error code="3">Not logged on</error>`` on HTTP 200, or a
JSON ``"errors": [{"code": "3", ...}]`` on HTTP 200 or 400. Those replies are
small, so the scheme asks the forwarder for their bodies and recognises them.
Such a reply can also be about a token the proxy could not replace (one inside
a request body too large to keep), so a rejected token is checked with one
``cmd=viewPerson`` before it is given up: a live logon token is kept rather
than left behind by a new logon, and a live API token keeps the service up.

Every client shares the token, so a client's own ``cmd=logoff`` (which would
end it for all, and an API token for good) and ``cmd=logon`` are answered here
and never forwarded; the logon answer holds a placeholder the proxy replaces.
Where FogBugz finds ``cmd`` and ``token`` — query, form, multipart, JSON — is
in :mod:`authproxy.schemes.fogbugz_body`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from xml.etree import ElementTree

from authproxy.observe import log_event
from authproxy.schemes.base import (
    MASK_WINDOW,
    Credential,
    CredentialError,
    Outgoing,
    ReadsRejectionBodies,
    RepliesLocally,
    Reply,
    Scheme,
    SchemeContext,
    Stateful,
    UpstreamReply,
)
from authproxy.schemes.fogbugz_body import (
    NOT_LOGGED_ON,
    PARAM,
    client_commands,
    content_kind,
    decoded,
    decoder,
    json_not_logged_on,
    parse_xml,
    replace_param,
    set_body_token,
    xml_not_logged_on,
)
from authproxy.secret import Secret
from authproxy.secrets_source import read_secret_file
from authproxy.settings import FieldError, FilePath

__all__ = ["FogBugzConfig", "FogBugzScheme", "replace_param", "set_body_token", "PLACEHOLDER"]

MAX_MESSAGE = 200  # characters of an upstream error text kept in last_error
REREAD_INTERVAL = 60.0  # seconds: a rejected token's token_file is re-read at most this often
# What a client's own cmd=logon gets: any token it sends back is replaced by the real one.
PLACEHOLDER = "authproxy-placeholder"
API_TOKEN_REJECTED = "the configured API token was rejected (not logged on)"
XML_TYPE = "text/xml; charset=utf-8"
JSON_TYPE = "application/json; charset=utf-8"


@dataclass(frozen=True)
class FogBugzConfig:
    """``auth:`` of a ``scheme: fogbugz`` service: a configured API token, or an
    email and password to log on with."""

    token: Secret | None = None
    # Declared here (not left to the loader's generic ``k_file``) so the scheme knows
    # the file to re-read when the upstream rejects the token read from it.
    token_file: FilePath | None = None
    email: str | None = None
    password: Secret | None = None
    api_path: str = "/api.asp"
    logoff_on_exit: bool = True

    def __post_init__(self) -> None:
        if self.token_file is None:
            return
        if self.token is not None:
            raise FieldError("token_file", "give either token or token_file, not both")
        try:
            value = read_secret_file(self.token_file, Path.cwd())
        except ValueError as e:
            raise FieldError("token_file", str(e)) from None
        object.__setattr__(self, "token", Secret(value))

    def check(self) -> None:
        has_logon = self.email is not None or self.password is not None
        token_key = "token_file" if self.token_file is not None else "token"
        if self.token is not None and has_logon:
            raise FieldError(token_key, "give either token or email and password, not both")
        if self.token is None and not has_logon:
            raise FieldError(None, "give token (an API token, recommended), or email and password")
        if self.token is not None and not self.token:
            raise FieldError(token_key, "is empty")
        if has_logon:
            if not self.email:
                raise FieldError("email", "required with password")
            if self.password is None:
                raise FieldError("password", "required with email (or password_file)")
            if not self.password:
                raise FieldError("password", "is empty")
        if not self.api_path.startswith("/") or "?" in self.api_path or "#" in self.api_path:
            raise FieldError("api_path", "must be a path starting with '/' (e.g. /api.asp), without a query")


class FogBugzScheme(Scheme, Stateful, RepliesLocally, ReadsRejectionBodies):
    Config = FogBugzConfig
    secret_params = (PARAM, "password")
    # A logon token replaced while still valid is a live credential nobody uses: log it off.
    revoke_replaced = True
    # Logon tokens never expire: record them so a restart reuses them and an exit logs them off.
    persist_created = True

    def __init__(self, ctx: SchemeContext) -> None:
        super().__init__(ctx)
        self.config: FogBugzConfig = ctx.service.auth
        self._api_url = ctx.upstream_url(self.config.api_path)
        self._token = self.config.token  # the configured API token (token_file may bring a new one)
        self._api_token_rejected = False
        self._suspect: Credential | None = None  # a logon token the upstream rejected: still alive?
        self._reread_at: float | None = None
        self._clock = time.monotonic

    # ------------------------------------------------------------------ obtaining
    @property
    def logs_on(self) -> bool:
        """Whether authproxy logs on itself (else it uses the configured API token)."""
        return self.config.token is None

    @property
    def revoke_on_exit(self) -> bool:
        return self.logs_on and self.config.logoff_on_exit

    def identity(self) -> str:
        """A recorded logon token is reused only for the same upstream, API path and account."""
        mode = f"logon {self.config.email}" if self.logs_on else "api-token"
        return f"{self.ctx.service.upstream.url}{self.config.api_path} {mode}"

    async def obtain(self, key: str | None) -> Credential:
        if self._token is not None:
            return await self._api_token()
        suspect = self._suspect
        if suspect is not None:
            # Only called after the manager dropped it: check before leaving a live token behind.
            alive = await self._still_valid(suspect.token)
            self._suspect = None
            if alive:
                self._rejection_unconfirmed()
                return suspect
        return await self._logon()

    def on_rejected(self, cred: Credential) -> None:
        if self._token is not None:
            self._api_token_rejected = self._api_token_rejected or cred.token == self._token
        elif cred.created:
            self._suspect = cred

    async def _api_token(self) -> Credential:
        """The configured API token; once rejected: a new one from token_file (re-read at
        most once a minute), or the same one if a check shows it alive after all, else a
        refusal — an API token cannot be renewed, so the service is in error until a
        person makes a new one."""
        assert self._token is not None
        if not self._api_token_rejected:
            return Credential(token=self._token, created=False)
        fresh = await self._reread_token_file()
        if fresh is not None:
            self._token = fresh
            self._api_token_rejected = False
            log_event(self.ctx.log, logging.INFO, "api_token_reread", service=self.ctx.service.name, file=self.config.token_file)
            return Credential(token=fresh, created=False)
        if await self._still_valid(self._token):
            self._api_token_rejected = False
            self._rejection_unconfirmed()
            return Credential(token=self._token, created=False)
        if self.config.token_file is not None:
            fix = f"token_file {self.config.token_file} still holds it (re-read at most once a minute): write a new API token there"
        else:
            fix = "make a new API token in FogBugz, configure it and reload (SIGHUP)"
        raise CredentialError(f"{API_TOKEN_REJECTED}; {fix}", refused=True)

    async def _reread_token_file(self) -> Secret | None:
        """A token in token_file other than the rejected one, or None."""
        path = self.config.token_file
        if path is None:
            return None
        now = self._clock()
        if self._reread_at is not None and now - self._reread_at < REREAD_INTERVAL:
            return None
        self._reread_at = now
        try:
            value = await asyncio.to_thread(read_secret_file, path, Path.cwd())
        except ValueError as e:
            raise CredentialError(f"{API_TOKEN_REJECTED}, and token_file cannot be re-read: {e}", refused=True) from None
        if not value or self._token is None or value == self._token.reveal():
            return None
        return Secret(value)

    async def _still_valid(self, token: Secret) -> bool:
        """One side-effect-free command (``cmd=viewPerson``: who am I) with the token in a
        POST body: False only for "not logged on"."""
        form = {"cmd": "viewPerson", PARAM: token.reveal()}
        reply = await self.ctx.request("POST", self._api_url, what="FogBugz token check", data=form)
        root = self._reply_xml(reply, "token check", token)
        error = root.find("error")
        return error is None or (error.get("code") or "").strip() != NOT_LOGGED_ON

    def _rejection_unconfirmed(self) -> None:
        log_event(
            self.ctx.log,
            logging.WARNING,
            "token_rejection_unconfirmed",
            service=self.ctx.service.name,
            detail="FogBugz answered a request 'not logged on' but the token is valid: the request probably "
            "carried a token of its own where the proxy could not replace it (a body over max_replay_body)",
        )

    async def _logon(self) -> Credential:
        """``cmd=logon`` with the email and password in a form-encoded POST body —
        never in the URL, where servers and proxies log them."""
        assert self.config.email is not None and self.config.password is not None
        form = {"cmd": "logon", "email": self.config.email, "password": self.config.password.reveal()}
        reply = await self.ctx.request("POST", self._api_url, what="FogBugz logon", data=form)
        root = self._reply_xml(reply, "logon")
        error = root.find("error")
        if error is not None:
            raise self._logon_refused(root, error)
        token_el = root.find(PARAM)
        token = (token_el.text or "").strip() if token_el is not None else ""
        if not token:
            raise CredentialError(f"FogBugz logon: {reply.url} answered without a <token>")
        return Credential(token=Secret(token), created=True)

    def _logon_refused(self, root: ElementTree.Element, error: ElementTree.Element) -> CredentialError:
        """Error 1 (wrong email or password, or two-factor on) and 2 (ambiguous logon)
        are refusals: the same request will fail again, so the manager backs off hard."""
        code = error.get("code", "?")
        text = self._message(error.text or "")
        if code == "1":
            return CredentialError(
                f"FogBugz refused the logon (error 1: {text or 'incorrect email or password'}); "
                "check email and password — with two-factor authentication on, configure an API token instead",
                refused=True,
            )
        if code == "2":
            people = [self._message(p.text or "") for p in root.iter("person")]
            listed = ", ".join(p for p in people if p) or "none listed"
            return CredentialError(
                f"FogBugz refused the logon (error 2: {text or 'ambiguous logon'}); "
                f"several people share this email — set email to one of their full names: {listed}",
                refused=True,
            )
        return CredentialError(f"FogBugz logon failed (error {self._message(code)}: {text or 'no message'})")

    def _reply_xml(self, reply: Reply, what: str, sent: Secret | None = None) -> ElementTree.Element:
        if reply.status != 200:
            detail = self._message(reply.text(MASK_WINDOW), sent)  # masked whole, then cut: a cut secret would escape the mask
            message = f"FogBugz {what}: {reply.url} answered HTTP {reply.status}" + (f": {detail}" if detail else "")
            # A 4xx (other than a timeout or rate limit) will not change by retrying soon.
            raise CredentialError(message, refused=400 <= reply.status < 500 and reply.status not in (408, 429))
        root = parse_xml(reply.body)
        if root is None or root.tag != "response":
            raise CredentialError(
                f"FogBugz {what}: {reply.url} answered with something that is not a FogBugz XML <response> "
                "(check upstream and api_path)"
            )
        return root

    def _message(self, text: str, sent: Secret | None = None) -> str:
        """An upstream text made fit for last_error: one line, short, and with our
        secrets (and the token just sent) masked should the upstream echo them."""
        one_line = " ".join(text.split())
        return self.ctx.error_text(one_line, sent)[:MAX_MESSAGE]

    # ------------------------------------------------------------------ applying
    def apply(self, out: Outgoing, cred: Credential) -> None:
        """``token=`` in the query string, replacing any the client sent; and in a kept
        form, multipart or JSON-object body too, where FogBugz would otherwise find the
        client's placeholder."""
        token = cred.token.reveal()
        out.query = replace_param(out.query, PARAM, token)
        if out.body:
            out.body = set_body_token(out.body, out.headers.get("Content-Type", ""), token)

    def local_reply(self, out: Outgoing) -> UpstreamReply | None:
        """A client's ``cmd=logoff`` would end the token every client shares (and a
        configured API token for good), and its ``cmd=logon`` would make a token nobody
        logs off (or fail: the client has no password). Both are answered here as
        FogBugz would, in XML, or in JSON for a JSON API request. Bodies too large to
        keep are not looked into."""
        commands, is_json = client_commands(out.query, out.body, out.headers.get("Content-Type", ""))
        if "logoff" in commands:
            cmd, data, inner = "logoff", {}, ""
        elif "logon" in commands:
            cmd, data, inner = "logon", {PARAM: PLACEHOLDER}, f"<{PARAM}><![CDATA[{PLACEHOLDER}]]></{PARAM}>"
        else:
            return None
        log_event(self.ctx.log, logging.INFO, f"client_{cmd}_answered", service=self.ctx.service.name)
        if is_json:
            doc = {"data": data, "errors": [], "warnings": [], "meta": {}, "errorCode": None, "maxCacheAge": None}
            return UpstreamReply(200, {"Content-Type": JSON_TYPE}, json.dumps(doc).encode())
        xml = f'<?xml version="1.0" encoding="UTF-8"?><response>{inner}</response>'
        return UpstreamReply(200, {"Content-Type": XML_TYPE}, xml.encode())

    # ------------------------------------------------------------------ recognising a dead token
    def rejection_needs_body(self, status: int, headers: Mapping[str, str]) -> bool:
        """Only XML replies on 200 and JSON replies on 200/400 can say "not logged on";
        a body we could not decode could not be inspected anyway."""
        kind = content_kind(headers.get("Content-Type", ""))
        if kind is None or decoder(headers.get("Content-Encoding", "")) is False:
            return False
        return status == 200 or (kind == "json" and status in (400, 401))

    def is_rejection(self, status: int, headers: Mapping[str, str], body: bytes | None) -> bool:
        if not body:
            return False
        kind = content_kind(headers.get("Content-Type", ""))
        if kind is None:
            return False
        data = decoded(body, headers.get("Content-Encoding", ""))
        if data is None:
            return False
        if kind == "xml":
            return status == 200 and xml_not_logged_on(data)
        return status in (200, 400, 401) and json_not_logged_on(data)

    # ------------------------------------------------------------------ logging off
    async def revoke(self, cred: Credential) -> None:
        """``cmd=logoff`` for a token authproxy logged on for (never a configured one).
        A token the server no longer knows is as logged off as it gets."""
        if not cred.created:
            return
        form = {"cmd": "logoff", PARAM: cred.token.reveal()}
        reply = await self.ctx.request("POST", self._api_url, what="FogBugz logoff", data=form)
        root = self._reply_xml(reply, "logoff", cred.token)
        error = root.find("error")
        if error is not None and error.get("code") != NOT_LOGGED_ON:
            code = self._message(error.get("code", "?"))
            raise CredentialError(f"FogBugz logoff failed (error {code}: {self._message(error.text or '', cred.token)})")
