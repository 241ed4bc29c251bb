"""A mock FogBugz / Manuscript: the XML API (``/api.asp``), the JSON API
(``/f/api/0/jsonapi``), logon and logoff, and the errors a client must handle.

It behaves like the real service where a client can tell — error 1 for a wrong
password or two-factor, error 2 with a ``<people>`` list for an ambiguous
logon, error 3 "Not logged on" for a missing or dead token — and is stricter
than it where a client could be careless:

- an email or password in the URL query is refused, and recorded
  (``state.secrets_in_url``) so a test can assert it never happened;
- a request carrying two different tokens (query and body, or twice in the
  query) is refused: FogBugz would silently pick one;
- an account is locked after ``lock_after`` failed logons within a minute
  (``state.locked``), so a client that hammers a wrong password shows.

``state.kill_all_tokens()`` ends every token, as a password change does.
Run it alone with ``python -m authproxy.testing fogbugz --port 9102``; it
accepts ``demo@example.com`` / ``demo-password`` and the API token
``demo-api-token``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import string
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape

from aiohttp import web

from authproxy.testing import DemoService, TourStep

STATE: web.AppKey["FogBugzState"] = web.AppKey("fogbugz_state")

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


def _xml(inner: str, status: int = 200) -> web.Response:
    body = f'<?xml version="1.0" encoding="UTF-8"?>\n<response>{inner}</response>'
    return web.Response(status=status, body=body.encode(), headers={"Content-Type": XML_TYPE})


def _cdata(text: str) -> str:
    return "<![CDATA[" + text.replace("]]>", "]]]]><![CDATA[>") + "]]>"


def _xml_error(e: Refusal) -> web.Response:
    people = "".join(f"<person>{_cdata(p)}</person>" for p in e.people)
    return _xml(f'<error code="{e.code}">{_cdata(e.message)}</error>' + (f"<people>{people}</people>" if people else ""), e.status or 200)


def _json_reply(state: FogBugzState, data: Any, errors: list[dict[str, Any]] | None = None, status: int = 200, **extra: Any) -> web.Response:
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


def _json_error(state: FogBugzState, e: Refusal) -> web.Response:
    errors = [{"message": e.message, "detail": None, "code": str(e.code)}]
    extra = {"people": e.people} if e.people else {}
    return _json_reply(state, {}, errors, e.status or state.json_error_status, **extra)


# --------------------------------------------------------------------------- the API


def _token_of(request_query: list[tuple[str, str]], body: dict[str, Any], state: FogBugzState) -> str | None:
    """The request's token; two different ones are refused (FogBugz would pick one silently)."""
    found = {v for k, v in request_query if k.lower() == "token"}
    body_token = next((v for k, v in body.items() if k.lower() == "token"), None)
    if body_token is not None:
        found.add(str(body_token))
    if len(found) > 1:
        state.conflicting_tokens += 1
        raise Refusal(0, "Mock FogBugz: the request carries more than one token", status=400)
    return next(iter(found), None) or None


def _logon(state: FogBugzState, args: dict[str, Any], query: list[tuple[str, str]]) -> str:
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


def _logoff(state: FogBugzState, token: str | None) -> None:
    if not token or token not in state.tokens:
        raise Refusal(3, "Not logged on")
    del state.tokens[token]
    state.api_tokens.discard(token)
    state.logoffs += 1
    state.logged_off.append(token)


def _authorised(state: FogBugzState, token: str | None) -> str:
    """The person a live token belongs to; error 3 otherwise."""
    person = state.tokens.get(token or "")
    if person is None:
        state.invalid_requests += 1
        raise Refusal(3, "Not logged on")
    state.valid_requests += 1
    return person


def _cases(query: str) -> list[dict[str, Any]]:
    return [{"ixBug": 1, "sTitle": f"Mock case matching {query!r}" if query else "Mock case", "sStatus": "Active"}]


async def _xml_api(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.xml_requests += 1
    query = parse_qsl(request.query_string, keep_blank_values=True)
    state.queries.append(request.query_string)
    del state.queries[:-1000]
    try:
        if request.method == "POST" and request.content_type not in ("application/x-www-form-urlencoded", "multipart/form-data", ""):
            raise Refusal(0, "Mock FogBugz: the XML API takes form-encoded arguments", status=400)
        form: dict[str, Any] = dict(await request.post()) if request.method == "POST" else {}
        args = {**dict(query), **{k: v for k, v in form.items() if isinstance(v, str)}}
        cmd = args.get("cmd", "")
        if cmd == "logon":
            if any(k.lower() in ("email", "password") for k, _ in query):
                state.secrets_in_url.append(request.query_string)
            await asyncio.sleep(state.logon_delay)
            token = _logon(state, args, query)
            return _xml(f"<token>{_cdata(token) if state.cdata else escape(token)}</token>")
        token = _token_of(query, form, state)
        if cmd == "logoff":
            _logoff(state, token)
            return _xml("")
        person = _authorised(state, token)
        return _xml(_xml_command(cmd, args, person))
    except Refusal as e:
        return _xml_error(e)


def _xml_command(cmd: str, args: dict[str, Any], person: str) -> str:
    if cmd == "search":
        cases = "".join(
            f'<case ixBug="{c["ixBug"]}" operations="edit,resolve"><sTitle>{_cdata(c["sTitle"])}</sTitle><sStatus>{c["sStatus"]}</sStatus></case>'
            for c in _cases(str(args.get("q", "")))
        )
        return f'<cases count="1">{cases}</cases>'
    if cmd == "viewPerson":
        return f"<person><sFullName>{_cdata(person)}</sFullName></person>"
    if cmd == "listProjects":
        return '<projects><project><ixProject>1</ixProject><sProject><![CDATA[Demo]]></sProject></project></projects>'
    if cmd == "new":
        return f'<case ixBug="2" operations="edit"><sTitle>{_cdata(str(args.get("sTitle", "")))}</sTitle></case>'
    raise Refusal(0, f"Unknown command {cmd!r}" if cmd else "No command given")


async def _json_api(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.json_requests += 1
    query = parse_qsl(request.query_string, keep_blank_values=True)
    state.queries.append(request.query_string)
    del state.queries[:-1000]
    try:
        try:
            doc = json.loads(await request.read())
        except ValueError:
            raise Refusal(0, "Mock FogBugz: the JSON API takes a JSON object body", status=400) from None
        if not isinstance(doc, dict):
            raise Refusal(0, "Mock FogBugz: the JSON API takes a JSON object body", status=400)
        cmd = doc.get("cmd", "")
        if cmd == "logon":
            if any(k.lower() in ("email", "password") for k, _ in query):
                state.secrets_in_url.append(request.query_string)
            if "token" in doc and not doc.get("email"):
                _authorised(state, str(doc["token"]))  # checking an API token
                return _json_reply(state, {"token": doc["token"]})
            return _json_reply(state, {"token": _logon(state, doc, query)})
        token = _token_of(query, doc, state)
        if cmd == "logoff":
            _logoff(state, token)
            return _json_reply(state, {})
        person = _authorised(state, token)
        if cmd == "search":
            return _json_reply(state, {"cases": _cases(str(doc.get("q", ""))), "count": 1, "totalHits": 1})
        if cmd == "viewPerson":
            return _json_reply(state, {"person": {"sFullName": person}})
        raise Refusal(0, f"Unknown command {cmd!r}" if cmd else "No command given")
    except Refusal as e:
        return _json_error(state, e)


async def _api_xml(request: web.Request) -> web.Response:
    """``/api.xml``: where the API lives and which versions it speaks."""
    return _xml("<version>8</version><minversion>1</minversion><url>api.asp?</url>")


def make_app(
    base: str = "",
    email: str = DEMO_EMAIL,
    password: str = DEMO_PASSWORD,
    api_token: str | None = DEMO_API_TOKEN,
    two_factor: bool = False,
    ambiguous: bool = False,
    lock_after: int = 10,
    json_error_status: int = 400,
    cdata: bool = True,
    logon_delay: float = 0.0,
) -> web.Application:
    """``base``: the path FogBugz lives under (``/api.asp`` is ``{base}/api.asp``).
    ``ambiguous`` adds a second person with the same email (logon error 2);
    ``lock_after`` failed logons within a minute lock the account (0: never)."""
    app = web.Application(client_max_size=64 << 20)
    people = [Person("Demo User", email, password, two_factor)]
    if ambiguous:
        people.append(Person("Demo Double", email, password))
    state = FogBugzState(
        people=people, lock_after=lock_after, json_error_status=json_error_status, cdata=cdata, logon_delay=logon_delay
    )
    if api_token:
        state.api_tokens.add(api_token)
        state.tokens[api_token] = people[0].full_name
    app[STATE] = state
    app.router.add_route("GET", base + "/api.asp", _xml_api)
    app.router.add_route("POST", base + "/api.asp", _xml_api)
    app.router.add_route("GET", base + "/api.xml", _api_xml)
    app.router.add_route("POST", base + JSON_API, _json_api)
    return app


# --------------------------------------------------------------------------- authproxy demo


def demo() -> DemoService:
    app = make_app()
    state = app[STATE]

    def config(base_url: str) -> dict[str, Any]:
        return {
            "upstream": base_url,
            "auth": {"scheme": "fogbugz", "email": DEMO_EMAIL, "password": DEMO_PASSWORD},
        }

    def kill() -> None:
        state.kill_all_tokens()

    def logons(status: int, headers: dict[str, str], body: bytes) -> str:
        text = " ".join(body.decode("utf-8", "replace").split())
        text = text.split("?>", 1)[-1].strip()  # the XML declaration says nothing
        text = text if len(text) <= 100 else text[:99] + "…"
        return f"{text}  (logons so far: {state.logons})"

    tour = [
        TourStep(
            "XML API: the first request logs on once (email and password in a POST body) and gets token= added",
            path="/fogbugz/api.asp?cmd=search&q=foo",
            show=logons,
        ),
        TourStep(
            "JSON API: the token is set inside the JSON body too",
            method="POST",
            path="/fogbugz/f/api/0/jsonapi",
            json={"cmd": "viewPerson"},
            show=logons,
        ),
        TourStep(
            "a token the client sends is replaced by the proxy's",
            path="/fogbugz/api.asp?cmd=viewPerson&token=not-my-token",
            show=logons,
        ),
        TourStep("upstream: every token is killed (what a password change does)", action=kill),
        TourStep(
            "FogBugz answers 'Not logged on' (error 3): the proxy logs on again and replays — the client sees 200",
            path="/fogbugz/api.asp?cmd=search&q=bar",
            show=logons,
        ),
        TourStep(
            "the new token serves the JSON API as well, without another logon",
            method="POST",
            path="/fogbugz/f/api/0/jsonapi",
            json={"cmd": "search", "q": "bar"},
            show=logons,
        ),
    ]
    return DemoService(name="fogbugz", app=app, config=config, tour=tour, summary=state.summary)
