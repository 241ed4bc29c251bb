"""Responses never carry the credential: the scrubber alone, then through the real proxy."""

from __future__ import annotations

import asyncio
import gzip
import json
import random
from typing import Any, Awaitable, Callable
from urllib.parse import quote, quote_plus

import pytest
from aiohttp import web

from authproxy.proxy.forward import Forwarded, Forwarder
from authproxy.proxy.scrub import BodyStream, Scrubber, injected_values, is_compressed
from tests.conftest import secret, wait_for

TOKEN = secret("scrub-T0ken/with+odd chars")  # raw differs from every encoded form
STARS = "*" * len(TOKEN)


def stars(n: int | str | bytes) -> bytes:
    return b"*" * (n if isinstance(n, int) else len(n))


def through(s: Scrubber, data: bytes, cuts: list[int]) -> tuple[bytes, int, BodyStream]:
    st = s.stream()
    out = []
    prev = 0
    for c in [*cuts, len(data)]:
        piece = st.feed(data[prev:c])
        assert len(st._carry) <= s.keep
        out.append(piece)
        prev = c
    out.append(st.flush())
    return b"".join(out), st.count, st


# --------------------------------------------------------------------------- the scrubber alone


def test_every_form_is_masked_with_its_own_length() -> None:
    s = Scrubber([TOKEN])
    encoded = quote(TOKEN, safe="")
    forms = [TOKEN, encoded, encoded.lower().replace("scrub-t0ken", "scrub-T0ken"), quote_plus(TOKEN, safe=""), quote(TOKEN)]
    for form in forms:
        body = f'{{"echo": "{form}", "n": 1}}'.encode()
        out, n = s.body(body)
        assert out == body.replace(form.encode(), stars(form)) and n == 1, form
        assert len(out) == len(body)
    lower_plus = "scrub-T0ken%2fwith%2bodd+chars"
    out, n = s.body(lower_plus.encode())
    assert out == stars(lower_plus) and n == 1


def test_a_secret_with_short_unreserved_runs_is_looked_for_in_every_form() -> None:
    value = secret("ab/cd+ef gh=")
    s = Scrubber([value])
    assert set(s._needles) == set(s._forms) and len(s._forms) > 3
    for form in (value, quote(value, safe=""), quote(value, safe="").lower(), quote_plus(value, safe=""), quote(value)):
        data = b"<" + form.encode() + b">"
        assert s.body(data) == (b"<" + stars(form) + b">", 1), form
        for cut in range(len(data) + 1):
            assert through(s, data, [cut])[:2] == (b"<" + stars(form) + b">", 1), (form, cut)
    assert Scrubber([TOKEN])._needles == (b"scrub-T0ken",)  # one needle stands for every form


def test_nothing_to_mask_returns_the_same_object() -> None:
    s = Scrubber([TOKEN])
    body = b"x" * 100_000
    out, n = s.body(body)
    assert out is body and n == 0
    pairs = [("Content-Type", "text/plain"), ("X-A", "b")]
    assert s.headers(pairs) == (pairs, 0)


@pytest.mark.parametrize("form", [TOKEN, quote(TOKEN, safe=""), quote_plus(TOKEN, safe="")])
def test_a_secret_split_at_every_offset_of_two_and_three_reads(form: str) -> None:
    s = Scrubber([TOKEN, "other-secret-value"])
    data = f"before {form} middle other-secret-value {form}after".encode()
    want, wn = s.body(data)
    assert wn == 3 and form.encode() not in want and len(want) == len(data)
    start = data.index(form.encode())
    for cut in range(len(data) + 1):
        assert through(s, data, [cut])[:2] == (want, 3), cut
    for a in range(start, start + len(form) + 1):
        for b in range(a, start + len(form) + 2):
            assert through(s, data, [a, b])[:2] == (want, 3), (a, b)
    assert through(s, data, list(range(1, len(data))))[:2] == (want, 3)  # a byte at a time


def test_overlapping_and_nested_secrets_are_masked_as_their_union() -> None:
    s = Scrubber(["abcdef", "defghi", "aaa", "xyzw", "wxyzw-long"])
    out, n = s.body(b"-abcdefghi-aaaa-wxyzw-long-")
    assert out == b"-*********-****-**********-"
    assert n == 2 + 2 + 1  # abcdef+defghi, aaa twice (overlapping), the long one (xyzw inside it not again)
    for cut in range(28):
        assert through(s, b"-abcdefghi-aaaa-wxyzw-long-", [cut])[:2] == (out, n), cut


def test_random_streams_match_the_whole_body() -> None:
    rnd = random.Random(1)
    secrets = ["tok-" + "".join(rnd.choice("abc") for _ in range(6)) for _ in range(4)]
    s = Scrubber(secrets)
    for _ in range(300):
        parts = [rnd.choice([*secrets, "tok-", "a", "b", "c", "-", "tok-ab", "\n"]) for _ in range(30)]
        data = "".join(parts).encode()
        want = s.body(data)
        cuts = sorted(rnd.sample(range(len(data) + 1), rnd.randint(0, 6)))
        assert through(s, data, cuts)[:2] == want, (data, cuts)


@pytest.mark.parametrize("memmem", [True, False])
def test_large_pieces_with_and_without_memmem(memmem: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import authproxy.proxy.scrub as scrub

    if not memmem:
        monkeypatch.setattr(scrub, "_memmem", None)
    elif scrub._memmem is None:
        pytest.skip("no memmem in this C library")
    s = Scrubber([TOKEN, "second-secret-value"])
    raw = TOKEN.encode()
    filler = bytes(random.Random(3).getrandbits(8) for _ in range(70_000)).replace(b"*", b".")
    for at in (0, 1, 16383, 16384 - len(raw) // 2, 40_000, len(filler)):
        data = filler[:at] + raw + b"\0second-secret-value\0" + filler[at:]
        want = filler[:at] + stars(raw) + b"\0" + stars(19) + b"\0" + filler[at:]
        assert s.body(data) == (want, 2)
        for cuts in ([], [at + 3], [20_000, at + 5, at + 30]):
            assert through(s, data, sorted(set(cuts)))[:2] == (want, 2), (at, cuts)
    assert s.body(filler) == (filler, 0)


def test_only_a_possible_beginning_of_a_secret_is_held_back() -> None:
    s = Scrubber([TOKEN])
    st = s.stream()
    event = b"data: {\"n\": 1}\n\n"
    assert st.feed(event) == event  # an SSE event goes out whole at once
    assert st.feed(b"data: " + TOKEN.encode()[:5]) == b"data: "
    assert st.feed(TOKEN.encode()[5:] + b"\n\n") == stars(TOKEN) + b"\n\n"
    assert st.feed(b"x scrub") == b"x "
    assert st.feed(b"bed") == b"scrubbed"  # it was not one after all
    assert st.flush() == b"" and st.count == 1


def test_headers_are_masked_in_every_value() -> None:
    s = Scrubber([TOKEN])
    pairs = [
        ("Location", "https://elsewhere.example/cb?t=" + quote(TOKEN, safe="")),
        ("Set-Cookie", f"sid={quote_plus(TOKEN, safe='')}; Path=/svc"),
        ("WWW-Authenticate", f'Bearer error="invalid_token", token="{TOKEN}"'),
        ("Content-Type", "application/json"),
    ]
    out, n = s.headers(pairs)
    assert n == 3
    assert out[0] == ("Location", "https://elsewhere.example/cb?t=" + "*" * len(quote(TOKEN, safe="")))
    assert out[1][1].startswith("sid=*") and out[1][1].endswith("; Path=/svc")
    assert TOKEN not in out[2][1] and len(out[2][1]) == len(pairs[2][1])
    assert out[3] == pairs[3]


def test_non_ascii_secret_in_a_latin1_header_and_in_a_body() -> None:
    value = secret("jeton-éàü-secret")
    s = Scrubber([value])
    header = value.encode("utf-8").decode("latin-1")  # how the engine decodes the upstream's bytes
    out, n = s.headers([("X-Echo", f"<{header}>")])
    assert n == 1 and out[0][1] == "<" + "*" * len(value.encode()) + ">"
    assert s.body(value.encode())[0] == stars(value.encode())


def test_injected_values_and_short_values() -> None:
    exported = {"headers": {"Authorization": "Bearer abc.def", "App-Token": "app-1", "Token": "tok-2"}, "query": {"token": "q-tok"}}
    assert injected_values(exported) == ["abc.def", "app-1", "tok-2", "q-tok"]
    assert injected_values({"headers": {"Authorization": "opaque-value"}, "query": {}}) == ["opaque-value"]
    s = Scrubber(["o", "ab", None, ""])  # too short to mask: they would mask half of every text
    assert not s and s.body(b"o ab") == (b"o ab", 0)
    st = s.stream()
    assert st.feed(b"o ab") == b"o ab" and st.flush() == b""


def test_content_encoding() -> None:
    assert not is_compressed([]) and not is_compressed(["identity"]) and not is_compressed([" Identity , "])
    assert is_compressed(["gzip"]) and is_compressed(["identity", "br"]) and is_compressed(["identity, gzip"])


# --------------------------------------------------------------------------- through the proxy


@pytest.fixture
def results(monkeypatch: pytest.MonkeyPatch) -> list[Forwarded]:
    """What each Forwarder.forward returned (its first two fields: upstream status, scrubbed count)."""
    got: list[Forwarded] = []
    original = Forwarder.forward

    async def forward(self: Forwarder, *a: Any, **kw: Any) -> Forwarded:
        r = await original(self, *a, **kw)
        got.append(r)
        return r

    monkeypatch.setattr(Forwarder, "forward", forward)
    return got


def bearer(up: str, **extra: Any) -> dict:
    return {"upstream": up, "auth": {"scheme": "bearer", "token": TOKEN}, **extra}


async def test_headers_location_and_small_body(upstream: Any, proxy: Any, results: list[Forwarded]) -> None:
    enc = quote(TOKEN, safe="")

    async def handler(request: web.Request) -> web.Response:
        sent = request.headers["Authorization"].removeprefix("Bearer ")
        assert sent == TOKEN
        body = json.dumps({"you_sent": sent, "again": quote(sent, safe="")}).encode()
        return web.Response(
            body=body,
            content_type="application/json",
            headers={
                "Location": f"https://other.example/next?access_token={enc}",
                "WWW-Authenticate": f'Bearer realm="x", hint="{sent}"',
                "Set-Cookie": f"sid={enc}; Path=/",
                "X-Plain": "nothing here",
            },
            status=302,
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    up = await upstream(app)
    p = await proxy({"services": {"svc": bearer(up)}})
    async with p.request("GET", "/svc/x") as r:
        body = await r.read()
        assert r.status == 302
        assert r.headers["Location"] == "https://other.example/next?access_token=" + "*" * len(enc)
        assert r.headers["WWW-Authenticate"] == f'Bearer realm="x", hint="{STARS}"'
        assert r.headers["Set-Cookie"] == "sid=" + "*" * len(enc) + "; Path=/svc"
        assert r.headers["X-Plain"] == "nothing here"
        assert int(r.headers["Content-Length"]) == len(body)
    assert json.loads(body) == {"you_sent": STARS, "again": "*" * len(enc)}
    await wait_for(lambda: results)
    assert [r[:2] for r in results] == [(302, 5)]


async def test_location_under_the_base_path_is_rewritten_and_scrubbed(upstream: Any, proxy: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=303, headers={"Location": f"/base/items/{TOKEN}?token={quote(TOKEN, safe='')}&x=1"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    up = await upstream(app)
    p = await proxy({"services": {"svc": bearer(up + "/base")}})
    async with p.request("GET", "/svc/x") as r:
        assert r.status == 303
        assert r.headers["Location"] == f"/svc/items/{STARS}?x=1"


async def raw_upstream(script: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]) -> tuple[str, asyncio.AbstractServer]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await script(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", server


async def test_chunked_body_split_inside_the_secret(proxy: Any, results: list[Forwarded]) -> None:
    """The upstream writes the body in two TCP writes, the second only once the client
    has had what came before the secret: the proxy held back only the secret's start."""
    first_seen = asyncio.Event()
    raw = TOKEN.encode()
    part1, part2 = b"hello " + raw[:9], raw[9:] + b" bye " + raw

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"%x\r\n%s\r\n" % (len(part1), part1))
        await writer.drain()
        await first_seen.wait()
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(part2), part2))
        await writer.drain()

    url, server = await raw_upstream(script)
    try:
        p = await proxy({"services": {"svc": bearer(url)}})
        async with p.request("GET", "/svc/stream") as r:
            assert r.status == 200 and "Content-Length" not in r.headers
            got = await asyncio.wait_for(r.content.readany(), 10)
            assert got == b"hello "  # promptly: not waiting for the rest
            first_seen.set()
            rest = await asyncio.wait_for(r.content.read(), 10)
        assert got + rest == b"hello " + stars(raw) + b" bye " + stars(raw)
        await wait_for(lambda: results)
        assert [r[:2] for r in results] == [(200, 2)]
    finally:
        server.close()


async def test_sse_reaches_the_client_event_by_event(upstream: Any, proxy: Any) -> None:
    client_saw_1 = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        await resp.write(f"id: 1\ndata: {{\"token\": \"{TOKEN}\"}}\n\n".encode())
        await client_saw_1.wait()
        await resp.write(b"id: 2\ndata: two\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/events", handler)
    up = await upstream(app)
    p = await proxy({"services": {"svc": bearer(up)}})
    async with p.request("GET", "/svc/events") as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        event1 = b""
        while not event1.endswith(b"\n\n"):
            event1 += await asyncio.wait_for(r.content.readany(), 10)
        assert event1 == f"id: 1\ndata: {{\"token\": \"{STARS}\"}}\n\n".encode()
        client_saw_1.set()
        assert await asyncio.wait_for(r.content.read(), 10) == b"id: 2\ndata: two\n\n"


async def test_large_body_with_content_length_keeps_its_length(upstream: Any, proxy: Any, results: list[Forwarded]) -> None:
    raw = TOKEN.encode()
    rnd = random.Random(7)
    pieces = []
    for _ in range(400):
        pieces.append(bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 3000))).replace(b"*", b"."))
        pieces.append(raw)
    body = b"".join(pieces)
    assert len(body) > 512 * 1024

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = len(body)
        await resp.prepare(request)
        for i in range(0, len(body), 5000):  # writes that cut the secret in many places
            await resp.write(body[i : i + 5000])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/big", handler)
    up = await upstream(app)
    p = await proxy({"services": {"svc": bearer(up)}})
    async with p.request("GET", "/svc/big") as r:
        assert int(r.headers["Content-Length"]) == len(body)
        got = await r.read()
    assert got == body.replace(raw, stars(raw)) and len(got) == len(body)
    await wait_for(lambda: results)
    assert [r[:2] for r in results] == [(200, 400)]


async def test_gzip_passes_byte_for_byte_and_scrubbing_can_be_off(upstream: Any, proxy: Any, results: list[Forwarded]) -> None:
    gz = gzip.compress(b"token=" + TOKEN.encode(), compresslevel=0)  # stored: the secret is there verbatim
    assert TOKEN.encode() in gz

    async def handler(request: web.Request) -> web.Response:
        if request.path.endswith("/gz"):
            return web.Response(body=gz, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"})
        return web.Response(text=f"plain {TOKEN}", headers={"X-Echo": TOKEN})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    up = await upstream(app)
    p = await proxy({"services": {"on": bearer(up), "off": bearer(up, scrub_responses=False)}})
    async with p.request("GET", "/on/gz") as r:
        assert await r.read() == gz
    async with p.request("GET", "/off/x") as r:
        assert await r.text() == f"plain {TOKEN}" and r.headers["X-Echo"] == TOKEN
    async with p.request("GET", "/on/x") as r:
        assert await r.text() == f"plain {STARS}" and r.headers["X-Echo"] == STARS
    await wait_for(lambda: len(results) == 3)
    assert [r[:2] for r in results] == [(200, 0), (200, 0), (200, 2)]


async def test_fogbugz_and_app_token_secrets(upstream: Any, proxy: Any) -> None:
    fb = secret("fb-api-token-0123456789")
    app_tok, user_tok = secret("app-token-abcdef"), secret("user-token-987654")

    async def handler(request: web.Request) -> web.Response:
        seen = {"query": request.query_string, "app": request.headers.get("App-Token"), "token": request.headers.get("Token")}
        return web.Response(text=json.dumps(seen), content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    up = await upstream(app)
    p = await proxy(
        {
            "services": {
                "fb": {"upstream": up, "auth": {"scheme": "fogbugz", "token": fb}},
                "at": {"upstream": up, "auth": {"scheme": "app_token", "app_token": app_tok, "token": user_tok}},
            }
        }
    )
    async with p.request("GET", "/fb/api.asp?cmd=search&q=x") as r:
        got = await r.json()
    assert got["query"] == "cmd=search&q=x&token=" + "*" * len(fb)
    async with p.request("GET", "/at/api/v1/things/") as r:
        got = await r.json()
    assert got["app"] == "*" * len(app_tok) and got["token"] == "*" * len(user_tok)


async def test_a_passed_through_credential_endpoint_reply_is_scrubbed(upstream: Any, proxy: Any) -> None:
    """An on-behalf-of refusal that echoes the service user's Token and App-Token."""
    app_tok, user_tok = secret("app-token-for-obo-1"), secret("service-user-token-2")

    async def tokens(request: web.Request) -> web.Response:
        doc = {"error": "bad user", "token": request.headers["Token"], "app": request.headers["App-Token"]}
        return web.Response(status=400, text=json.dumps(doc), content_type="application/json")

    app = web.Application()
    app.router.add_post("/api/v1/tokens/", tokens)
    up = await upstream(app)
    auth = {"scheme": "app_token", "app_token": app_tok, "token": user_tok, "obo": {"allow_users": ["*"]}}
    p = await proxy({"services": {"at": {"upstream": up, "auth": auth}}})
    async with p.request("GET", "/at/api/v1/x/", headers={"X-Authproxy-On-Behalf-Of": "alice"}) as r:
        assert r.status == 400
        got = await r.json()
    assert got == {"error": "bad user", "token": "*" * len(user_tok), "app": "*" * len(app_tok)}


async def test_the_scrubber_is_built_once_per_credential(upstream: Any, proxy: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import authproxy.proxy.forward as forward

    built: list[int] = []
    real = forward.Scrubber

    def counting(values: Any) -> Scrubber:
        built.append(1)
        return real(values)

    monkeypatch.setattr(forward, "Scrubber", counting)

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/x", ok)
    up = await upstream(app)
    p = await proxy({"services": {"svc": bearer(up)}})
    for _ in range(5):
        async with p.request("GET", "/svc/x") as r:
            assert await r.text() == "ok"
    assert len(built) == 1
