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
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import quote, unquote_plus
from xml.etree import ElementTree

from authproxy.config import FieldError
from authproxy.observe import log_event
from authproxy.schemes.base import Credential, CredentialError, Outgoing, Reply, Scheme, SchemeContext, UpstreamReply
from authproxy.secret import Secret

PARAM = "token"
NOT_LOGGED_ON = "3"
MAX_INSPECTED = 64 * 1024  # a "not logged on" reply is tiny; never inflate more than this
MAX_MESSAGE = 200  # characters of an upstream error text kept in last_error


@dataclass(frozen=True)
class FogBugzConfig:
    """``auth:`` of a ``scheme: fogbugz`` service: a configured API token, or an
    email and password to log on with."""

    token: Secret | None = None
    email: str | None = None
    password: Secret | None = None
    api_path: str = "/api.asp"
    logoff_on_exit: bool = True

    def check(self) -> None:
        has_logon = self.email is not None or self.password is not None
        if self.token is not None and has_logon:
            raise FieldError("token", "give either token or email and password, not both")
        if self.token is None and not has_logon:
            raise FieldError(None, "give token (an API token, recommended), or email and password")
        if self.token is not None and not self.token:
            raise FieldError("token", "is empty")
        if has_logon:
            if not self.email:
                raise FieldError("email", "required with password")
            if self.password is None:
                raise FieldError("password", "required with email (or password_file)")
            if not self.password:
                raise FieldError("password", "is empty")
        if not self.api_path.startswith("/") or "?" in self.api_path or "#" in self.api_path:
            raise FieldError("api_path", "must be a path starting with '/' (e.g. /api.asp), without a query")


class FogBugzScheme(Scheme):
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
        if self.config.token is not None:
            return Credential(token=self.config.token, created=False)
        return await self._logon()

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
            detail = self._message(reply.text(), sent)
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
        form or JSON-object body too, where FogBugz would otherwise find the client's."""
        token = cred.token.reveal()
        out.query = replace_param(out.query, PARAM, token)
        if out.body:
            out.body = set_body_token(out.body, out.headers.get("Content-Type", ""), token)

    def local_reply(self, out: Outgoing) -> UpstreamReply | None:
        """A client's ``cmd=logoff`` would end the token every client shares (and a
        configured API token for good): it is answered here as FogBugz would, and the
        token stays. Bodies too large to keep are not looked into."""
        json_body = out.body is not None and _json_object(out.body)
        if isinstance(json_body, dict):
            cmd = next((v for k, v in json_body.items() if k.lower() == "cmd"), None)
        else:
            cmd = _param(out.query, "cmd")
            if cmd is None and out.body and out.headers.get("Content-Type", "").split(";", 1)[0].strip().lower() == "application/x-www-form-urlencoded":
                cmd = _param(out.body.decode("latin-1"), "cmd")
        if not isinstance(cmd, str) or cmd.lower() != "logoff":
            return None
        log_event(self.ctx.log, logging.INFO, "client_logoff_answered", service=self.ctx.service.name)
        if isinstance(json_body, dict):
            doc = {"data": {}, "errors": [], "warnings": [], "meta": {}}
            return UpstreamReply(200, {"Content-Type": "application/json; charset=utf-8"}, json.dumps(doc).encode())
        return UpstreamReply(200, {"Content-Type": "text/xml; charset=utf-8"}, b'<?xml version="1.0" encoding="UTF-8"?><response></response>')

    # ------------------------------------------------------------------ recognising a dead token
    def rejection_needs_body(self, status: int, headers: Mapping[str, str]) -> bool:
        """Only XML replies on 200 and JSON replies on 200/400 can say "not logged on";
        a body we could not decode could not be inspected anyway."""
        kind = _content_kind(headers.get("Content-Type", ""))
        if kind is None or _decoder(headers.get("Content-Encoding", "")) is False:
            return False
        return status == 200 or (kind == "json" and status in (400, 401))

    def is_rejection(self, status: int, headers: Mapping[str, str], body: bytes | None) -> bool:
        if not body:
            return False
        kind = _content_kind(headers.get("Content-Type", ""))
        if kind is None:
            return False
        data = _decoded(body, headers.get("Content-Encoding", ""))
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


# --------------------------------------------------------------------------- helpers (pure, tested directly)


_XML_REJECTION = re.compile(rb"<error\b[^>]*\bcode\s*=\s*[\"']\s*3\s*[\"']")
_JSON_REJECTION = re.compile(rb"\"code\"\s*:\s*\"?\s*3\s*\"?\s*[,}]")
_FORBIDDEN_XML = (b"<!DOCTYPE", b"<!ENTITY")


def parse_xml(body: bytes) -> ElementTree.Element | None:
    """Parse a FogBugz reply. FogBugz never sends a DTD, so any document declaring one
    is refused before parsing: no entity expansion, no external fetches."""
    head = body.upper()
    if any(marker in head for marker in _FORBIDDEN_XML):
        return None
    try:
        return ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return None


def xml_not_logged_on(body: bytes) -> bool:
    """``<response><error code="3">…</error></response>`` — cheap byte check first."""
    if _XML_REJECTION.search(body) is None:
        return False
    root = parse_xml(body)
    if root is None or root.tag != "response":
        return False
    error = root.find("error")
    return error is not None and (error.get("code") or "").strip() == NOT_LOGGED_ON


def json_not_logged_on(body: bytes) -> bool:
    """``{"errors": [{"code": "3", ...}], ...}`` — cheap byte check first."""
    if b'"errors"' not in body or _JSON_REJECTION.search(body) is None:
        return False
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(errors, list):
        return False
    return any(isinstance(e, dict) and str(e.get("code", "")).strip() == NOT_LOGGED_ON for e in errors)


def _content_kind(content_type: str) -> str | None:
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime.endswith("/xml") or mime.endswith("+xml"):
        return "xml"
    if mime.endswith("/json") or mime.endswith("+json"):
        return "json"
    return None


def _decoder(encoding: str) -> Any:
    """A zlib window size for the reply's Content-Encoding; None for none; False if unknown."""
    enc = encoding.strip().lower()
    if enc in ("", "identity"):
        return None
    if enc in ("gzip", "x-gzip"):
        return 16 + zlib.MAX_WBITS
    if enc == "deflate":
        return zlib.MAX_WBITS
    return False


def _decoded(body: bytes, encoding: str) -> bytes | None:
    """The reply as sent by FogBugz, inflated (bounded) when the client asked for gzip."""
    wbits = _decoder(encoding)
    if wbits is None:
        return body
    if wbits is False:
        return None
    for bits in (wbits, -zlib.MAX_WBITS) if wbits == zlib.MAX_WBITS else (wbits,):
        try:
            return zlib.decompressobj(bits).decompress(body, MAX_INSPECTED)
        except zlib.error:
            continue
    return None


def replace_param(query: str, name: str, value: str) -> str:
    """Drop every ``name=`` parameter (case-insensitively: FogBugz's ASP reads
    parameters that way) and append ``name=value``; other bytes stay as sent."""
    kept = [p for p in query.split("&") if p and unquote_plus(p.partition("=")[0]).lower() != name]
    kept.append(f"{quote(name, safe='')}={quote(value, safe='')}")
    return "&".join(kept)


def _param(query: str, name: str) -> str | None:
    """The last ``name`` parameter of a raw query or form string (case-insensitive name)."""
    value = None
    for part in query.split("&"):
        key, _, v = part.partition("=")
        if unquote_plus(key).lower() == name:
            value = unquote_plus(v)
    return value


def _json_object(body: bytes) -> dict[str, Any] | None:
    stripped = body.lstrip(b" \t\r\n").removeprefix(b"\xef\xbb\xbf")
    if not stripped.startswith(b"{"):
        return None
    try:
        doc = json.loads(stripped)
    except (UnicodeDecodeError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def set_body_token(body: bytes, content_type: str, token: str) -> bytes:
    """Set ``token`` in a JSON-object or form-encoded body; any other body is left as is.
    A JSON object is recognised by its content whatever the Content-Type says, because
    ``curl -d '{...}'`` labels it as a form."""
    json_body = _json_object_with_token(body, token)
    if json_body is not None:
        return json_body
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime == "application/x-www-form-urlencoded":
        # latin-1 maps bytes 1:1, so every byte of the other fields survives the round trip.
        return replace_param(body.decode("latin-1"), PARAM, token).encode("latin-1")
    return body


def _json_object_with_token(body: bytes, token: str) -> bytes | None:
    stripped = body.lstrip(b" \t\r\n")
    bom = stripped.startswith(b"\xef\xbb\xbf")
    if bom:
        stripped = stripped[3:].lstrip(b" \t\r\n")
    if not stripped.startswith(b"{"):
        return None
    try:
        text = stripped.decode("utf-8")
        doc = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    pair = f"{json.dumps(PARAM)}:{json.dumps(token)}"
    if not any(k.lower() == PARAM for k in doc):
        # The usual case: insert the field, leaving every other byte as the client wrote it.
        rest = text[1:]
        sep = "" if rest.lstrip().startswith("}") else ","
        return ("{" + pair + sep + rest).encode("utf-8")
    for k in [k for k in doc if k.lower() == PARAM]:
        del doc[k]
    return json.dumps({PARAM: token, **doc}, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
