"""The mock Enfix's model: tokens and what the server keeps of them, the
counters and switches a test reads or flips, the header and body checks (as
strict as the real API), and its DRF-shaped error replies. The HTTP side (the
endpoints, the app and the demo) is :mod:`authproxy.testing.enfix`.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Literal

from aiohttp import web

STATE: web.AppKey["EnfixState"] = web.AppKey("enfix_state")

DEMO_APP_TOKEN = "demo-app-token"
DEMO_USER = "demo"
DEMO_PASSWORD = "demo-password"
USER_ID_RE = re.compile(r"^[0-9a-f]{24}$")
BAD_IDS = "One or more IDs are not formatted correctly."

Kind = Literal["login", "obo", "fixed", "app"]


def user_id(username: str) -> str:
    """The 24-hex id the mock gives a user name (stable, so tests can compute it)."""
    return hashlib.sha1(username.encode()).hexdigest()[:24]


@dataclass
class Token:
    """One user, on-behalf-of or app token as the server keeps it."""

    value: str
    user: str  # the user id it authenticates as (for app tokens: the creator, or "")
    kind: Kind
    expires_at: float | None  # None: until expired with PATCH / removed with DELETE
    created_by: str | None = None  # the user id that made an on-behalf-of token

    def valid(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at


@dataclass
class EnfixState:
    users: dict[str, str]  # user name → password
    user_token_lifetime: float
    app_tokens: dict[str, Token] = field(default_factory=dict)
    tokens: dict[str, Token] = field(default_factory=dict)
    # counters
    logins: int = 0  # successful logins
    login_failures: int = 0  # logins refused (bad app token or credentials)
    obo_created: Counter[str] = field(default_factory=Counter)  # user id → on-behalf-of tokens made
    app_tokens_created: int = 0
    issued: list[str] = field(default_factory=list)  # user + on-behalf-of tokens made by login / POST tokens, in order
    expired: list[str] = field(default_factory=list)  # tokens (any kind) expired by PATCH or removed by DELETE
    requests: list[dict[str, Any]] = field(default_factory=list)  # protected-resource requests seen
    # switches
    login_delay: float = 0.0  # seconds each login takes (widens single-flight windows)
    obo_delay: float = 0.0
    fail_with: int | None = None  # answer the credential endpoints with this status (e.g. 503)

    # ---- helpers for tests and the demo
    def issue(self, username: str, lifetime: float | None = None) -> str:
        """A user token made outside authproxy (e.g. in the web UI), for ``token:``."""
        value = secrets.token_hex(20)
        self.tokens[value] = Token(value, user_id(username), "fixed", _deadline(lifetime))
        return value

    def add_app_token(self, value: str | None = None, lifetime: float | None = None) -> str:
        value = value or secrets.token_hex(20)
        self.app_tokens[value] = Token(value, "", "app", _deadline(lifetime))
        return value

    def kill(self, value: str) -> None:
        """Invalidate one token server-side (an admin, a password change...)."""
        for table in (self.tokens, self.app_tokens):
            if value in table:
                table[value].expires_at = time.time()

    def kill_user(self, username: str) -> int:
        """Invalidate every login token of a user; returns how many were valid."""
        uid, now, n = user_id(username), time.time(), 0
        for t in self.tokens.values():
            if t.user == uid and t.kind == "login" and t.valid(now):
                t.expires_at = now
                n += 1
        return n

    def valid_tokens(self, kind: Kind | None = None) -> list[str]:
        now = time.time()
        return [t.value for t in self.tokens.values() if t.valid(now) and (kind is None or t.kind == kind)]

    def app_token_valid(self, value: str) -> bool:
        t = self.app_tokens.get(value)
        return t is not None and t.valid(time.time())

    def summary(self) -> str:
        obo = sum(self.obo_created.values())
        return f"logins: {self.logins}, on-behalf-of tokens created: {obo}, tokens expired: {len(self.expired)}"


def _deadline(lifetime: float | None) -> float | None:
    return None if lifetime is None else time.time() + lifetime


# --------------------------------------------------------------------------- replies


def _error(status: int, doc: dict[str, Any], **headers: str) -> web.Response:
    if status == 401:
        headers.setdefault("WWW-Authenticate", "Token")
    return web.json_response(doc, status=status, headers=headers)


class _Reject(Exception):
    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def _guarded(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def run(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except _Reject as r:
            return r.response

    return run


def _state(request: web.Request) -> EnfixState:
    return request.app[STATE]


def _check_outage(state: EnfixState) -> None:
    if state.fail_with is not None:
        raise _Reject(_error(state.fail_with, {"detail": "Service temporarily unavailable, try again later."}))


def _check_app_token(request: web.Request) -> None:
    value = request.headers.get("App-Token")
    if not value:
        raise _Reject(_error(401, {"detail": "Authentication credentials were not provided."}))
    if not _state(request).app_token_valid(value):
        raise _Reject(_error(401, {"detail": "Invalid app token."}))


def _authenticate(request: web.Request) -> Token:
    """Both headers valid → the user token; else the DRF 401."""
    _check_app_token(request)
    value = request.headers.get("Token")
    if not value:
        raise _Reject(_error(401, {"detail": "Authentication credentials were not provided."}))
    tok = _state(request).tokens.get(value)
    if tok is None or not tok.valid(time.time()):
        raise _Reject(_error(401, {"detail": "Invalid token."}))
    return tok


async def _json_body(request: web.Request, allowed: set[str]) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise _Reject(_error(415, {"detail": f'Unsupported media type "{request.content_type}" in request.'}))
    try:
        doc = json.loads(await request.read())
    except ValueError as e:
        raise _Reject(_error(400, {"detail": f"JSON parse error - {e}"})) from None
    if not isinstance(doc, dict):
        raise _Reject(_error(400, {"detail": "Expected a JSON object."}))
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise _Reject(_error(400, {"errors": {k: "Unknown field." for k in unknown}}))
    return doc


def _seconds(doc: dict[str, Any], allow_negative: bool) -> int:
    n = doc.get("seconds_until_expire")
    if n is None:
        raise _Reject(_error(400, {"errors": {"seconds_until_expire": "This field is required."}}))
    if not isinstance(n, int) or isinstance(n, bool) or (n <= 0 and not allow_negative):
        raise _Reject(_error(400, {"errors": {"seconds_until_expire": "A positive integer is required."}}))
    return n
