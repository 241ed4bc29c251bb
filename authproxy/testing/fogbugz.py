"""A mock FogBugz / Manuscript: the XML API (``/api.asp``), the JSON API
(``/f/api/0/jsonapi``), logon and logoff, and the errors a client must handle.

It behaves like the real service where a client can tell — error 1 for a wrong
password or two-factor, error 2 with a ``<people>`` list for an ambiguous
logon, error 3 "Not logged on" for a missing or dead token — and is stricter
than it where a client could be careless:

- an email or password in the URL query is refused, and recorded
  (``state.secrets_in_url``) so a test can assert it never happened;
- a request carrying two different tokens (query and body, or twice in the
  query or the body) is refused: FogBugz would silently pick one;
- an account is locked after ``lock_after`` failed logons within a minute
  (``state.locked``), so a client that hammers a wrong password shows.

Arguments come from the query string and a form-encoded or
``multipart/form-data`` body alike (client libraries such as FogBugzPy POST
every command as multipart, files attached as ``File1``…``FileN`` with
``nFileCount``; attachments are kept in ``state.attachments``). ``/api.xml``
says where the API is (``<url>api.asp?</url>``), as FogBugz does.

``state.kill_all_tokens()`` ends every token, as a password change does.
Run it alone with ``python -m authproxy.testing fogbugz --port 9102``; it
accepts ``demo@example.com`` / ``demo-password`` and the API token
``demo-api-token``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape

from aiohttp import web

from authproxy.testing import DemoService, TourStep
from authproxy.testing import fogbugz_model as model
from authproxy.testing.fogbugz_model import (  # re-exported: what tests and users use
    DEMO_API_TOKEN,
    DEMO_EMAIL,
    DEMO_PASSWORD,
    JSON_API,
    XML_TYPE,
    FogBugzState,
    Person,
    Refusal,
)

__all__ = ["STATE", "FogBugzState", "Person", "Refusal", "make_app", "demo", "DEMO_EMAIL", "DEMO_PASSWORD", "DEMO_API_TOKEN", "JSON_API", "XML_TYPE"]

STATE: web.AppKey[FogBugzState] = web.AppKey("fogbugz_state")


async def _xml_api(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.xml_requests += 1
    query = parse_qsl(request.query_string, keep_blank_values=True)
    state.queries.append(request.query_string)
    del state.queries[:-1000]
    try:
        if request.method == "POST" and request.content_type not in ("application/x-www-form-urlencoded", "multipart/form-data", ""):
            raise Refusal(0, "Mock FogBugz: the XML API takes form-encoded arguments", status=400)
        fields, files = await _form(request)
        args = {**dict(query), **dict(fields)}
        cmd = args.get("cmd", "")
        if cmd == "logon":
            if any(k.lower() in ("email", "password") for k, _ in query):
                state.secrets_in_url.append(request.query_string)
            await asyncio.sleep(state.logon_delay)
            token = model.logon(state, args, query)
            return model.xml(f"<token>{model.cdata(token) if state.cdata else escape(token)}</token>")
        token = model.token_of(query, fields, state)
        if cmd == "logoff":
            model.logoff(state, token)
            return model.xml("")
        person = model.authorised(state, token)
        if files:
            if str(len(files)) != str(args.get("nFileCount", "")):
                raise Refusal(0, f"Mock FogBugz: nFileCount says {args.get('nFileCount')!r}, {len(files)} files sent", status=400)
            state.attachments.extend(files)
        return model.xml(_xml_command(cmd, args, person))
    except Refusal as e:
        return model.xml_error(e)


async def _form(request: web.Request) -> tuple[list[tuple[str, str]], list[tuple[str, bytes]]]:
    """The body's fields (every one, repeated names included) and files."""
    if request.method != "POST":
        return [], []
    state = request.app[STATE]
    if request.content_type == "multipart/form-data":
        state.multipart_requests += 1
    fields: list[tuple[str, str]] = []
    files: list[tuple[str, bytes]] = []
    for name, value in (await request.post()).items():
        if isinstance(value, web.FileField):
            files.append((value.filename, value.file.read()))
        elif isinstance(value, (bytes, bytearray)):
            fields.append((name, bytes(value).decode("utf-8", "replace")))
        else:
            fields.append((name, value))
    return fields, files


def _xml_command(cmd: str, args: dict[str, Any], person: str) -> str:
    if cmd == "search":
        cases = "".join(
            f'<case ixBug="{c["ixBug"]}" operations="edit,resolve"><sTitle>{model.cdata(c["sTitle"])}</sTitle><sStatus>{c["sStatus"]}</sStatus></case>'
            for c in model.cases(str(args.get("q", "")))
        )
        return f'<cases count="1">{cases}</cases>'
    if cmd == "viewPerson":
        return f"<person><sFullName>{model.cdata(person)}</sFullName></person>"
    if cmd == "listProjects":
        return '<projects><project><ixProject>1</ixProject><sProject><![CDATA[Demo]]></sProject></project></projects>'
    if cmd == "new":
        return f'<case ixBug="2" operations="edit"><sTitle>{model.cdata(str(args.get("sTitle", "")))}</sTitle></case>'
    if cmd == "edit":
        return f'<case ixBug="{escape(str(args.get("ixBug", "")))}" operations="edit"></case>'
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
                model.authorised(state, str(doc["token"]))  # checking an API token
                return model.json_reply(state, {"token": doc["token"]})
            return model.json_reply(state, {"token": model.logon(state, doc, query)})
        token = model.token_of(query, doc.items(), state)
        if cmd == "logoff":
            model.logoff(state, token)
            return model.json_reply(state, {})
        person = model.authorised(state, token)
        if cmd == "search":
            return model.json_reply(state, {"cases": model.cases(str(doc.get("q", ""))), "count": 1, "totalHits": 1})
        if cmd == "viewPerson":
            return model.json_reply(state, {"person": {"sFullName": person}})
        raise Refusal(0, f"Unknown command {cmd!r}" if cmd else "No command given")
    except Refusal as e:
        return model.json_error(state, e)


async def _api_xml(request: web.Request) -> web.Response:
    """``/api.xml``: where the API lives and which versions it speaks."""
    return model.xml("<version>8</version><minversion>1</minversion><url>api.asp?</url>")


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
    prefer_body_token: bool = False,
) -> web.Application:
    """``base``: the path FogBugz lives under (``/api.asp`` is ``{base}/api.asp``).
    ``ambiguous`` adds a second person with the same email (logon error 2);
    ``lock_after`` failed logons within a minute lock the account (0: never);
    ``prefer_body_token`` makes a token in the body win over the query's instead of
    the request being refused (a server that silently picks one)."""
    app = web.Application(client_max_size=64 << 20)
    people = [Person("Demo User", email, password, two_factor)]
    if ambiguous:
        people.append(Person("Demo Double", email, password))
    state = FogBugzState(
        people=people,
        lock_after=lock_after,
        json_error_status=json_error_status,
        cdata=cdata,
        logon_delay=logon_delay,
        prefer_body_token=prefer_body_token,
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
        TourStep(
            "a client's own logoff (multipart, as FogBugzPy sends it) is answered by the proxy: the shared token lives",
            method="POST",
            path="/fogbugz/api.asp",
            headers={"Content-Type": "multipart/form-data; boundary=b"},
            data=b'--b\r\nContent-disposition: form-data; name="cmd"\r\n\r\nlogoff\r\n'
            b'--b\r\nContent-disposition: form-data; name="token"\r\n\r\nplaceholder\r\n--b--\r\n',
            show=lambda status, headers, body: f"{logons(status, headers, body)}, logoffs: {state.logoffs}",
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
