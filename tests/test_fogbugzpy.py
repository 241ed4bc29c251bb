"""FogBugzPy (PyPI ``fogbugz``) itself, through the real proxy, against the strict mock.

FogBugzPy fetches ``<url>/api.xml`` to find the API, then POSTs every command as
``multipart/form-data`` with ``cmd`` — and ``token`` once it has one — as form
fields, files attached as ``File1``… Its ``logoff()`` and ``logon()`` must not
touch the token every client of the proxy shares, and the placeholder token its
``logon()`` gets must be replaced in the multipart body (the strict mock refuses
a request whose query and body tokens differ). The library is synchronous
(urllib), so each client session runs in a thread while the proxy and the mock
serve on the test's event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from typing import Any

import fogbugz as fogbugzpy  # the library; the name ``fogbugz`` below is the mock fixture
import pytest

from authproxy.schemes.fogbugz import PLACEHOLDER
from tests.test_fogbugz import API_TOKEN, Mock, fogbugz, service  # noqa: F401 - fogbugz is a fixture

# Bytes that a re-encoded multipart body could damage: every byte value, CRLFs, a
# line that looks like a delimiter, NULs.
ATTACHMENT = bytes(range(256)) + b"\r\n--\r\n\r\n" + b"\x00" * 64 + b"\r\n-- not a boundary\r\n" + bytes(range(255, -1, -1))


def cases(response: Any) -> list[str]:
    return [c.sTitle.string for c in response.cases.find_all("case")]


def session(base: str, token: str | None = None) -> dict[str, Any]:
    """What a FogBugzPy user does, start to end; returns what it saw."""
    seen: dict[str, Any] = {}
    fb = fogbugzpy.FogBugz(base, token=token)  # GET api.xml: where the API is
    seen["url"] = fb._url
    seen["search"] = cases(fb.search(q="foo", cols="sTitle,sStatus"))
    case = fb.new(sTitle="Crash log attached", sEvent="see the file", Files={"crash.bin": io.BytesIO(ATTACHMENT)})
    seen["new"] = case.case["ixBug"]
    fb.logoff()  # would end the shared token
    fb.logon("someone@example.com", "any password at all")
    seen["token"] = fb._token
    seen["after_logon"] = cases(fb.search(q="bar"))  # the placeholder now rides in every body
    fb.logon("someone@example.com", "another password")  # logs off first, then on again
    seen["person"] = fb.viewPerson().person.sFullName.string
    fb.logoff()
    return seen


async def test_fogbugzpy_through_the_proxy_logging_on_itself(fogbugz: Mock, proxy: Any) -> None:
    up, st = await fogbugz()
    p = await proxy({"services": {"fb": service(up)}})
    seen = await asyncio.to_thread(session, p.url + "/fb/")
    assert seen["url"] == p.url + "/fb/api.asp?"
    assert seen["search"] == ["Mock case matching 'foo'"]
    assert seen["new"] == "2"
    assert seen["token"] == PLACEHOLDER
    assert seen["after_logon"] == ["Mock case matching 'bar'"]
    assert seen["person"] == "Demo User"
    # The attachment reached FogBugz byte for byte, beside the replaced token.
    assert [(name, hashlib.sha256(data).hexdigest()) for name, data in st.attachments] == [
        ("crash.bin", hashlib.sha256(ATTACHMENT).hexdigest())
    ]
    # One logon (the proxy's), none of the client's logons or logoffs reached FogBugz,
    # and no request carried the client's placeholder.
    assert (st.logons, len(st.logon_attempts), st.logoffs) == (1, 1, 0)
    assert st.conflicting_tokens == 0 and st.invalid_requests == 0
    assert st.multipart_requests == 4  # search, new, search, viewPerson
    shared = next(t for t in st.tokens if t != API_TOKEN)
    status, ready = await p.get_json("/-/readyz")
    assert status == 200 and ready["services"]["fb"]["state"] == "ready"
    again = await asyncio.to_thread(lambda: cases(fogbugzpy.FogBugz(p.url + "/fb/").search(q="still")))
    assert again == ["Mock case matching 'still'"] and shared in st.tokens and st.logons == 1


async def test_fogbugzpy_with_a_placeholder_token_and_a_configured_api_token(fogbugz: Mock, proxy: Any) -> None:
    up, st = await fogbugz()
    p = await proxy({"services": {"fb": service(up, token=API_TOKEN)}})
    seen = await asyncio.to_thread(session, p.url + "/fb/", "whatever-the-client-has")
    assert seen["search"] == ["Mock case matching 'foo'"] and seen["person"] == "Demo User"
    assert [name for name, _ in st.attachments] == ["crash.bin"] and st.attachments[0][1] == ATTACHMENT
    assert API_TOKEN in st.tokens  # logoff() did not end the API token
    assert (len(st.logon_attempts), st.logoffs, st.conflicting_tokens, st.invalid_requests) == (0, 0, 0, 0)


async def test_fogbugzpy_upload_over_max_replay_body_streams_untouched(fogbugz: Mock, proxy: Any) -> None:
    """A body too large to keep is not rewritten (SPEC): the client's own body token
    reaches FogBugz, which the strict mock refuses — and the proxy's token is unharmed."""
    up, st = await fogbugz()
    p = await proxy({"services": {"fb": service(up, max_replay_body=4096)}})

    def upload() -> str:
        fb = fogbugzpy.FogBugz(p.url + "/fb/", token="client-placeholder")
        try:
            fb.new(sTitle="big", Files={"big.bin": io.BytesIO(ATTACHMENT * 64)})
        except fogbugzpy.FogBugzConnectionError as e:
            return str(e)
        return "no error"

    assert "400" in await asyncio.to_thread(upload)
    assert st.conflicting_tokens == 1 and st.attachments == []
    assert await asyncio.to_thread(lambda: cases(fogbugzpy.FogBugz(p.url + "/fb/").search(q="x"))) == ["Mock case matching 'x'"]
    assert st.logons == 1 and st.logoffs == 0


@pytest.mark.parametrize("lenient", [False, True])
async def test_fogbugzpy_against_the_mock_directly_shows_why_the_proxy_rewrites(fogbugz: Mock, lenient: bool) -> None:
    """Without the proxy: FogBugzPy's logon token works, but a wrong body token next to
    a right query token is refused (strict) or wins (a server that picks the body's)."""
    up, st = await fogbugz(prefer_body_token=lenient)

    def direct() -> tuple[str, str]:
        fb = fogbugzpy.FogBugz(up + "/")
        fb.logon("robot@example.com", st.people[0].password)
        good = fb.viewPerson().person.sFullName.string
        bad = fogbugzpy.FogBugz(up + "/", token="placeholder")
        bad._url += "token=" + fb._token  # the right token in the query, as the proxy puts it
        try:
            bad.viewPerson()
        except (fogbugzpy.FogBugzAPIError, fogbugzpy.FogBugzConnectionError) as e:
            return good, str(e)
        return good, "no error"

    good, err = await asyncio.to_thread(direct)
    assert good == "Demo User"
    assert ("Error Code 3" in err) if lenient else ("400" in err or "more than one token" in err)
