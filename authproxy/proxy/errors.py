"""The proxy's own error replies: one shape, so a client can tell them from the upstream's."""

from __future__ import annotations

import json
from http import HTTPStatus

REASONS = {
    "bad_request": 400,
    "inbound_key_required": 401,
    "obo_forbidden": 403,
    "not_allowed": 403,
    "host_not_allowed": 403,
    "origin_forbidden": 403,
    "no_route": 404,
    "upstream_unreachable": 502,
    "token_unavailable": 503,
    "login_required": 503,
    "upstream_timeout": 504,
}


class ProxyError(Exception):
    """Raised anywhere on the request path; answered by :func:`error_parts`."""

    def __init__(self, code: str, message: str, service: str | None = None, retry_after: float | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status or REASONS[code]
        self.message = message
        self.service = service
        self.retry_after = retry_after


def error_parts(err: ProxyError) -> tuple[int, list[tuple[str, str]], bytes]:
    """The proxy's error reply as (status, headers, body) for the HTTP engine to write."""
    headers = [("Content-Type", "application/json"), ("X-Authproxy-Error", err.code), ("Cache-Control", "no-store")]
    if err.retry_after is not None:
        headers.append(("Retry-After", str(max(1, int(err.retry_after + 0.999)))))
    if err.status == 407:  # a forward-proxy request: the key goes in Proxy-Authorization
        headers.append(("Proxy-Authenticate", 'Basic realm="authproxy"'))
    elif err.code == "inbound_key_required":
        headers.append(("WWW-Authenticate", 'X-Authproxy-Key realm="authproxy"'))
    body = json.dumps({"error": err.code, "message": err.message, "service": err.service}).encode()
    return err.status, headers, body


def reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"
