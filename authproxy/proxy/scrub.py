"""Response scrubbing: the credential authproxy injected never comes back to the client.

A :class:`Scrubber` is built once per credential (the forwarder caches it) from
the values the scheme injects (``Scheme.exported``): the whole value of each
injected header or query parameter (for ``Authorization: <scheme> X``, ``X``),
each in its raw form and percent-encoded (``quote(v, safe='')``, the same with
``/`` kept, and with ``+`` for spaces; upper and lower hex). Every occurrence of
any of these forms in a response header value or an uncompressed body becomes as
many ``*`` as it had bytes, so lengths and framing never change.

Cost: a body or header block that holds no secret is checked with one search
per secret (its longest run of unreserved characters, which all its forms share;
every form when that run is short) and passed on as the same object. A compiled
regex alternation of the forms was 5-100x slower than ``bytes in`` (about 5
GB/s); on pieces of 16 KiB and more, the C library's ``memmem`` (through ctypes,
when there is one) is 1.4-4x faster still. Even so a large download pays one more
pass over every byte (about 0.15-0.2 s of CPU per GiB on the benchmark machine,
+15-30% of the proxy's own; a small response about 3 us, +3%): see
bench/scrub_micro.py. Only where a needle is found is the masking (overlapping
occurrences included) done. A streamed body (:class:`BodyStream`) holds
back only the tail of a piece that is the beginning of some form (at most the
longest form minus one byte), so an SSE event whose end cannot begin a secret
is passed on whole at once.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping
from urllib.parse import quote, quote_plus

from authproxy.secret import MIN_SECRET

_PCT = re.compile(r"%[0-9A-F]{2}")
_UNRESERVED_RUN = re.compile(rb"[A-Za-z0-9._~-]+")  # left alone by every encoding: in every form
MIN_NEEDLE = 8  # a run at least this long stands for all of a secret's forms in the first check
_AUTH_HEADERS = ("authorization", "proxy-authorization")
MEMMEM_MIN = 16384  # below this, ``in`` is as fast as a ctypes call's overhead allows


def _load_memmem():  # type: ignore[no-untyped-def]
    """libc's memmem(3), or None (no ctypes, no such symbol, or it answers wrong)."""
    try:
        import ctypes

        fn = ctypes.CDLL(None).memmem
        fn.restype = ctypes.c_void_p
        fn.argtypes = (ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t)
        if fn(b"xx\0abcd", 7, b"bc", 2) and not fn(b"abcd", 4, b"cde", 3) and not fn(b"ab\0cd", 5, b"b\0d", 3):
            return fn
    except Exception:  # noqa: BLE001 - any failure: the portable search is used
        pass
    return None


_memmem = _load_memmem()


def injected_values(exported: Mapping[str, Mapping[str, str]]) -> list[str]:
    """The secret values of ``Scheme.exported(cred)``: each injected header's or
    parameter's whole value; for an ``Authorization: Bearer X`` header, ``X``."""
    values: list[str] = []
    for name, value in (exported.get("headers") or {}).items():
        if name.lower() in _AUTH_HEADERS:
            scheme, sp, rest = value.strip().partition(" ")
            if sp and rest.strip():
                value = rest.strip()
        values.append(value)
    values.extend((exported.get("query") or {}).values())
    return values


def forms(value: str) -> set[bytes]:
    """Every form of ``value`` that is looked for: raw (UTF-8) and percent-encoded."""
    out = {value.encode("utf-8")}
    for q in (quote(value, safe=""), quote(value), quote_plus(value, safe="")):
        out.add(q.encode("ascii"))
        out.add(_PCT.sub(lambda m: m.group().lower(), q).encode("ascii"))
    return out


class Scrubber:
    """Masks a fixed set of secret values. Immutable once built; share it freely
    (a streamed body keeps its own state in :meth:`stream`)."""

    __slots__ = ("_forms", "_strs", "_needles", "_needle_strs", "_keep", "_by_first")

    def __init__(self, values: Iterable[str | None]) -> None:
        found: set[bytes] = set()
        needles: set[bytes] = set()
        for v in values:
            if v and len(v) >= MIN_SECRET:  # shorter values would mask half of every text
                these = forms(v)
                found |= these
                # The first check looks for one needle per secret where it can: its longest
                # run of unreserved characters, which every form contains unchanged.
                run = max(_UNRESERVED_RUN.findall(v.encode("utf-8")), key=len, default=b"")
                needles |= {run} if len(run) >= MIN_NEEDLE or len(these) == 1 else these
        # A needle inside another needle makes the longer one redundant.
        self._needles = tuple(n for n in needles if not any(o != n and o in n for o in needles))
        self._needle_strs = tuple(n.decode("latin-1") for n in self._needles)
        # Longest first: where two forms start at one place, the longer one is masked whole.
        self._forms: tuple[bytes, ...] = tuple(sorted(found, key=lambda f: (-len(f), f)))
        # Header values are latin-1 strings (the engine decodes them so): same bytes, same length.
        self._strs: tuple[str, ...] = tuple(f.decode("latin-1") for f in self._forms)
        self._keep = max((len(f) for f in self._forms), default=1) - 1  # the most a stream ever holds back
        by_first: dict[bytes, list[bytes]] = {}
        for f in self._forms:
            by_first.setdefault(f[:1], []).append(f)
        self._by_first = tuple((k, tuple(v)) for k, v in by_first.items())

    def __bool__(self) -> bool:
        return bool(self._forms)

    @property
    def keep(self) -> int:
        return self._keep

    # ------------------------------------------------------------------ headers
    def headers(self, pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], int]:
        """Response headers with every secret in a value masked; (pairs, count)."""
        strs = self._strs
        if not strs or not pairs:
            return pairs, 0
        joined = "\n".join([v for _, v in pairs])  # one search per needle for the whole block
        for s in self._needle_strs:
            if s in joined:
                break
        else:
            return pairs, 0
        out: list[tuple[str, str]] = []
        total = 0
        for k, v in pairs:
            v, n, _ = self._mask(v, forms=strs)
            total += n
            out.append((k, v))
        return out, total

    # ------------------------------------------------------------------ bodies
    def body(self, data: bytes) -> tuple[bytes, int]:
        """A whole body: (masked body, count). The same object when it holds no secret."""
        if self._found(data):
            out, n, _ = self._mask(data)
            return out, n
        return data, 0

    def stream(self) -> "BodyStream":
        return BodyStream(self)

    def _found(self, data: bytes) -> bool:
        """Whether any needle is in ``data`` (a streamed piece: often large)."""
        if _memmem is not None and len(data) >= MEMMEM_MIN and type(data) is bytes:
            n = len(data)
            for f in self._needles:
                if _memmem(data, n, f, len(f)):
                    return True
            return False
        for f in self._needles:
            if f in data:
                return True
        return False

    # ------------------------------------------------------------------ the work
    def _mask(self, buf, masked=None, forms=None, reach: int = 0, limit: int | None = None):  # type: ignore[no-untyped-def]
        """Mask every occurrence of every form in ``buf`` (bytes, or a latin-1 str with
        ``forms`` = the str forms), overlapping ones too: the union of their bytes.
        ``masked`` is ``buf`` with earlier masks applied (a stream's carry).
        Counted: each occurrence not inside one counted before, among those starting
        before ``limit`` (a stream counts what lies wholly in its held tail later,
        when it is seen whole); ``reach`` is where earlier counted ones end.
        → (masked, count, reach)"""
        spans: list[tuple[int, int]] = []
        for f in self._forms if forms is None else forms:
            n = len(f)
            i = buf.find(f)
            while i >= 0:
                spans.append((i, i + n))
                i = buf.find(f, i + 1)
        base = buf if masked is None else masked
        if not spans:
            return base, 0, reach
        star = "*" if isinstance(buf, str) else b"*"
        spans.sort(key=lambda s: (s[0], -s[1]))
        parts = []
        pos = 0
        for start, end in spans:
            if end > pos:
                lo = max(start, pos)
                parts.append(base[pos:lo])
                parts.append(star * (end - lo))
                pos = end
        parts.append(base[pos:])
        if limit is None:
            limit = len(buf)
        count = 0
        for start, end in spans:
            if start >= limit:
                break
            if end > reach:
                count += 1
                reach = end
        return base[:0].join(parts), count, reach

    def held(self, buf: bytes) -> int:
        """How many bytes at the end of ``buf`` could be the beginning of a form (a
        secret split between two reads): at most the longest form minus one."""
        n = len(buf)
        lo = n - self._keep if n > self._keep else 0
        best = 0
        for first, group in self._by_first:
            i = buf.find(first, lo)
            while i >= 0 and n - i > best:
                tail = buf[i:]
                size = n - i
                if any(len(f) > size and f.startswith(tail) for f in group):
                    best = size
                    break
                i = buf.find(first, i + 1)
        return best


class BodyStream:
    """One streamed body: :meth:`feed` each piece as it arrives and send what it
    returns at once; :meth:`flush` at the end. Only the tail that could begin a
    secret is held back (never more than ``Scrubber.keep`` bytes)."""

    __slots__ = ("_s", "_carry", "_carry_masked", "_reach", "count")

    def __init__(self, scrubber: Scrubber) -> None:
        self._s = scrubber
        self._carry = b""  # the held tail as received
        self._carry_masked = b""  # the same, with masks already applied to it
        self._reach = 0  # how far into the carry an occurrence already counted reaches
        self.count = 0

    def feed(self, chunk: bytes) -> bytes:
        s = self._s
        carry = self._carry
        buf = carry + chunk if carry else chunk
        k = s.held(buf)
        limit = len(buf) - k
        if s._found(buf):
            out, n, reach = s._mask(buf, self._carry_masked + chunk if carry else None, reach=self._reach, limit=limit)
            self.count += n
            self._reach = max(0, reach - limit)
        else:
            out = self._carry_masked + chunk if carry else chunk
            if self._reach:
                self._reach = max(0, self._reach - limit)
        if k:
            self._carry = buf[limit:]
            self._carry_masked = out[limit:]
            return out[:limit]
        if carry:
            self._carry = self._carry_masked = b""
        return out

    def flush(self) -> bytes:
        """The held tail (it never completed a secret; shorter ones in it are masked)."""
        out = self._carry_masked
        if self._carry:
            self.count += self._s._mask(self._carry, out, reach=self._reach)[1]
        self._carry = self._carry_masked = b""
        self._reach = 0
        return out


def is_compressed(encodings: Iterable[str]) -> bool:
    """Whether ``Content-Encoding`` values name anything but ``identity``."""
    for value in encodings:
        for token in value.split(","):
            t = token.strip().lower()
            if t and t != "identity":
                return True
    return False
