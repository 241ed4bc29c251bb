"""The proxy's own error replies: one shape, so a client can tell them from the upstream's."""

from __future__ import annotations

import json

from aiohttp import web

REASONS = {
    "bad_request": 400,
    "inbound_key_required": 401,
    "obo_forbidden": 403,
    "host_not_allowed": 403,
    "origin_forbidden": 403,
    "no_route": 404,
    "upstream_unreachable": 502,
    "token_unavailable": 503,
    "login_required": 503,
    "upstream_timeout": 504,
}


class ProxyError(Exception):
    """Raised anywhere on the request path; answered by :func:`error_response`."""

    def __init__(self, code: str, message: str, service: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = REASONS[code]
        self.message = message
        self.service = service
        self.retry_after = retry_after


def error_response(err: ProxyError) -> web.Response:
    headers = {"X-Authproxy-Error": err.code, "Cache-Control": "no-store"}
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, int(err.retry_after + 0.999)))
    if err.code == "inbound_key_required":
        headers["WWW-Authenticate"] = 'X-Authproxy-Key realm="authproxy"'
    body = json.dumps({"error": err.code, "message": err.message, "service": err.service}).encode()
    return web.Response(status=err.status, body=body, headers=headers, content_type="application/json")
