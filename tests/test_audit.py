"""The audit trail: one access record per request with every SPEC field (text and
JSON log formats), the credential fingerprint, and ``log.audit_file`` — 0600,
JSON lines, flushed within a second and at exit, reopened on SIGHUP for
logrotate, and a write failure that is logged once and never stops serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import signal
import stat
import time
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest

from authproxy.observe import AccessLog, AccessRecord, AuditFile, access_log, fingerprint
from authproxy.testing import echo
from authproxy.testing import oauth2 as mock
from tests.conftest import free_port, secret, wait_for, write_config

TOKEN = secret("audit-bearer-t0ken-5f1c")
KEY = secret("audit-inbound-key-77aa")
FIELDS = (
    "request_id", "client", "key", "method", "path", "service", "decision", "status",
    "upstream_status", "bytes_in", "bytes_out", "duration_ms", "credential", "scrubbed",
)  # fmt: skip


def fp(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:12]


def bearer(up: str, token: str = TOKEN) -> dict[str, Any]:
    return {"upstream": up, "auth": {"scheme": "bearer", "token": token}}


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def access_stream() -> Iterator[Any]:
    """Point the access log at a stream of the test's own (text or JSON), as
    ``setup_logging`` does for the CLI; restored after the test."""
    saved = (access_log.stream, access_log.json, access_log.enabled)

    def use(fmt: str, level: int = logging.INFO) -> io.StringIO:
        stream = io.StringIO()
        access_log.configure(stream, fmt, level)
        return stream

    yield use
    access_log.flush()
    access_log.stream, access_log.json, access_log.enabled = saved


@pytest.fixture(autouse=True)
def _no_audit_file_left_open() -> Iterator[None]:
    yield
    access_log.close_audit()


def parse_text(line: str) -> dict[str, Any]:
    """A text access line → its fields (``-`` is none; quoted values are JSON strings)."""
    head, rest = line.split(" request ", 1)
    ts, level = head.split()
    assert ts.endswith("Z") and level == "INFO"
    out: dict[str, Any] = {}
    while rest:
        name, _, rest = rest.partition("=")
        if rest.startswith('"'):
            value, end = json.JSONDecoder().raw_decode(rest)
            rest = rest[end:].lstrip(" ")
        else:
            raw, _, rest = rest.partition(" ")
            value = None if raw == "-" else int(raw) if raw.isdigit() else float(raw) if name == "duration_ms" else raw
        out[name] = value
    return out


def records(stream: io.StringIO, fmt: str) -> list[dict[str, Any]]:
    access_log.flush()
    lines = [ln for ln in stream.getvalue().splitlines() if ln]
    return [json.loads(ln) for ln in lines] if fmt == "json" else [parse_text(ln) for ln in lines]


def by_id(recs: list[dict[str, Any]], rid: str) -> dict[str, Any]:
    (rec,) = [r for r in recs if r["request_id"] == rid]
    return rec


def file_records(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    assert text == "" or text.endswith("\n"), "a record was cut"
    return [json.loads(line) for line in text.splitlines()]


# --------------------------------------------------------------------------- the record


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_every_field_of_the_access_record(fmt, upstream, proxy, access_stream):
    up = await upstream(echo.make_app())
    p = await proxy(
        {
            "inbound": {"keys": [{"name": "agent", "key": KEY}]},
            "services": {"svc": bearer(up)},
        }
    )
    stream = access_stream(fmt)
    auth = {"X-Authproxy-Key": KEY}
    body = b"x" * 100
    # The token in the path is masked in the record; a body goes up; the reply is counted.
    async with p.request("POST", f"/svc/status/201?t={TOKEN}&q=1", data=body, headers={**auth, "X-Request-Id": "audit-ok"}) as r:
        assert r.status == 201
        got = await r.read()
    async with p.request("GET", "/svc/status/503", headers={**auth, "X-Request-Id": "audit-503"}) as r:
        assert r.status == 503
    async with p.request("GET", "/nowhere", headers={**auth, "X-Request-Id": "audit-noroute"}) as r:
        assert r.status == 404
    async with p.request("GET", "/svc/x", headers={"X-Request-Id": "audit-nokey"}) as r:
        assert r.status == 401
    async with p.request("GET", "/-/healthz", headers={"X-Request-Id": "audit-health"}) as r:
        assert r.status == 200
        health = await r.read()

    recs = records(stream, fmt)
    assert len(recs) == 5
    for rec in recs:
        assert set(FIELDS) <= rec.keys(), sorted(set(FIELDS) - rec.keys())
        assert rec["client"] == "127.0.0.1" and rec["duration_ms"] >= 0
        assert isinstance(rec["scrubbed"], int)
    if fmt == "json":
        assert all(r["ts"].endswith("Z") and r["event"] == "request" for r in recs)

    ok = by_id(recs, "audit-ok")
    assert ok["key"] == "agent" and ok["method"] == "POST" and ok["service"] == "svc"
    assert ok["path"].startswith("/svc/status/201?t=") and ok["path"].endswith("&q=1") and TOKEN not in ok["path"]
    assert (ok["decision"], ok["status"], ok["upstream_status"]) == ("forwarded", 201, 201)
    assert ok["bytes_in"] == len(body) and ok["bytes_out"] == len(got) > 0
    assert ok["scrubbed"] == 0  # the upstream's reply carried no secret

    err = by_id(recs, "audit-503")  # the upstream's own error: forwarded, not the proxy's
    assert (err["decision"], err["status"], err["upstream_status"], err["bytes_in"]) == ("forwarded", 503, 503, 0)

    nr = by_id(recs, "audit-noroute")
    assert (nr["decision"], nr["status"], nr["upstream_status"], nr["service"], nr["credential"]) == ("no_route", 404, None, None, None)
    assert nr["key"] == "agent" and nr["bytes_out"] > 0

    nk = by_id(recs, "audit-nokey")
    assert (nk["decision"], nk["status"], nk["key"], nk["upstream_status"], nk["credential"]) == ("inbound_key_required", 401, None, None, None)

    h = by_id(recs, "audit-health")
    assert (h["decision"], h["status"], h["service"], h["path"], h["bytes_out"]) == ("local", 200, None, "/-/healthz", len(health))

    text = stream.getvalue()
    assert TOKEN not in text and KEY not in text


async def test_scrubbed_counts_the_secrets_masked_in_the_reply(upstream, proxy, access_stream):
    up = await upstream(echo.make_app())
    p = await proxy({"services": {"svc": bearer(up)}})
    stream = access_stream("json")
    async with p.request("GET", "/svc/echo", headers={"X-Request-Id": "audit-scrub"}) as r:
        assert r.status == 200
        got = await r.read()
    assert TOKEN.encode() not in got  # the echo of the Authorization header came back masked
    rec = by_id(records(stream, "json"), "audit-scrub")
    assert rec["scrubbed"] >= 1 and rec["bytes_out"] == len(got)


def test_record_lines_are_built_as_json_dumps_would_print_them():
    """The JSON line is built without json.dumps; it must be what json.dumps prints
    (escapes, non-ASCII, nulls), and the text line must keep one field a word."""
    log = AccessLog()
    stream = io.StringIO()
    log.configure(stream, "json", logging.INFO)
    rec = AccessRecord("r1", None, "GET", '/a?q="x"\\é\n', None, 502, 0.0123, "k", "upstream_unreachable", None, 7, 99, fp("v"), 2)
    log.record(rec)
    log.flush()
    line = stream.getvalue().rstrip("\n")
    doc = json.loads(line)
    assert line == json.dumps(doc)
    assert doc["path"] == '/a?q="x"\\é\n' and doc["client"] is None and doc["upstream_status"] is None
    assert [k for k in doc if k in FIELDS] == list(FIELDS)

    text = io.StringIO()
    log.configure(text, "text", logging.INFO)
    log.record(AccessRecord("r2", "::1", "GET", "/p", "svc", 200, 0.5, "a key", "forwarded", 200, 0, 3, None, 0))
    log.flush()
    got = parse_text(text.getvalue().rstrip("\n"))
    assert got["key"] == "a key" and got["credential"] is None and got["duration_ms"] == 500.0 and got["status"] == 200


def test_the_older_log_call_still_works():
    log = AccessLog()
    stream = io.StringIO()
    log.configure(stream, "json", logging.INFO)
    log.log("r3", "127.0.0.1", "GET", "/x", "svc", 200, 0.001, key="agent")
    log.log("r4", "127.0.0.1", "GET", "/x", None, 404, 0.001)
    log.flush()
    a, b = (json.loads(ln) for ln in stream.getvalue().splitlines())
    assert (a["key"], a["service"], a["status"]) == ("agent", "svc", 200)
    assert (b["key"], b["service"], b["decision"]) == (None, None, None)


def test_fingerprint_is_sha256_prefix_and_computed_once_per_value(monkeypatch):
    value = secret("fingerprint-me-0c4e")
    assert fingerprint(value) == fp(value) and len(fingerprint(value)) == 12
    calls = []
    real = hashlib.sha256

    def counting(data: bytes = b"") -> Any:
        calls.append(1)
        return real(data)

    monkeypatch.setattr(hashlib, "sha256", counting)
    for _ in range(100):
        assert fingerprint(value) == fp(value)
    assert calls == [1] * 100  # fp() above hashes each time; fingerprint() did not
    assert fingerprint(value + "x") != fingerprint(value)


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_credential_is_the_fingerprint_of_the_injected_token(fmt, upstream, proxy, access_stream):
    up = await upstream(echo.make_app())
    p = await proxy({"services": {"svc": bearer(up)}})
    stream = access_stream(fmt)
    async with p.request("GET", "/svc/status/200", headers={"X-Request-Id": "audit-cred"}) as r:
        assert r.status == 200
    assert TOKEN not in stream.getvalue()
    assert by_id(records(stream, fmt), "audit-cred")["credential"] == fp(TOKEN)


async def test_a_replay_after_a_rejection_is_decision_replayed(upstream, proxy, access_stream):
    app = mock.make_app(clients=[mock.Client("audit-client", secret=secret("audit-client-secret-91"))], token_lifetime=None)
    base = await upstream(app)
    st = app[mock.STATE]
    svc = {
        "upstream": base + mock.API_PATH,
        "auth": {"scheme": "oauth2", "token_url": base + mock.TOKEN_PATH, "client_id": "audit-client", "client_secret": "audit-client-secret-91"},
    }
    p = await proxy({"services": {"svc": svc}})
    stream = access_stream("json")
    async with p.request("GET", "/svc/a", headers={"X-Request-Id": "audit-first"}) as r:
        assert r.status == 200
    first = p.server.runtimes["svc"].creds.current(None).token.reveal()
    st.revoke_access_tokens()
    async with p.request("POST", "/svc/a", data=b"{}", headers={"X-Request-Id": "audit-replayed"}) as r:
        assert r.status == 200
    second = p.server.runtimes["svc"].creds.current(None).token.reveal()
    recs = records(stream, "json")
    assert by_id(recs, "audit-first")["decision"] == "forwarded"
    rec = by_id(recs, "audit-replayed")
    assert (rec["decision"], rec["status"], rec["upstream_status"]) == ("replayed", 200, 200)
    assert rec["credential"] == fp(second) != fp(first)


async def test_a_malformed_request_gets_one_record(upstream, proxy, access_stream):
    """A request the engine refuses itself (no handler runs) is recorded too, once;
    a body that breaks after its handler started is recorded by the handler, once."""
    up = await upstream(echo.make_app())
    p = await proxy({"services": {"svc": bearer(up)}})
    stream = access_stream("json")
    port = p.server.port

    async def exchange(head: bytes, body: bytes = b"", handler_first: bool = False) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head)
        if handler_first:
            await wait_for(lambda: p.server._inflight == 1)  # the head alone: its handler runs
        writer.write(body)
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return reply

    assert (await exchange(b"GARBAGE\r\n\r\n")).startswith(b"HTTP/1.1 400")
    head = b"POST /svc/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nX-Request-Id: %s\r\n\r\n"
    assert (await exchange(head % b"audit-broken-at-once" + b"ZZ\r\n")).startswith(b"HTTP/1.1 400")
    assert (await exchange(head % b"audit-broken-later", b"ZZ\r\n", handler_first=True)).startswith(b"HTTP/1.1 400")
    recs = await wait_for(lambda: (r := records(stream, "json")) and len(r) >= 3 and r)
    assert len(recs) == 3
    garbage = [r for r in recs if r["method"] == "-"]
    assert len(garbage) == 1 and (garbage[0]["decision"], garbage[0]["status"], garbage[0]["path"]) == ("bad_request", 400, "-")
    for rid in ("audit-broken-at-once", "audit-broken-later"):
        rec = by_id(recs, rid)
        assert (rec["decision"], rec["status"], rec["service"], rec["method"]) == ("bad_request", 400, "svc", "POST")


# --------------------------------------------------------------------------- the audit file, in-process


async def test_audit_file_records_whatever_the_log_level(tmp_path, upstream, proxy, access_stream):
    up = await upstream(echo.make_app())
    audit = tmp_path / "audit.log"
    p = await proxy({"log": {"audit_file": str(audit)}, "services": {"svc": bearer(up)}})
    stream = access_stream("text", logging.WARNING)  # the access log is off at warning
    async with p.request("GET", "/svc/status/200", headers={"X-Request-Id": "audit-quiet"}) as r:
        assert r.status == 200
    recs = await wait_for(lambda: file_records(audit), timeout=5)
    assert [r["request_id"] for r in recs] == ["audit-quiet"] and recs[0]["status"] == 200
    assert stream.getvalue() == ""


async def test_a_failing_audit_file_is_logged_once_and_never_stops_serving(upstream, proxy, caplog):
    """/dev/full: every write fails with ENOSPC."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    caplog.set_level(logging.INFO, logger="authproxy")
    up = await upstream(echo.make_app())
    p = await proxy({"log": {"audit_file": "/dev/full"}, "services": {"svc": bearer(up)}})
    audit = access_log.audit
    assert audit is not None
    for n in range(1, 4):  # three flushes, each failing
        async with p.request("GET", "/svc/status/200") as r:
            assert r.status == 200
        await wait_for(lambda: audit.dropped >= n, timeout=5)
    failures = [r for r in caplog.records if r.getMessage() == "audit_file_failed"]
    assert len(failures) == 1 and failures[0].levelno == logging.WARNING
    assert failures[0].fields["op"] == "write" and failures[0].fields["path"] == "/dev/full"  # type: ignore[attr-defined]


async def test_a_failed_reopen_keeps_the_old_file_and_a_later_one_resumes(tmp_path, upstream, proxy, caplog):
    caplog.set_level(logging.INFO, logger="authproxy")
    up = await upstream(echo.make_app())
    audit = tmp_path / "audit.log"
    cfg = {"log": {"audit_file": str(audit)}, "services": {"svc": bearer(up)}}
    p = await proxy(cfg)
    config_file = write_config(tmp_path / "c.yaml", {"listen": "127.0.0.1:0", "state_dir": p.server.config.state_dir, **cfg})

    async def get(rid: str) -> None:
        async with p.request("GET", "/svc/status/200", headers={"X-Request-Id": rid}) as r:
            assert r.status == 200

    await get("before")
    audit.rename(tmp_path / "audit.log.1")
    audit.mkdir()  # the path cannot be opened as a file, not even by root
    assert await p.server.reload(str(config_file))
    await get("while-failing")
    await get("while-failing-2")
    failures = [r for r in caplog.records if r.getMessage() == "audit_file_failed"]
    assert len(failures) == 1 and failures[0].fields["op"] == "open"  # type: ignore[attr-defined]
    # Nothing is lost: the records go on into the file opened before.
    await wait_for(lambda: len(file_records(tmp_path / "audit.log.1")) == 3, timeout=5)
    audit.rmdir()
    assert await p.server.reload(str(config_file))
    await get("after")
    await wait_for(lambda: [r["request_id"] for r in file_records(audit)] == ["after"], timeout=5)
    assert [r["request_id"] for r in file_records(tmp_path / "audit.log.1")] == ["before", "while-failing", "while-failing-2"]
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("audit_file_")] == ["audit_file_failed", "audit_file_resumed"]
    assert stat.S_IMODE(audit.stat().st_mode) == 0o600


def test_audit_file_is_created_0600_and_an_existing_mode_is_left_alone(tmp_path):
    old = os.umask(0o022)
    try:
        new = AuditFile(str(tmp_path / "new.log"))
        new.reopen()
        existing = tmp_path / "existing.log"
        existing.write_text("")
        existing.chmod(0o640)
        kept = AuditFile(str(existing))
        kept.reopen()
    finally:
        os.umask(old)
    new.add('{"a": 1}')
    new.close()
    kept.close()
    assert stat.S_IMODE((tmp_path / "new.log").stat().st_mode) == 0o600
    assert stat.S_IMODE(existing.stat().st_mode) == 0o640
    assert (tmp_path / "new.log").read_text() == '{"a": 1}\n'


# --------------------------------------------------------------------------- the audit file, through the CLI


async def test_audit_file_through_the_cli_flushed_rotated_on_sighup_and_at_exit(tmp_path, upstream, cli):
    up = await upstream(echo.make_app())
    port = free_port()
    logs = tmp_path / "logs"
    logs.mkdir()
    audit = logs / "audit.log"
    rotated = logs / "audit.log.1"
    cfg = {
        "listen": f"127.0.0.1:{port}",
        "state_dir": str(tmp_path / "state"),
        "log": {"level": "info", "format": "text", "audit_file": str(audit)},
        "services": {"svc": bearer(up)},
    }
    old = os.umask(0o022)  # the child inherits it: the file must still be 0600
    try:
        proc = cli("run", "-c", str(write_config(tmp_path / "c.yaml", cfg)))
    finally:
        os.umask(old)
    proc.wait_log("listening")
    assert stat.S_IMODE(audit.stat().st_mode) == 0o600  # created at start

    made: list[str] = []
    async with aiohttp.ClientSession() as s:

        async def requests(n: int, tag: str) -> None:
            for i in range(n):
                rid = f"{tag}-{i}"
                async with s.get(f"http://127.0.0.1:{port}/svc/status/200?n={i}", headers={"X-Request-Id": rid}) as r:
                    assert r.status == 200
                made.append(rid)

        await requests(5, "first")
        done = time.monotonic()
        first = await wait_for(lambda: len(file_records(audit)) == 5 and file_records(audit), timeout=10)
        assert time.monotonic() - done < 2.0, "records must reach the file within about a second"
        assert [r["request_id"] for r in first] == made
        for rec in first:
            assert (rec["decision"], rec["status"], rec["upstream_status"], rec["service"], rec["method"]) == ("forwarded", 200, 200, "svc", "GET")
            assert rec["path"].startswith("/svc/status/200?n=") and rec["client"] == "127.0.0.1"

        # logrotate: rename, then (postrotate) SIGHUP. Requests in between still go to
        # the renamed file; the HUP writes what is pending there, then reopens the path.
        audit.rename(rotated)
        await requests(3, "between")
        proc.signal(signal.SIGHUP)
        await asyncio.to_thread(proc.wait_log, "reloaded")
        assert stat.S_IMODE(audit.stat().st_mode) == 0o600
        await requests(4, "after")
        await wait_for(lambda: len(file_records(audit)) == 4, timeout=10)
        await requests(3, "at-exit")  # stopped before the next flush: written at exit
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 20) == 0

    old_file = [r["request_id"] for r in file_records(rotated)]
    new_file = [r["request_id"] for r in file_records(audit)]
    assert old_file == [*(f"first-{i}" for i in range(5)), *(f"between-{i}" for i in range(3))]
    assert new_file == [*(f"after-{i}" for i in range(4)), *(f"at-exit-{i}" for i in range(3))]
    assert len(old_file) + len(new_file) == len(made) == 15  # nothing lost, nothing twice
    text = audit.read_text() + rotated.read_text() + proc.log()
    assert TOKEN not in text
    assert "audit_file_failed" not in proc.log()
