"""A mock of an Enfix LP-style REST API: ``App-Token`` + ``Token`` headers.

It is strict on purpose, so that a scheme (or a user's config) that gets the
protocol slightly wrong fails here rather than against the real service:

- ``POST {base}/api/v1/token/`` — form-encoded ``username=&password=`` with a valid
  ``App-Token``; answers ``{"token": "..."}``. The token dies after
  ``user_token_lifetime`` seconds and the reply never says so (as the real API).
- ``POST {base}/api/v1/tokens/`` — JSON ``{"seconds_until_expire": N, "user": ID}``
  (ID = 24 lower-case hex digits) with both headers: an on-behalf-of token.
- ``POST {base}/api/v1/app_tokens/`` — JSON ``{"seconds_until_expire": N}``: a new app token.
- ``GET``/``PATCH``/``DELETE {base}/api/v1/tokens/<token>/`` (and ``app_tokens``):
  ``PATCH {"seconds_until_expire": -1}`` expires it now; ``PUT`` is 405.
- anything else under ``{base}/api/v1/`` is a protected resource echoing who it saw.

Errors are DRF-shaped: ``401 {"detail": "Invalid token."}`` for an expired or
unknown token, ``400 {"errors": {"user": "..."}}`` for a bad id, 415 for a body of
the wrong media type, 405 with ``Allow`` for a wrong method.

``app[STATE]`` (an :class:`EnfixState`) counts logins, on-behalf-of creations
per user and expirations, and has switches (delays, a forced error status) and
helpers (issue a token "made in the web UI", kill a token) for tests and the demo.
"""

from __future__ import annotations

import asyncio
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


# --------------------------------------------------------------------------- credential endpoints


@_guarded
async def _login(request: web.Request) -> web.Response:
    state = _state(request)
    _check_outage(state)
    if request.content_type != "application/x-www-form-urlencoded":
        return _error(415, {"detail": f'Unsupported media type "{request.content_type}" in request.'})
    try:
        _check_app_token(request)
    except _Reject:
        state.login_failures += 1
        raise
    form = await request.post()
    missing = {k: ["This field is required."] for k in ("username", "password") if not form.get(k)}
    if missing:
        return _error(400, missing)
    username, password = str(form["username"]), str(form["password"])
    known = state.users.get(username)
    if known is None or not secrets.compare_digest(known.encode(), password.encode()):
        state.login_failures += 1
        return _error(401, {"detail": "Invalid username/password."})
    if state.login_delay:
        await asyncio.sleep(state.login_delay)
    value = secrets.token_hex(20)
    state.tokens[value] = Token(value, user_id(username), "login", _deadline(state.user_token_lifetime))
    state.logins += 1
    state.issued.append(value)
    return web.json_response({"token": value})


@_guarded
async def _create_obo(request: web.Request) -> web.Response:
    state = _state(request)
    _check_outage(state)
    me = _authenticate(request)
    doc = await _json_body(request, {"seconds_until_expire", "user"})
    seconds = _seconds(doc, allow_negative=False)
    uid = doc.get("user")
    if not isinstance(uid, str) or not USER_ID_RE.fullmatch(uid):
        return _error(400, {"errors": {"user": BAD_IDS}})
    if state.obo_delay:
        await asyncio.sleep(state.obo_delay)
    value = secrets.token_hex(20)
    state.tokens[value] = Token(value, uid, "obo", time.time() + seconds, created_by=me.user)
    state.obo_created[uid] += 1
    state.issued.append(value)
    return web.json_response({"token": value}, status=201)


@_guarded
async def _create_app_token(request: web.Request) -> web.Response:
    state = _state(request)
    _check_outage(state)
    me = _authenticate(request)
    doc = await _json_body(request, {"seconds_until_expire"})
    seconds = _seconds(doc, allow_negative=False)
    value = secrets.token_hex(20)
    state.app_tokens[value] = Token(value, me.user, "app", time.time() + seconds)
    state.app_tokens_created += 1
    return web.json_response({"app_token": value}, status=201)


def _item(table: Literal["tokens", "app_tokens"]) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """GET / PATCH / DELETE one token; PUT (and anything else) is 405."""

    @_guarded
    async def handle(request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "PATCH", "DELETE"):
            return _error(405, {"detail": f'Method "{request.method}" not allowed.'}, Allow="GET, PATCH, DELETE, HEAD, OPTIONS")
        state = _state(request)
        _check_outage(state)
        me = _authenticate(request)
        tokens = state.tokens if table == "tokens" else state.app_tokens
        target = tokens.get(request.match_info["token"])
        if target is None:
            return _error(404, {"detail": "Not found."})
        if table == "tokens" and me.user not in (target.user, target.created_by):
            return _error(403, {"detail": "You do not have permission to perform this action."})
        now = time.time()
        if request.method == "GET":
            left = None if target.expires_at is None else max(0, round(target.expires_at - now))
            return web.json_response({"user": target.user, "seconds_until_expire": left})
        if request.method == "DELETE":
            del tokens[target.value]
            state.expired.append(target.value)
            return web.Response(status=204)
        doc = await _json_body(request, {"seconds_until_expire"})
        seconds = _seconds(doc, allow_negative=True)
        if seconds <= 0:
            if target.valid(now):
                state.expired.append(target.value)
            target.expires_at = now
        else:
            target.expires_at = now + seconds
        left = max(0, round(target.expires_at - now))
        return web.json_response({"user": target.user, "seconds_until_expire": left})

    return handle


async def _post_only(request: web.Request) -> web.Response:
    return _error(405, {"detail": f'Method "{request.method}" not allowed.'}, Allow="POST, OPTIONS")


# --------------------------------------------------------------------------- the protected resource


@_guarded
async def _resource(request: web.Request) -> web.Response:
    state = _state(request)
    me = _authenticate(request)
    names = {v: k for k, v in ((n, user_id(n)) for n in state.users)}
    entry = {
        "method": request.method,
        "path": request.path,
        "user_id": me.user,
        "user": names.get(me.user, me.user),
        "via": me.kind,  # login | obo | fixed
        "app_token": request.headers.get("App-Token"),
        "token": request.headers.get("Token"),
        "header_names": sorted(k.lower() for k in request.headers),
        "body": (await request.read()).decode("utf-8", "replace")[:1000],
    }
    state.requests.append(entry)
    del state.requests[:-1000]
    return web.json_response({k: v for k, v in entry.items() if k not in ("app_token", "token", "header_names")})


# --------------------------------------------------------------------------- the app


def make_app(
    *,
    app_token: str = DEMO_APP_TOKEN,
    users: dict[str, str] | None = None,
    user_token_lifetime: float = 86400.0,
    base: str = "",
    login_delay: float = 0.0,
    obo_delay: float = 0.0,
) -> web.Application:
    """The mock, serving under ``base`` (an upstream base path). ``users`` maps user
    names to passwords (default: ``demo`` / ``demo-password``)."""
    app = web.Application()
    state = EnfixState(
        users=dict(users) if users is not None else {DEMO_USER: DEMO_PASSWORD},
        user_token_lifetime=user_token_lifetime,
        login_delay=login_delay,
        obo_delay=obo_delay,
    )
    state.add_app_token(app_token)
    app[STATE] = state
    api = base + "/api/v1"
    r = app.router
    r.add_route("POST", api + "/token/", _login)
    r.add_route("POST", api + "/tokens/", _create_obo)
    r.add_route("POST", api + "/app_tokens/", _create_app_token)
    for path in ("/token/", "/tokens/", "/app_tokens/"):
        r.add_route("*", api + path, _post_only)
    r.add_route("*", api + "/tokens/{token}/", _item("tokens"))
    r.add_route("*", api + "/app_tokens/{token}/", _item("app_tokens"))
    r.add_route("*", api + "/{tail:.*}", _resource)
    return app


# --------------------------------------------------------------------------- authproxy demo

ALICE = "5f1e0c9a7b3d2e4f6a8b9c0d"  # an on-behalf-of user the demo allows
MALLORY = "00000000000000000000beef"  # one it does not


def demo() -> Any:
    """``authproxy demo``: log in once, on-behalf-of, a forbidden id, and healing
    after the upstream kills the service user's token."""
    from authproxy.testing import DemoService, TourStep

    app = make_app()
    state = app[STATE]

    def config(base_url: str) -> dict[str, Any]:
        return {
            "upstream": base_url,
            "auth": {
                "scheme": "app_token",
                "app_token": DEMO_APP_TOKEN,
                "username": DEMO_USER,
                "password": DEMO_PASSWORD,
                "obo": {"allow_users": [ALICE], "seconds_until_expire": 3600},
            },
        }

    def who(status: int, headers: dict[str, str], body: bytes) -> str:
        try:
            doc = json.loads(body)
        except ValueError:
            return body[:120].decode("utf-8", "replace")
        if "user" in doc and "via" in doc:
            return f"upstream saw user={doc['user']} via {doc['via']} token  (logins so far: {state.logins})"
        return json.dumps(doc)[:160]

    def kill() -> None:
        state.kill_user(DEMO_USER)

    tour = [
        TourStep("No credentials from the client: authproxy logs in once and adds App-Token + Token",
                 path="/enfix/api/v1/projects/", show=who),
        TourStep("A client-sent Token header is replaced, never forwarded",
                 path="/enfix/api/v1/projects/", headers={"Token": "client-guess"}, show=who),
        TourStep("On behalf of an allowed user: an OBO token is created for her and cached",
                 path="/enfix/api/v1/projects/", headers={"X-Authproxy-On-Behalf-Of": ALICE}, show=who),
        TourStep("A user id not in obo.allow_users: 403 obo_forbidden, nothing sent upstream",
                 path="/enfix/api/v1/projects/", headers={"X-Authproxy-On-Behalf-Of": MALLORY}, expect=403),
        TourStep("The upstream invalidates the service user's token (as an admin or a password change would)", action=kill),
        TourStep("Recovery: the 401 makes authproxy log in again and replay the request once",
                 path="/enfix/api/v1/projects/", show=who),
    ]
    return DemoService(name="enfix", app=app, config=config, tour=tour, summary=state.summary)
