"""The mock FogBugz's model: people and their tokens, logon and logoff, the
token checks (as strict as FogBugz, and stricter where a client could be
careless), the counters a test reads, and FogBugz's error replies in XML and
JSON. The HTTP side is :mod:`authproxy.testing.fogbugz`.
"""

from __future__ import annotations

import secrets
import string
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from aiohttp import web

DEMO_EMAIL = "demo@example.com"
DEMO_PASSWORD = "demo-password"
DEMO_API_TOKEN = "demo-api-token"
JSON_API = "/f/api/0/jsonapi"
XML_TYPE = "text/xml; charset=utf-8"
LOCK_WINDOW = 60.0
_TOKEN_ALPHABET = string.ascii_lowercase + string.digits


@dataclass
class Person:
    full_name: str
    email: str
    password: str
    two_factor: bool = False


@dataclass
class FogBugzState:
    """What a test counts or flips. Tokens map to the person's full name."""

    people: list[Person] = field(default_factory=list)
    tokens: dict[str, str] = field(default_factory=dict)  # live token → full name
    api_tokens: set[str] = field(default_factory=set)  # the live ones made "in the web UI"
    lock_after: int = 10
    locked: bool = False
    logons: int = 0  # successful cmd=logon
    logon_failures: int = 0
    logon_attempts: list[float] = field(default_factory=list)  # monotonic time of every cmd=logon
    failure_times: list[float] = field(default_factory=list)  # ... of every failed one
    logoffs: int = 0  # cmd=logoff of a live token
    logged_off: list[str] = field(default_factory=list)
    valid_requests: int = 0  # API calls (other than logon/logoff) with a live token
    invalid_requests: int = 0  # ... with a missing or dead token
    xml_requests: int = 0
    json_requests: int = 0
    queries: list[str] = field(default_factory=list)  # every raw query string (the last 1000)
    secrets_in_url: list[str] = field(default_factory=list)  # cmd=logon with email/password in the query
    conflicting_tokens: int = 0
    prefer_body_token: bool = False  # instead of refusing a query and a body token that differ, use the body's
    multipart_requests: int = 0  # XML API calls with a multipart/form-data body
    attachments: list[tuple[str, bytes]] = field(default_factory=list)  # (file name, content) of every file sent
    json_error_status: int = 400  # the HTTP status of a JSON API error reply
    logon_delay: float = 0.0  # seconds cmd=logon takes (to hold many clients on one logon)
    cdata: bool = True  # wrap the logon token in CDATA (FogBugz does; both forms are valid)
    issued: list[str] = field(default_factory=list)  # every token ever made (tests register them as secrets)

    # ---- switches
    def kill_all_tokens(self) -> int:
        """End every token, logon and API alike — what a password change does. Returns how many."""
        n = len(self.tokens)
        self.tokens.clear()
        self.api_tokens.clear()
        return n

    def make_api_token(self, full_name: str | None = None) -> str:
        """A token as "Create API Token" in the web UI makes it."""
        token = _new_token()
        self.api_tokens.add(token)
        self.tokens[token] = full_name or (self.people[0].full_name if self.people else "API")
        self.issued.append(token)
        return token

    # ---- derived
    def logons_in(self, seconds: float) -> int:
        now = time.monotonic()
        return sum(1 for t in self.logon_attempts if now - t <= seconds)

    def summary(self) -> str:
        return (
            f"logons: {self.logons}, logon failures: {self.logon_failures}, logoffs: {self.logoffs}, "
            f"requests with a live token: {self.valid_requests}, with a dead one: {self.invalid_requests}"
        )


def _new_token() -> str:
    return "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(30))


# --------------------------------------------------------------------------- replies


class Refusal(Exception):
    """A FogBugz error reply: ``code`` and message (and for error 2, the people)."""

    def __init__(self, code: int, message: str, people: list[str] | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.people = people or []
        self.status = status  # None: the API's usual status for errors


def xml(inner: str, status: int = 200) -> web.Response:
    body = f'<?xml version="1.0" encoding="UTF-8"?>\n<response>{inner}</response>'
    return web.Response(status=status, body=body.encode(), headers={"Content-Type": XML_TYPE})


def cdata(text: str) -> str:
    return "<![CDATA[" + text.replace("]]>", "]]]]><![CDATA[>") + "]]>"


def xml_error(e: Refusal) -> web.Response:
    people = "".join(f"<person>{cdata(p)}</person>" for p in e.people)
    return xml(f'<error code="{e.code}">{cdata(e.message)}</error>' + (f"<people>{people}</people>" if people else ""), e.status or 200)


def json_reply(state: FogBugzState, data: Any, errors: list[dict[str, Any]] | None = None, status: int = 200, **extra: Any) -> web.Response:
    doc: dict[str, Any] = {
        "data": data,
        "errors": errors or [],
        "warnings": [],
        "meta": {"jsdbInvalidator": "mock", "clientVersionAllowed": {"min": 1, "max": 1}},
        "errorCode": status if errors else None,
        "maxCacheAge": None,
        **extra,
    }
    return web.json_response(doc, status=status)


def json_error(state: FogBugzState, e: Refusal) -> web.Response:
    errors = [{"message": e.message, "detail": None, "code": str(e.code)}]
    extra = {"people": e.people} if e.people else {}
    return json_reply(state, {}, errors, e.status or state.json_error_status, **extra)


# --------------------------------------------------------------------------- the API


def token_of(request_query: list[tuple[str, str]], body: Iterable[tuple[str, Any]], state: FogBugzState) -> str | None:
    """The request's token; two different ones are refused (FogBugz would pick one silently)."""
    found = {v for k, v in request_query if k.lower() == "token"}
    in_body = {str(v) for k, v in body if k.lower() == "token"}
    if state.prefer_body_token and in_body:
        found = in_body  # the lenient way: the body's token wins, silently
    found |= in_body
    if len(found) > 1:
        state.conflicting_tokens += 1
        raise Refusal(0, "Mock FogBugz: the request carries more than one token", status=400)
    return next(iter(found), None) or None


def logon(state: FogBugzState, args: dict[str, Any], query: list[tuple[str, str]]) -> str:
    now = time.monotonic()
    state.logon_attempts.append(now)
    if any(k.lower() in ("email", "password") for k, _ in query):
        raise Refusal(1, "Mock FogBugz: email and password belong in the POST body, never in the URL", status=400)
    email = str(args.get("email") or "")
    password = str(args.get("password") or "")
    if state.locked:
        state.logon_failures += 1
        raise Refusal(1, "Account locked after too many failed logons")
    matches = [p for p in state.people if email and (p.email.lower() == email.lower() or p.full_name == email)]
    if len(matches) > 1:
        state.logon_failures += 1
        raise Refusal(2, "Ambiguous Logon", [p.full_name for p in matches])
    person = matches[0] if matches else None
    if person is None or not secrets.compare_digest(person.password.encode(), password.encode()):
        state.logon_failures += 1
        state.failure_times.append(now)
        recent = sum(1 for t in state.failure_times if now - t <= LOCK_WINDOW)
        if state.lock_after and recent >= state.lock_after:
            state.locked = True
        raise Refusal(1, "Incorrect password or username")
    if person.two_factor:
        state.logon_failures += 1
        raise Refusal(1, "Two-factor authentication is enabled for this account; use an API token")
    token = _new_token()
    state.tokens[token] = person.full_name
    state.issued.append(token)
    state.logons += 1
    return token


def logoff(state: FogBugzState, token: str | None) -> None:
    if not token or token not in state.tokens:
        raise Refusal(3, "Not logged on")
    del state.tokens[token]
    state.api_tokens.discard(token)
    state.logoffs += 1
    state.logged_off.append(token)


def authorised(state: FogBugzState, token: str | None) -> str:
    """The person a live token belongs to; error 3 otherwise."""
    person = state.tokens.get(token or "")
    if person is None:
        state.invalid_requests += 1
        raise Refusal(3, "Not logged on")
    state.valid_requests += 1
    return person


def cases(query: str) -> list[dict[str, Any]]:
    return [{"ixBug": 1, "sTitle": f"Mock case matching {query!r}" if query else "Mock case", "sStatus": "Active"}]
