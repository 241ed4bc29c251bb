"""Which headers cross the proxy: hop-by-hop ones never do, in either direction."""

from __future__ import annotations

from typing import Any

from multidict import CIMultiDict

# RFC 9110 §7.6.1, plus the proxy-only headers of RFC 9110 §11.7.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)
# Request headers the proxy itself consumes or sets (the engine owns the framing ones).
REQUEST_DROP = HOP_BY_HOP | {
    "host",
    "content-length",
    "expect",
    "x-authproxy-key",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
}
# Response headers the engine writes itself.
RESPONSE_DROP = HOP_BY_HOP | {"content-length"}

_NO_NAMES: frozenset[str] = frozenset()
_NAMED_CACHE: dict[str, frozenset[str]] = {}


def connection_named(headers: Any) -> frozenset[str]:
    """The header names a ``Connection`` header lists (hop-by-hop too). Peers send the
    same few values ("keep-alive", "close"), so parsed values are remembered."""
    values = headers.getall("Connection", ())
    if not values:
        return _NO_NAMES
    joined = ",".join(values) if len(values) > 1 else values[0]
    names = _NAMED_CACHE.get(joined)
    if names is None:
        names = frozenset(t.strip().lower() for t in joined.split(",") if t.strip())
        if len(_NAMED_CACHE) < 256:
            _NAMED_CACHE[joined] = names
    return names


def end_to_end(headers: Any, drop: frozenset[str]) -> CIMultiDict[str]:
    """A copy of ``headers`` without ``drop`` and the names ``Connection`` lists. A
    header the client names in ``Connection`` is removed before the credential is
    injected, so no client can strip an injected header that way."""
    named = connection_named(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        lk = k.lower()
        if lk in drop or lk in named:
            continue
        out.add(k, v)
    return out
