"""Longest-prefix routing on path-segment boundaries."""

from __future__ import annotations

from typing import Generic, Iterable, TypeVar

T = TypeVar("T")


class Router(Generic[T]):
    """``/api`` matches ``/api`` and ``/api/x`` but not ``/apix``; the longest prefix wins."""

    def __init__(self, routes: Iterable[tuple[str, T]]) -> None:
        # Longest first, so the first match is the longest one.
        self._routes = sorted(((p, t) for p, t in routes), key=lambda r: len(r[0]), reverse=True)

    def match(self, path: str) -> tuple[T, str] | None:
        """The target and the rest of the path ('' when the path is exactly the prefix)."""
        for prefix, target in self._routes:
            if prefix == "/":
                return target, path
            if path.startswith(prefix):
                n = len(prefix)
                if len(path) == n or path[n] == "/":
                    return target, path[n:]
        return None
