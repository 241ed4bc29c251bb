"""Least privilege: which methods and paths a service's ``allow`` rules let through.

Rules are compiled once per config load; matching a request is a few string
operations, never a regex built per request. A pattern is split on ``/`` into
segments: ``**`` (a whole segment) matches zero or more segments, ``*`` matches
any characters within one segment, anything else matches itself. A pattern
without ``*`` is a literal and only ever compared whole.

A path that an upstream might read differently from the way it is matched here
(an encoded ``/``, ``\\``, ``.`` or ``%``, a dot segment, an empty segment made
by ``//``) never matches a wildcard: a literal rule may still name it exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

Matcher = Callable[[str], bool]

ANY = "*"
# Methods a rule may name; TRACE and CONNECT are refused before any rule is asked.
KNOWN_METHODS = frozenset(
    "GET HEAD POST PUT PATCH DELETE OPTIONS "
    "PROPFIND PROPPATCH MKCOL COPY MOVE LOCK UNLOCK REPORT SEARCH MKCALENDAR ACL".split()
)
_UNSAFE_ESCAPE = re.compile(r"%(?:2[fFeE5]|5[cC])")


class RuleError(ValueError):
    """A rule that can never match; ``where`` is the key below the rule (``paths[1]``)."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(message)
        self.where = where
        self.message = message


def unsafe(path: str) -> bool:
    """True for a path that must not match a wildcard rule."""
    if "//" in path or "\\" in path or ("%" in path and _UNSAFE_ESCAPE.search(path)):
        return True
    if "." in path:
        for seg in path.split("/"):
            if seg == "." or seg == "..":
                return True
    return False


def _glob(pattern: str) -> Matcher:
    """One segment's matcher: ``*`` any characters but ``/``; leftmost-first is exact
    for ``*``-only globs, so matching is linear (no backtracking)."""
    if "*" not in pattern:
        return pattern.__eq__
    pieces = pattern.split("*")
    head, tail, middle = pieces[0], pieces[-1], pieces[1:-1]
    least = len(head) + len(tail) + sum(map(len, middle))

    def match(seg: str) -> bool:
        if len(seg) < least or not seg.startswith(head) or not seg.endswith(tail):
            return False
        i, end = len(head), len(seg) - len(tail)
        for piece in middle:
            j = seg.find(piece, i, end)
            if j < 0:
                return False
            i = j + len(piece)
        return True

    return match


@dataclass(frozen=True, eq=False)
class Glob:
    """A pattern with ``*`` or ``**``: blocks of segment matchers separated by ``**``."""

    pattern: str
    blocks: tuple[tuple[Matcher, ...], ...]

    @classmethod
    def compile(cls, pattern: str) -> "Glob":
        blocks: list[list[Matcher]] = [[]]
        for seg in pattern[1:].split("/"):
            if seg == "**":
                if blocks[-1] or len(blocks) == 1:
                    blocks.append([])
                continue  # '**/**' is one '**'
            blocks[-1].append(_glob(seg))
        return cls(pattern, tuple(tuple(b) for b in blocks))

    def match(self, segs: list[str]) -> bool:
        blocks = self.blocks
        first = blocks[0]
        if len(blocks) == 1:
            return len(segs) == len(first) and all(m(s) for m, s in zip(first, segs))
        last = blocks[-1]
        n = len(segs)
        if n < len(first) + len(last):
            return False
        if not all(m(s) for m, s in zip(first, segs)):
            return False
        end = n - len(last)
        if not all(m(s) for m, s in zip(last, segs[end:])):
            return False
        i = len(first)
        for block in blocks[1:-1]:  # each block at its leftmost place: exact for fixed-length blocks
            k = len(block)
            while i + k <= end and not all(m(s) for m, s in zip(block, segs[i : i + k])):
                i += 1
            if i + k > end:
                return False
            i += k
        return True


@dataclass(frozen=True)
class Rule:
    methods: frozenset[str] | None  # None: any method
    paths: tuple[str, ...]  # as written (for display)
    literals: frozenset[str]
    globs: tuple[Glob, ...]
    method_names: tuple[str, ...] = ()  # as written, () for any (for display)

    @property
    def methods_text(self) -> str:
        return ", ".join(self.method_names) if self.methods is not None else "any"


@dataclass(frozen=True)
class Policy:
    """A service's ``allow`` rules: a request no rule allows is refused."""

    rules: tuple[Rule, ...]

    def allows(self, method: str, path: str) -> bool:
        """``path`` is the request path after the service prefix, without the query
        (a request for exactly the prefix is matched as ``/``)."""
        path = path or "/"
        segs: list[str] | None = None
        wild: bool | None = None  # may a wildcard match this path at all
        for rule in self.rules:
            if rule.methods is not None and method not in rule.methods:
                continue
            if path in rule.literals:
                return True
            if rule.globs:
                if wild is None:
                    wild = not unsafe(path)
                    segs = path[1:].split("/")
                if not wild:
                    continue
                for g in rule.globs:
                    if g.match(segs):  # type: ignore[arg-type]
                        return True
        return False


def check_pattern(pattern: str) -> None:
    """ValueError naming why a pattern can never match a request path."""
    if not pattern.startswith("/"):
        raise ValueError("must start with '/' (the path after the service prefix)")
    if "?" in pattern or "#" in pattern:
        raise ValueError("the query is not part of the path a rule matches")
    if any(c.isspace() or ord(c) < 0x20 or c == "\x7f" for c in pattern):
        raise ValueError("a request path never holds spaces or control characters")
    if "\\" in pattern:
        raise ValueError("a request path holding '\\' is refused before any rule is asked")
    segs = pattern[1:].split("/")
    if any(s in (".", "..") or s.startswith("..;") for s in segs):
        raise ValueError("a request path with a '.' or '..' segment is refused before any rule is asked")
    for s in segs:
        if "**" in s and s != "**":
            raise ValueError("'**' must be a whole segment ('/a/**'); use '*' within a segment")
    if "*" in pattern and unsafe(pattern):
        raise ValueError("a rule with '*' never matches a path with '//' or an encoded '/', '\\', '.' or '%'")


def compile_rule(methods: tuple[str, ...] | None, paths: tuple[str, ...]) -> Rule:
    """RuleError for a rule that can never match."""
    written = tuple(methods or ())
    if methods is not None:
        if not methods:
            raise RuleError("methods", "must not be empty (leave methods out for any method)")
        for i, m in enumerate(methods):
            if m != ANY and m not in KNOWN_METHODS:
                hint = f" (methods are upper-case: {m.upper()})" if m.upper() in KNOWN_METHODS else ""
                raise RuleError(f"methods[{i}]", f"unknown method {m!r}{hint}")
        if ANY in methods:
            methods = None
    if not paths:
        raise RuleError("paths", "must not be empty")
    literals: set[str] = set()
    globs: list[Glob] = []
    for i, p in enumerate(paths):
        try:
            check_pattern(p)
        except ValueError as e:
            raise RuleError(f"paths[{i}]", str(e)) from None
        if "*" in p:
            globs.append(Glob.compile(p))
        else:
            literals.add(p)
    return Rule(frozenset(methods) if methods is not None else None, tuple(paths), frozenset(literals), tuple(globs), written)
