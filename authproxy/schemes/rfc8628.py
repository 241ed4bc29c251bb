"""RFC 8628 — the device authorization grant: a login for a machine without a browser.

A sidecar or an SSH session cannot receive a redirect, so the roles are split:
authproxy asks the device authorization endpoint for a pair of codes (§3.1–3.2),
shows the person the short ``user_code`` and where to enter it (any device with a
browser, e.g. a phone scanning the QR code), and polls the token endpoint with
the long ``device_code`` until the person has said yes or no (§3.4–3.5). The
device code is a credential in its own right (whoever holds it gets the tokens
once the person approves), so it is never shown and is masked in any error text.

Polling is where servers are strict: faster than ``interval`` earns ``slow_down``
(and the interval grows by 5 s for good), and a client that keeps hammering may
be cut off. The wait is bounded by the device code's ``expires_in``. A transport
failure (the server unreachable, a 5xx) doubles the interval, as §3.5 asks.

What a successful poll returns is stored exactly as the authorization-code login
stores its exchange (:meth:`OAuth2Scheme.store_login`), so the running proxy uses it.
"""

from __future__ import annotations

import asyncio
import io
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable
from urllib.parse import urlsplit

from authproxy.schemes.base import CliIO, CredentialError, NotSupported
from authproxy.schemes.rfc6749 import OAuthError, TokenEndpoint, TokenReply, clean_text, oauth_error
from authproxy.secret import Secret

if TYPE_CHECKING:
    from authproxy.schemes.oauth2 import OAuth2Scheme

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"
DEFAULT_INTERVAL = 5.0  # §3.2: when the server gives no interval
SLOW_DOWN_STEP = 5.0  # §3.5: slow_down adds this to the interval, for the rest of the login
MIN_INTERVAL = 1.0  # never poll faster, whatever the server says
MAX_BACKOFF = 60.0  # transport failures double the interval up to this

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[Any]]


@dataclass(eq=False)
class DeviceAuthorization:
    """A device authorization response (§3.2). ``repr`` never shows the device code."""

    device_code: Secret = field(repr=False)
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: float
    interval: float


# --------------------------------------------------------------------------- §3.1–3.2: the request


async def request_codes(endpoint: TokenEndpoint, url: str, scope: str | None) -> DeviceAuthorization:
    """POST ``client_id`` (+ ``scope``) to the device authorization endpoint. A client
    with credentials authenticates exactly as at the token endpoint (§3.1), so the
    endpoint's client authentication is reused; ``extra_params`` (e.g. an ``audience``
    some servers want here too) go along as they do to the token endpoint."""
    params = dict(endpoint.extra_params)
    if scope:
        params["scope"] = scope
    what = "device authorization request"
    reply, masks = await endpoint.post(url, params, what=what)
    if reply.status != 200:
        raise oauth_error(endpoint.ctx, reply, what, masks)
    try:
        doc = reply.json()
    except CredentialError:
        doc = None
    if not isinstance(doc, dict):
        raise CredentialError(f"{what}: {reply.url} answered 200 with a body that is not a JSON object")
    return parse_codes(doc, f"{what}: {reply.url}")


def parse_codes(doc: dict[str, Any], where: str) -> DeviceAuthorization:
    """The §3.2 reply, checked: everything shown to the person must be printable text
    (a server's control characters must not reach the terminal), the URIs http(s)."""
    device_code = doc.get("device_code")
    if not isinstance(device_code, str) or not device_code:
        raise CredentialError(f"{where} answered without a device_code")
    user_code = _shown(doc.get("user_code"), "user_code", where, 64)
    # Some servers (Google's) still say verification_url, the name of the RFC's drafts.
    uri = _url(doc.get("verification_uri", doc.get("verification_url")), "verification_uri", where)
    complete = doc.get("verification_uri_complete")
    complete_uri = None if complete is None else _url(complete, "verification_uri_complete", where)
    expires_in = _seconds(doc.get("expires_in"), "expires_in", where)
    if expires_in is None:
        raise CredentialError(f"{where} answered without expires_in")
    interval = _seconds(doc.get("interval"), "interval", where)
    return DeviceAuthorization(
        device_code=Secret(device_code),
        user_code=user_code,
        verification_uri=uri,
        verification_uri_complete=complete_uri,
        expires_in=expires_in,
        interval=max(MIN_INTERVAL, DEFAULT_INTERVAL if interval is None else interval),
    )


def _shown(value: Any, name: str, where: str, limit: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise CredentialError(f"{where} answered without a {name}")
    if len(value) > limit or any(unicodedata.category(c) in ("Cc", "Cf") for c in value):
        raise CredentialError(f"{where} answered with a {name} that cannot be shown (control characters or too long)")
    return value


def _url(value: Any, name: str, where: str) -> str:
    text = _shown(value, name, where, 2000)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or " " in text:
        raise CredentialError(f"{where} answered with a {name} that is not an http(s) URL: {clean_text(text, 80)!r}")
    return text


def _seconds(value: Any, name: str, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise CredentialError(f"{where} answered with a {name} that is not a number")
    try:
        seconds = float(value)
    except ValueError:
        raise CredentialError(f"{where} answered with a {name} that is not a number") from None
    if not 0 < seconds < 86400 * 7:
        raise CredentialError(f"{where} answered with {name} {clean_text(str(value), 20)}, not a sensible number of seconds")
    return seconds


# --------------------------------------------------------------------------- §3.4–3.5: polling


async def poll(
    endpoint: TokenEndpoint,
    auth: DeviceAuthorization,
    *,
    clock: Clock = time.monotonic,
    sleep: Sleep = asyncio.sleep,
    on_poll: Callable[[float], None] | None = None,
) -> tuple[TokenReply, float]:
    """Poll the token endpoint until the person approves → (token reply, wall-clock
    time the successful request was sent). Waits ``interval`` before every request,
    never past the device code's lifetime. ``on_poll(interval)`` is told of each
    request (a progress dot). Raises CredentialError with the server's words on
    ``access_denied`` / ``expired_token`` or any other error."""
    interval = auth.interval
    deadline = clock() + auth.expires_in
    last_failure: str | None = None
    params = {"grant_type": GRANT_TYPE, "device_code": auth.device_code.reveal()}
    while True:
        remaining = deadline - clock()
        await sleep(max(0.0, min(interval, remaining)))
        if clock() >= deadline:
            why = f"; the last poll failed: {last_failure}" if last_failure else ""
            raise CredentialError(
                f"the user code {auth.user_code} expired (after {auth.expires_in:g} s) before the login was approved{why}; "
                "run login again"
            )
        if on_poll is not None:
            on_poll(interval)
        started = time.time()
        try:
            reply = await endpoint.request(params, what="device token request", secrets=(auth.device_code,))
            return reply, started
        except OAuthError as e:
            if e.error == "authorization_pending":
                continue
            if e.error == "slow_down":
                interval += SLOW_DOWN_STEP
                continue
            if e.error == "access_denied":
                raise CredentialError(f"login refused by the person or the server: {e.message}", refused=True) from None
            if e.error == "expired_token":
                raise CredentialError(f"the user code expired before the login was approved: {e.message}; run login again") from None
            if e.error is not None or e.status < 500:
                raise
            last_failure = e.message  # a 5xx without an OAuth error: the server is struggling
        except CredentialError as e:  # the server could not be reached
            last_failure = e.message
        interval = min(MAX_BACKOFF, interval * 2)


# --------------------------------------------------------------------------- the login


async def login(scheme: "OAuth2Scheme", cli: CliIO, *, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
    """``authproxy login SERVICE`` on ``grant: device_code``, or ``login --device`` on an
    ``authorization_code`` service that names its device authorization endpoint."""
    cfg = scheme.config
    name = scheme.name
    if cfg.grant not in ("device_code", "authorization_code"):
        raise NotSupported(
            f"login is for a person's login (grant: authorization_code or device_code); {name} uses {cfg.grant}, "
            f"which needs none (`authproxy token {name}` shows it working)"
        )
    if cfg.device_authorization_url is None:
        raise NotSupported(
            f"login --device needs device_authorization_url (the server's RFC 8628 device authorization endpoint) "
            f"in {name}'s auth settings; without it, run `authproxy login {name}` for the browser login"
        )
    if scheme.setup_error is not None:
        raise CredentialError(scheme.setup_error)
    auth = await request_codes(scheme.endpoint, cfg.device_authorization_url, cfg.scope)
    cli.say(instructions(name, auth))
    reply, started = await poll(scheme.endpoint, auth, clock=clock, sleep=sleep)
    await scheme.store_login(reply, started, keep_access=True)
    if reply.refresh_token is not None:
        cli.say(
            f"Logged in: {name}'s refresh token is stored in {scheme.ctx.store.where}.\n"
            f"A running proxy uses it from its next request; `authproxy token {name}` prints an access token."
        )
        return
    until = "until the upstream rejects it" if reply.expires_in is None else f"for {reply.expires_in / 60:.0f} minutes"
    cli.say(
        f"Logged in, but the server issued no refresh token: {name}'s access token is stored in "
        f"{scheme.ctx.store.where} and used {until}; then run `authproxy login {name}` again "
        "(some servers issue refresh tokens only with an offline_access scope)."
    )


def instructions(name: str, auth: DeviceAuthorization) -> str:
    """What the person reads: where to go, the code to type, and a QR code of the URL
    that carries the code (a phone's camera opens it with nothing to type)."""
    lines = [
        f"To log in to {name}, open this page on any device with a browser:",
        "",
        f"  {auth.verification_uri}",
        "",
        f"and enter the code:  {auth.user_code}",
    ]
    if auth.verification_uri_complete:
        lines += ["", "Or open (or scan) this URL, which carries the code:", "", f"  {auth.verification_uri_complete}", ""]
        qr = qr_code(auth.verification_uri_complete)
        if qr:
            lines.append(qr.rstrip("\n"))
    minutes = auth.expires_in / 60
    lines += ["", f"Waiting up to {minutes:.0f} minute{'s' if round(minutes) != 1 else ''} for the approval (Ctrl-C to cancel)..."]
    return "\n".join(lines)


def qr_code(url: str) -> str:
    """The QR code drawn with Unicode half blocks (two modules a character, so it fits
    a terminal); ANSI colours where the output cannot encode those blocks; '' if the
    URL is too long for a QR code."""
    import segno

    try:
        code = segno.make(url, error="m")
    except segno.DataOverflowError:
        return ""
    buf = io.StringIO()
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        "█▀▄".encode(encoding)
        compact = True
    except (UnicodeEncodeError, LookupError):
        compact = False
    code.terminal(out=buf, compact=compact)
    return buf.getvalue()
