"""Chunk-size lines held to the SPEC, beside llhttp: llhttp checks a chunked body's
structure, this checks what it lets through (digit count, extension budget)."""

from __future__ import annotations

from .errors import FramingError

CHUNK_EXTENSIONS_BUDGET = 1024  # bytes of chunk extensions a whole body may carry
_HEX = frozenset(b"0123456789abcdefABCDEF")
MAX_CHUNK_SIZE_DIGITS = 16
_SIZE, _LINE, _DATA, _DATA_END, _LAST = range(5)


class ChunkLines:
    """Walks a chunked body beside llhttp, over bytes llhttp has just accepted (so the
    structure is valid), to hold each chunk-size line to the SPEC: at most 16 hex digits
    (llhttp refuses only a value that overflows; leading zeros could make a size of any
    length) and at most 1 KiB of extensions over the whole body (httptools does not
    report extensions, and the overhead bound alone leaves slack on every chunk)."""

    __slots__ = ("_state", "_digits", "_size", "_left", "_ext")

    def __init__(self) -> None:
        self._state, self._digits, self._size, self._left, self._ext = _SIZE, 0, 0, 0, 0

    def feed(self, data: bytes, i: int, end: int) -> None:
        while i < end:
            state = self._state
            if state == _SIZE:
                j = i
                while j < end and data[j] in _HEX:
                    j += 1
                if j > i:
                    self._digits += j - i
                    if self._digits > MAX_CHUNK_SIZE_DIGITS:
                        raise FramingError("invalid chunk size")
                    self._size = (self._size << 4 * (j - i)) | int(data[i:j], 16)
                if j < end:
                    self._state = _LINE  # extensions, then CRLF
                i = j
            elif state == _LINE:
                k = data.find(b"\n", i, end)
                self._ext += (end if k == -1 else k - 1) - i  # not counting the CRLF
                if self._ext > CHUNK_EXTENSIONS_BUDGET:
                    raise FramingError("chunk extensions too long")
                if k == -1:
                    return
                i = k + 1
                self._state, self._left = (_DATA, self._size) if self._size else (_LAST, 0)
            elif state == _DATA or state == _DATA_END:
                step = min(self._left, end - i)
                i += step
                self._left -= step
                if not self._left:
                    if state == _DATA:
                        self._state, self._left = _DATA_END, 2  # the CRLF after the data
                    else:
                        self._state, self._digits, self._size = _SIZE, 0, 0
            else:  # the last chunk: trailers are llhttp's (and the overhead bound's)
                return
