"""``Location`` from an upstream: pointed back at the proxy, never followed.

Following a redirect would carry the credential wherever it points, so a
redirect is passed back to the client; one into the upstream's base path is
rewritten to the service's prefix, and any credential in its query removed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import unquote_plus

from yarl import URL

if TYPE_CHECKING:
    from authproxy.service_config import Upstream


def strip_params(query: str, names: frozenset[str], values: frozenset[str]) -> str:
    """The raw query without the parameters named in ``names`` or whose value is one of
    ``values``; every other byte as it was."""
    kept = []
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if unquote_plus(name).lower() in names or (value and unquote_plus(value) in values):
            continue
        kept.append(part)
    return "&".join(kept)


def rewrite_location(
    location: str, upstream: "Upstream", prefix: str, secret_names: frozenset[str], secret: str | None, direct: bool = False
) -> str:
    """A redirect into the upstream's base path is pointed back at the proxy's prefix,
    and any credential in it (a parameter named in ``secret_names``, or ``secret``'s
    value) is removed. Other locations are left alone. ``direct`` (forward-proxy mode,
    the client addresses the upstream's own paths): only the credential is removed."""
    try:
        u = URL(location, encoded=True)
    except ValueError:
        return location
    if u.is_absolute():
        if (u.scheme or "").lower() != upstream.scheme or (u.host or "").lower() != upstream.host.lower() or u.port != upstream.port:
            return location
    elif not location.startswith("/") or location.startswith("//"):
        return location
    path = u.raw_path
    base = upstream.base_path
    if base and not (path == base or path.startswith(base + "/")):
        return location
    if direct:
        new_path = location.partition("#")[0].partition("?")[0]
    else:
        new_path = (prefix.rstrip("/") + path[len(base):]) or "/"
    query = u.raw_query_string
    if query:
        query = strip_params(query, secret_names, frozenset({secret}) if secret else frozenset())
    frag = f"#{u.raw_fragment}" if u.raw_fragment else ""
    return new_path + (f"?{query}" if query else "") + frag
