"""OpenTelemetry tracing (SPEC "Audit"): the real proxy (CLI subprocess) exporting to a
real OTLP/HTTP receiver on loopback, decoded with the OTLP protobuf definitions —
the SERVER span under the client's traceparent, a CLIENT span per upstream attempt
whose traceparent the upstream receives, the credential fetch span, the attributes,
no secret anywhere in what is exported, the flush at shutdown; and, without
``OTEL_EXPORTER_OTLP_ENDPOINT``, no OpenTelemetry module imported at all.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from aiohttp import web

from authproxy.testing import echo
from authproxy.testing import oauth2 as mock
from authproxy.tracing import Tracing, tracing
from tests.conftest import free_port, secret, wait_for, write_config

BEARER = secret("trace-bearer-t0ken-8d2e41")
CLIENT_SECRET = secret("trace-client-s3cret-0b7f93")
CLIENT_ID = "trace-client"
QUERY_MARK = "query-marker-5c1a77"  # in a request's query: never exported
OTEL_VARS = (
    "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "OTEL_PROPAGATORS",
    "OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_COMPRESSION",
)  # fmt: skip


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OTEL_* variable of the developer's environment leaks into a test."""
    for var in OTEL_VARS:
        monkeypatch.delenv(var, raising=False)


def otlp() -> Any:
    """The OTLP protobuf messages; the test is skipped without the otel packages."""
    why = "needs the otel packages (pip install -e '.[test]' installs them)"
    pytest.importorskip("opentelemetry.sdk", reason=why)
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason=why)
    return pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2", reason=why)


# --------------------------------------------------------------------------- the OTLP receiver


@dataclass
class Span:
    name: str
    kind: str  # SERVER | CLIENT | INTERNAL
    trace_id: str
    span_id: str
    parent: str  # '' for a root span
    attrs: dict[str, Any]
    error: bool
    resource: dict[str, Any]


@dataclass
class Receiver:
    pb: Any
    url: str = ""
    bodies: list[bytes] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)

    async def traces(self, request: web.Request) -> web.Response:
        assert request.headers.get("Content-Type") == "application/x-protobuf"
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.bodies.append(body)
        msg = self.pb.ExportTraceServiceRequest()
        msg.ParseFromString(body)
        kinds = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT"}
        for rs in msg.resource_spans:
            resource = _attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(
                        Span(s.name, kinds.get(s.kind, str(s.kind)), s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), _attrs(s.attributes), s.status.code == 2, resource)
                    )
        reply = self.pb.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type="application/x-protobuf")

    def in_trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id == trace_id]


def _attrs(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which) if which else None
    return out


@pytest.fixture
async def receiver(upstream: Callable[..., Any], clean_env: None) -> Receiver:
    recv = Receiver(otlp())
    app = web.Application()
    app.router.add_post("/v1/traces", recv.traces)
    recv.url = await upstream(app)
    return recv


def one(spans: list[Span], **match: Any) -> Span:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in match.items())]
    assert len(found) == 1, (match, spans)
    return found[0]


def traceparent() -> tuple[str, str, str]:
    """(header, trace id, span id) of a made-up client span, sampled."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


# --------------------------------------------------------------------------- the tests


async def test_spans_reach_an_otlp_receiver(tmp_path: Path, upstream, cli, receiver: Receiver):
    import aiohttp

    echo_app = echo.make_app()
    echo_url = await upstream(echo_app)
    auth = mock.make_app(clients=[mock.Client(CLIENT_ID, secret=CLIENT_SECRET)])
    st = auth[mock.STATE]
    sent_to_api: list[str] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith(mock.API_PATH):
            sent_to_api.append(request.headers.get("traceparent", ""))
        return await handler(request)

    auth.middlewares.append(record)
    auth_url = await upstream(auth)
    port = free_port()
    cfg = {
        "listen": f"127.0.0.1:{port}",
        "state_dir": str(tmp_path / "state"),
        "services": {
            "echo": {"upstream": echo_url, "auth": {"scheme": "bearer", "token": BEARER}},
            "oa": {
                "upstream": auth_url + mock.API_PATH,
                "auth": {"scheme": "oauth2", "token_url": auth_url + mock.TOKEN_PATH, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
            },
        },
    }
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    proc = cli("run", "-c", str(write_config(tmp_path / "c.yaml", cfg)), env=env)
    try:
        await asyncio.to_thread(proc.wait_log, "token_fetched")  # the background fetch at start
        base = f"http://127.0.0.1:{port}"
        header1, trace1, client1 = traceparent()
        header2, trace2, client2 = traceparent()
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{base}/echo/items/42?search={QUERY_MARK}", headers={"traceparent": header1, "X-Request-Id": "trace-echo"}) as r:
                assert r.status == 200
                seen = dict((k.lower(), v) for k, v in (await r.json())["headers"])
            st.revoke_access_tokens()  # the next request is rejected once, fetches anew, is replayed
            async with s.get(f"{base}/oa/v1/things?{QUERY_MARK}=1", headers={"traceparent": header2, "X-Request-Id": "trace-oa"}) as r:
                assert r.status == 200, await r.text()

        def complete() -> bool:
            return len(receiver.in_trace(trace1)) >= 2 and len(receiver.in_trace(trace2)) >= 4
        await wait_for(complete, timeout=15)

        # A request through a static scheme: SERVER under the client's span, one CLIENT attempt.
        spans1 = receiver.in_trace(trace1)
        server1 = one(spans1, kind="SERVER")
        assert server1.parent == client1 and server1.name == "GET /echo"
        assert server1.attrs == {
            "http.request.method": "GET",
            "url.path": "/echo/items/42",
            "http.route": "/echo",
            "http.response.status_code": 200,
            "authproxy.service": "echo",
            "authproxy.decision": "forwarded",
            "authproxy.request_id": "trace-echo",
        }
        attempt1 = one(spans1, kind="CLIENT")
        assert attempt1.parent == server1.span_id and attempt1.name == "GET" and not attempt1.error
        echo_port = int(echo_url.rsplit(":", 1)[1])
        assert attempt1.attrs == {
            "http.request.method": "GET",
            "server.address": "127.0.0.1",
            "server.port": echo_port,
            "url.scheme": "http",
            "http.response.status_code": 200,
            "authproxy.service": "echo",
            "authproxy.attempt": 1,
        }
        # The upstream got the attempt's traceparent, not the client's.
        version, up_trace, up_parent, flags = seen["traceparent"].split("-")
        assert (version, up_trace, up_parent, flags) == ("00", trace1, attempt1.span_id, "01")

        # A rejected credential: a fetch inside the request, then the one replay.
        spans2 = receiver.in_trace(trace2)
        server2 = one(spans2, kind="SERVER")
        assert server2.parent == client2 and server2.name == "GET /oa"
        assert (server2.attrs["authproxy.decision"], server2.attrs["http.response.status_code"], server2.attrs["url.path"]) == ("replayed", 200, "/oa/v1/things")
        first, second = sorted((s for s in spans2 if s.kind == "CLIENT"), key=lambda s: s.attrs["authproxy.attempt"])
        assert first.parent == second.parent == server2.span_id
        assert (first.attrs["authproxy.attempt"], first.attrs["http.response.status_code"], first.error) == (1, 401, True)
        assert (second.attrs["authproxy.attempt"], second.attrs["http.response.status_code"], second.error) == (2, 200, False)
        assert second.attrs["http.request.resend_count"] == 1 and "http.request.resend_count" not in first.attrs
        fetch = one(spans2, kind="INTERNAL")
        assert fetch.name == "credential fetch" and fetch.parent == server2.span_id and not fetch.error
        assert fetch.attrs == {"authproxy.service": "oa", "authproxy.scheme": "OAuth2Scheme", "authproxy.result": "ok"}
        # Each attempt sent its own traceparent (the replay is a span of its own).
        assert [tp.split("-")[1:3] for tp in sent_to_api[-2:]] == [[trace2, first.span_id], [trace2, second.span_id]]

        # The fetches at start belong to no request: each a trace of its own.
        background = {s.attrs["authproxy.service"]: s for s in receiver.spans if s.kind == "INTERNAL" and s.trace_id not in (trace1, trace2)}
        assert sorted(background) == ["echo", "oa"]  # a static scheme's credential is "fetched" (from the config) too
        assert all(s.parent == "" and s.attrs["authproxy.result"] == "ok" for s in background.values())
        assert background["echo"].trace_id != background["oa"].trace_id

        assert {s.resource.get("service.name") for s in receiver.spans} == {"authproxy"}
        exported = b"".join(receiver.bodies)
        tokens = list(st.access)
        assert len(tokens) == 2
        for value in [BEARER, CLIENT_SECRET, QUERY_MARK, *tokens]:
            assert value.encode() not in exported, value
    finally:
        for value in st.access:
            secret(value)
    proc.stop()
    assert proc.proc.returncode == 0


async def test_spans_are_flushed_at_shutdown(tmp_path: Path, upstream, cli, receiver: Receiver):
    import aiohttp

    echo_url = await upstream(echo.make_app())
    port = free_port()
    cfg = {
        "listen": f"127.0.0.1:{port}",
        "state_dir": str(tmp_path / "state"),
        "services": {"echo": {"upstream": echo_url, "auth": {"scheme": "bearer", "token": BEARER}}},
    }
    # A batch delay far beyond the test: only the flush at shutdown can export the spans.
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "600000", "OTEL_SERVICE_NAME": "proxy-under-test"}
    proc = cli("run", "-c", str(write_config(tmp_path / "c.yaml", cfg)), env=env)
    await asyncio.to_thread(proc.wait_log, "listening")
    header, trace_id, client_span = traceparent()
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{port}/echo/upload", data=b"x" * 100, headers={"traceparent": header}) as r:
            assert r.status == 200
    assert receiver.spans == []
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 20) == 0
    server = one(receiver.in_trace(trace_id), kind="SERVER")  # exported before the process exited
    assert (server.name, server.parent, server.resource["service.name"]) == ("POST /echo", client_span, "proxy-under-test")
    assert one(receiver.in_trace(trace_id), kind="CLIENT").parent == server.span_id


# --------------------------------------------------------------------------- off: nothing runs


@pytest.fixture
def no_otel_modules() -> Iterator[None]:
    """Take every opentelemetry module out of sys.modules (another test may have imported
    them), so the test sees whether the proxy imports any; restored after."""
    def ours() -> dict[str, Any]:
        return {n: m for n, m in sys.modules.items() if n == "opentelemetry" or n.startswith("opentelemetry.")}

    saved = ours()
    for name in saved:
        del sys.modules[name]
    try:
        yield
    finally:
        for name in ours():
            del sys.modules[name]
        sys.modules.update(saved)


async def test_without_the_variable_no_opentelemetry_is_imported(upstream, proxy, clean_env, no_otel_modules):
    up = await upstream(echo.make_app())
    p = await proxy({"services": {"svc": {"upstream": up, "auth": {"scheme": "bearer", "token": BEARER}}}})
    assert not tracing.enabled
    header, _, _ = traceparent()
    async with p.request("GET", "/svc/a?b=c", headers={"traceparent": header}) as r:
        assert r.status == 200
        seen = dict((k.lower(), v) for k, v in (await r.json())["headers"])
    assert seen["traceparent"] == header  # passed through as any end-to-end header
    await p.close()
    assert [n for n in sys.modules if n.startswith("opentelemetry")] == []
    # Nor when the modules are imported (a fresh interpreter: this one has them loaded).
    code = "import sys, authproxy.cli, authproxy.proxy.app; print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr


class _Refuse:
    """An import hook that makes the otel packages look uninstalled."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ImportError(f"No module named {name!r}")
        return None


async def test_the_variable_without_the_extra_warns_and_stays_off(monkeypatch, clean_env, no_otel_modules, caplog):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(sys, "meta_path", [_Refuse(), *sys.meta_path])
    t = Tracing()
    with caplog.at_level(logging.WARNING, "authproxy.tracing"):
        assert t.setup() is False
    assert not t.enabled
    assert "otel extra is not installed" in caplog.text
    await t.shutdown()  # nothing to do


@pytest.mark.parametrize(
    "env,on",
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, False),
    ],
)
def test_which_environment_turns_tracing_on(env, on):
    from authproxy.tracing import wanted

    assert wanted(env) is on
