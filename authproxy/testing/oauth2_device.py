"""The strict OAuth 2.0 mock's device authorization grant (RFC 8628).

- ``POST /auth/device``: the device authorization endpoint (§3.1–3.2); the client
  authenticates exactly as at the token endpoint (a public client names itself);
- ``GET /device`` shows the person a form for the user code (pre-filled from
  ``?user_code=``, as ``verification_uri_complete`` opens it); ``POST /device``
  with ``user_code`` and ``action=approve|deny`` is the person's answer. A test
  drives these pages over HTTP like a browser;
- ``grant_type=urn:ietf:params:oauth:grant-type:device_code`` at the token
  endpoint, strict as a certified server: ``authorization_pending`` until the
  person answers, ``slow_down`` for a poll sooner than ``interval`` after the
  previous one (or after the codes were issued) — and the interval then grows by
  5 s —, ``expired_token`` after ``expires_in``, ``access_denied`` if denied, a
  device code good for one token reply, and only for the client it was issued to.

``app[DEVICE]`` holds the switches and what tests read (each poll's time).
"""

from __future__ import annotations

import hmac
import html
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import quote

from aiohttp import web

from authproxy.testing.oauth2_client_auth import authenticate
from authproxy.testing.oauth2_grants import GRANTS, scope_for
from authproxy.testing.oauth2_model import Grant, OAuth2State, OAuthFail

DEVICE_PATH = "/auth/device"
VERIFY_PATH = "/device"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"  # §6.1: no vowels (no words), no look-alike digits


@dataclass
class DeviceCode:
    client_id: str
    scope: str
    user_code: str  # normalised: upper case, no dash
    expires_at: float
    interval: float
    last_poll: float  # the issue time counts as the first request
    status: str = "pending"  # pending | approved | denied | used
    polls: list[float] = field(default_factory=list)  # clock() of each token request


@dataclass
class DeviceState:
    interval: int = 5  # announced interval; 0: announce none (the client must assume 5)
    expires_in: int = 600
    send_complete: bool = True  # verification_uri_complete in the reply
    issue_refresh_tokens: bool = True
    slow_down_next: int = 0  # answer this many next polls with slow_down (a busy server)
    clock: Callable[[], float] = time.monotonic
    codes: dict[str, DeviceCode] = field(default_factory=dict)  # device_code → record
    requests: list[dict[str, str]] = field(default_factory=list)  # each authorization request's form, secrets as ***
    methods: list[str] = field(default_factory=list)  # the client authentication of each authorization request
    errors: list[str] = field(default_factory=list)  # each polling error sent, in order

    def by_user_code(self, user_code: str) -> DeviceCode | None:
        wanted = normalise(user_code)
        for rec in self.codes.values():
            if hmac.compare_digest(rec.user_code.encode(), wanted.encode()):
                return rec
        return None

    def expire_all(self) -> None:
        """Every device code issued so far expires now (the server's clock ran out)."""
        for rec in self.codes.values():
            rec.expires_at = self.clock() - 1

    @property
    def polls(self) -> list[float]:
        return [t for rec in self.codes.values() for t in rec.polls]


def normalise(user_code: str) -> str:
    """§6.1: the person may type it in lower case, with or without the dash."""
    return "".join(c for c in user_code.upper() if c.isalnum())


def _shown(user_code: str) -> str:
    return f"{user_code[:4]}-{user_code[4:]}"


# --------------------------------------------------------------------------- §3.1–3.2


async def _authorize_device(request: web.Request) -> web.Response:
    dev = request.app[DEVICE]
    from authproxy.testing.oauth2 import _form  # the token endpoint's strict form reading

    try:
        form = await _form(request)
        client, method = authenticate(request, form)
        if client.grants is not None and GRANT_TYPE not in client.grants:
            raise OAuthFail("unauthorized_client", "this client may not use the device authorization grant")
        scope = scope_for(client, form.get("scope"), None)
    except OAuthFail as e:
        return e.response()
    dev.requests.append({k: "***" if k in ("client_secret", "client_assertion") else v for k, v in form.items()})
    dev.methods.append(method)
    device_code = "dc-" + secrets.token_urlsafe(32)
    user_code = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(8))
    now = dev.clock()
    interval = dev.interval or 5
    dev.codes[device_code] = DeviceCode(client.client_id, scope, user_code, now + dev.expires_in, interval, now)
    base = f"{request.scheme}://{request.host}{VERIFY_PATH}"
    reply: dict[str, Any] = {"device_code": device_code, "user_code": _shown(user_code), "verification_uri": base, "expires_in": dev.expires_in}
    if dev.send_complete:
        reply["verification_uri_complete"] = f"{base}?user_code={quote(_shown(user_code))}"
    if dev.interval:
        reply["interval"] = dev.interval
    return web.json_response(reply, headers={"Cache-Control": "no-store"})


# --------------------------------------------------------------------------- the person


async def _verify_page(request: web.Request) -> web.Response:
    code = html.escape(request.query.get("user_code", ""))
    body = (
        "<!doctype html><title>Device login</title><h1>Connect a device</h1>"
        f'<form method="post" action="{VERIFY_PATH}"><label>Code <input name="user_code" value="{code}"></label>'
        '<button name="action" value="approve">Approve</button> <button name="action" value="deny">Deny</button></form>\n'
    )
    return web.Response(text=body, content_type="text/html", headers={"Cache-Control": "no-store"})


async def _verify_answer(request: web.Request) -> web.Response:
    dev = request.app[DEVICE]
    form = await request.post()
    rec = dev.by_user_code(str(form.get("user_code", "")))
    action = form.get("action")
    if rec is None or rec.status != "pending" or dev.clock() > rec.expires_at:
        return _page(400, "Unknown code", "That code is unknown, already used or expired.")
    if action not in ("approve", "deny"):
        return _page(400, "Bad request", "action must be approve or deny.")
    rec.status = "approved" if action == "approve" else "denied"
    if action == "approve":
        return _page(200, "Device approved", "The device is now connected. You can close this window.")
    return _page(200, "Device denied", "The device was not connected.")


def _page(status: int, title: str, text: str) -> web.Response:
    body = f"<!doctype html><title>{html.escape(title)}</title><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p>\n"
    return web.Response(status=status, text=body, content_type="text/html", headers={"Cache-Control": "no-store"})


# --------------------------------------------------------------------------- §3.4–3.5: the token endpoint


async def _device_code_grant(request: web.Request, st: OAuth2State, client: Any, form: dict[str, str]) -> dict[str, Any]:
    dev = request.app.get(DEVICE)
    if dev is None:
        raise OAuthFail("unsupported_grant_type", "the device authorization grant is not enabled")
    device_code = form.get("device_code")
    if not device_code:
        raise OAuthFail("invalid_request", "device_code is required")
    rec = dev.codes.get(device_code)
    if rec is None or rec.client_id != client.client_id:
        raise OAuthFail("invalid_grant", "unknown device code")
    now = dev.clock()
    rec.polls.append(now)

    def fail(error: str, description: str) -> OAuthFail:
        dev.errors.append(error)
        return OAuthFail(error, description)

    if rec.status == "used":
        raise fail("invalid_grant", "device code already used")
    if now > rec.expires_at:
        raise fail("expired_token", "the device code has expired")
    too_soon = now - rec.last_poll < rec.interval
    rec.last_poll = now
    if too_soon or dev.slow_down_next > 0:
        dev.slow_down_next = max(0, dev.slow_down_next - 1)
        rec.interval += 5  # §3.5: for this and all later polls
        raise fail("slow_down", f"polling too fast: wait {rec.interval:g} s between requests")
    if rec.status == "denied":
        raise fail("access_denied", "the person denied the request")
    if rec.status == "pending":
        raise fail("authorization_pending", "waiting for the person to approve")
    rec.status = "used"
    grant = Grant(secrets.token_hex(8), client.client_id, rec.scope)
    st.grants[grant.grant_id] = grant
    return st._issue(client, rec.scope, grant, with_refresh=dev.issue_refresh_tokens)


def install(app: web.Application, state: DeviceState | None = None) -> None:
    """Add the device endpoints to a mock app (``make_app`` does)."""
    app[DEVICE] = state or DeviceState()
    app.router.add_post(DEVICE_PATH, _authorize_device)
    app.router.add_get(VERIFY_PATH, _verify_page)
    app.router.add_post(VERIFY_PATH, _verify_answer)


DEVICE: web.AppKey[DeviceState] = web.AppKey("oauth2_device_state")
GRANTS[GRANT_TYPE] = _device_code_grant  # the token endpoint's registry: one grant, one entry
