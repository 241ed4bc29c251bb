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
It, the tokens and the checks are :mod:`authproxy.testing.enfix_model`; this
module is the endpoints, the app and the demo.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any, Awaitable, Callable, Literal

from aiohttp import web

from authproxy.testing.enfix_model import (  # re-exported: what tests and users use
    BAD_IDS,
    DEMO_APP_TOKEN,
    DEMO_PASSWORD,
    DEMO_USER,
    STATE,
    USER_ID_RE,
    EnfixState,
    Kind,
    Token,
    _authenticate,
    _check_app_token,
    _check_outage,
    _deadline,
    _error,
    _guarded,
    _json_body,
    _Reject,
    _seconds,
    _state,
    user_id,
)

__all__ = ["STATE", "EnfixState", "Token", "Kind", "make_app", "demo", "user_id", "DEMO_APP_TOKEN", "DEMO_USER", "DEMO_PASSWORD", "USER_ID_RE", "BAD_IDS"]


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
