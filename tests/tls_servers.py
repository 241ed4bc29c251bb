"""TLS servers that check client certificates (mTLS), for tests/test_mtls.py.

A test CA (``trustme``) issues the servers' certificates and the clients'
certificates alike; a server trusts that CA for client certificates and either
insists on one (``CERT_REQUIRED``: the handshake fails without it, as an mTLS
API gateway does) or lets the application decide (``CERT_OPTIONAL``: what a
token endpoint serving several client authentication methods does, so that a
missing certificate is answered with an OAuth error the client can show).
Everything is generated at test time; nothing here is a real secret.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import trustme
from aiohttp import web
from cryptography import x509

@dataclass(frozen=True)
class ClientCert:
    """A client certificate and its key as files, plus what a server registers for it."""

    cert_file: Path
    key_file: Path
    subject_dn: str  # RFC 4514, as RFC 8705 §2.1.2's tls_client_auth_subject_dn

    def tls(self) -> dict[str, str]:
        """The service ``tls`` block that presents this certificate."""
        return {"cert_file": str(self.cert_file), "key_file": str(self.key_file)}


class Pki:
    """One test CA, its bundle on disk (for ``ca_file``), and certificates on demand."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca = trustme.CA()
        self.ca_file = folder / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def client(self, name: str, *sans: str) -> ClientCert:
        """A client certificate with CN=name (and SANs: DNS names, e-mail addresses)."""
        leaf = self.ca.issue_cert(*(sans or (f"{name}.clients.test",)), common_name=name)
        cert_file, key_file = self.folder / f"{name}.crt", self.folder / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert_file))
        leaf.private_key_pem.write_to_path(str(key_file))
        subject = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).subject.rfc4514_string()
        return ClientCert(cert_file, key_file, subject)

    def server_context(self, verify: ssl.VerifyMode) -> ssl.SSLContext:
        """A server context for 127.0.0.1 that asks for client certificates from this CA."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
        self.ca.configure_trust(ctx)
        ctx.verify_mode = verify
        return ctx


async def start_tls(app: web.Application, ctx: ssl.SSLContext, runners: list[web.AppRunner]) -> str:
    """Serve ``app`` over TLS on a loopback port; returns its https base URL. The runner
    joins ``runners`` (the caller cleans them up)."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    runners.append(runner)
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return f"https://127.0.0.1:{port}"


def peer_subject(request: web.Request) -> str | None:
    """The RFC 4514 subject of the client certificate on this request's connection."""
    ssl_object: Any = request.transport.get_extra_info("ssl_object") if request.transport else None
    return _subject(ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None)


def _subject(der: bytes | None) -> str | None:
    return x509.load_der_x509_certificate(der).subject.rfc4514_string() if der else None


class MtlsApi:
    """An API behind mTLS that fails the handshake without a client certificate.

    Threads and blocking sockets rather than aiohttp, on purpose: asyncio's TLS
    server drops the connection on a failed handshake without sending the TLS
    alert, while real servers (nginx ``ssl_verify_client on``, Go, Envoy) send it
    (``certificate required`` in TLS 1.3) — and that alert is what a client can
    show a person. Each request is answered with the client certificate's subject;
    ``seen`` records (subject, Authorization) and ``handshake_errors`` each refusal.
    """

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.seen: list[tuple[str | None, str | None]] = []
        self.handshake_errors: list[str] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                subject = _subject(self.connection.getpeercert(binary_form=True))  # type: ignore[attr-defined]
                api.seen.append((subject, self.headers.get("Authorization")))
                self._answer({"path": self.path, "client_subject": subject})

            do_POST = do_GET  # noqa: N815

            def _answer(self, doc: dict[str, Any]) -> None:
                body = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def finish_request(self, request: Any, client_address: Any) -> None:
                tls = ctx.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
                try:  # the handshake, here in the connection's thread; a failure sends the alert
                    tls.do_handshake()
                except (ssl.SSLError, OSError) as e:
                    api.handshake_errors.append(str(e))
                    _linger(tls)
                    return
                super().finish_request(tls, client_address)

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"https://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="mtls-api", daemon=True)

    def __enter__(self) -> "MtlsApi":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def _linger(sock: socket.socket) -> None:
    """Close after the alert the way nginx's lingering close does: stop sending, read
    what the client had already sent, then close — closing with unread data would
    reset the connection, and a reset can overtake the alert on the client's side."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(2)
        while sock.recv(65536):
            pass
    except OSError:
        pass
    finally:
        sock.close()
