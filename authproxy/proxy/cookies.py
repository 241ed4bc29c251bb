"""``Set-Cookie`` scoped to the service that set it.

Every service answers on the same origin (``127.0.0.1:8080``), so a cookie an
upstream sets with ``Path=/`` would otherwise be sent by the client's cookie jar
to every other service behind the proxy. Its ``Path`` is therefore moved under
the service prefix and its ``Domain`` dropped (a host-only cookie for the proxy).
"""

from __future__ import annotations


def scope_set_cookie(value: str, prefix: str, base_path: str) -> str:
    """Rewrite one ``Set-Cookie`` value.

    ``prefix`` is the service's proxy prefix (``/svc``), ``base_path`` the
    upstream's base path (``""`` or ``/api``). A cookie path below the base path
    keeps its tail (``/api/v2`` → ``/svc/v2``); any other path, or none, becomes
    the prefix itself.
    """
    parts = value.split(";")
    kept = [parts[0]]
    path: str | None = None
    for attr in parts[1:]:
        name = attr.split("=", 1)[0].strip().lower()
        if name == "domain":
            continue
        if name == "path":
            path = attr.split("=", 1)[1].strip() if "=" in attr else ""
            continue
        kept.append(attr)
    kept.insert(1, f" Path={_scoped_path(path, prefix, base_path)}")
    return ";".join(kept)


def _scoped_path(path: str | None, prefix: str, base_path: str) -> str:
    root = prefix.rstrip("/") or "/"
    if not path or not path.startswith("/"):
        return root
    if base_path:
        if path == base_path or path.startswith(base_path + "/"):
            tail = path[len(base_path):]
        else:
            return root
    else:
        tail = path
    if tail == "/":
        tail = ""
    return (prefix.rstrip("/") + tail) or "/"
