"""The access log: one record per proxied request, and the audit file.

An :class:`AccessRecord` goes to the log stream (text or JSON, like every other
log line, but written without the logging machinery: it is the only log line on
the hot path) and, with ``log.audit_file``, to an audit file as JSON lines
(:class:`AuditFile`). A record never carries a secret: the path is masked by
the caller, and the credential is only its :func:`fingerprint`.

:func:`authproxy.observe.setup_logging` chooses the stream this log writes to,
so this module does not import :mod:`authproxy.observe`: its own two events
(``audit_file_failed``, ``audit_file_resumed``) are logged in the same shape as
``log_event``'s, by :func:`_log_event`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _encode_str  # type: ignore[attr-defined]
from typing import Any


def fingerprint(secret_value: str) -> str:
    """The access record's ``credential``: the first 12 hex characters of the SHA-256 of
    the injected secret value, so a rotation can be correlated without the value.
    Remembered per value (the str's hash is cached on the object the credential
    holds), so a request costs one dict lookup, not a SHA-256."""
    fp = _fingerprints.get(secret_value)
    if fp is None:
        if len(_fingerprints) >= _FINGERPRINTS_MAX:
            _fingerprints.clear()  # many on-behalf-of tokens: start over rather than grow
        fp = hashlib.sha256(secret_value.encode("utf-8", "surrogateescape")).hexdigest()[:12]
        _fingerprints[secret_value] = fp
    return fp


_fingerprints: dict[str, str] = {}
_FINGERPRINTS_MAX = 4096


@dataclass(slots=True)
class AccessRecord:
    """One proxied request, as the access log and the audit file record it.

    ``path`` is already masked (the caller's UrlMasker); ``credential`` is a
    :func:`fingerprint`, never a secret; ``decision`` is ``forwarded``,
    ``replayed``, ``tunnel``, ``local`` (answered by authproxy itself: reserved
    endpoints, a scheme's local reply) or the proxy's error code."""

    request_id: str
    client: str | None
    method: str
    path: str
    service: str | None
    status: int
    seconds: float
    key: str | None = None
    decision: str | None = None
    upstream_status: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    credential: str | None = None
    scrubbed: int = 0


def _q(value: str | None) -> str:
    """A JSON string (or null), with the C encoder json.dumps itself uses."""
    return "null" if value is None else _encode_str(value)


def _t(value: str | None) -> str:
    """A text-format value: ``-`` for none, JSON-quoted when it would break the line."""
    if value is None:
        return "-"
    if not value or " " in value or '"' in value or "=" in value or "\n" in value:
        return json.dumps(value)
    return value


class AuditFile:
    """``log.audit_file``: the access records as JSON lines, appended.

    Records are buffered and written at most ``FLUSH_INTERVAL`` after they were
    logged (sooner past ``FLUSH_BYTES``), with one ``write`` for the lot, and at
    exit. The file is created 0600 whatever the umask; an existing file's mode is
    left alone. :meth:`reopen` (SIGHUP, after logrotate renamed the file) first
    writes what is pending to the old file, then opens the path anew. A failure
    to open or write is one WARNING per episode (not one per record); records
    that could not be written are dropped and counted, serving goes on, and the
    first success after it logs ``audit_file_resumed`` with the count.
    """

    FLUSH_INTERVAL = 0.5  # seconds: SPEC says at least once a second
    FLUSH_BYTES = 256 * 1024

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._buf: list[str] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._failing = False  # a failure episode is under way (its WARNING was logged)
        self._open_pending = True  # the path must be (re)opened: at start, or a failed reopen
        self.dropped = 0  # records lost in the current failure episode
        self._broken_line = False  # a write stopped mid-line: start the next one on a new line

    # ------------------------------------------------------------------ records
    def add(self, line: str) -> None:
        self._buf.append(line)
        self._size += len(line) + 1
        if self._size >= self.FLUSH_BYTES:
            self.flush()
            return
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()  # no event loop (a library user): write now
                return
            self._timer_loop = loop
            self._timer = loop.call_later(self.FLUSH_INTERVAL, self._on_timer)
        elif self._timer_loop is not None and self._timer_loop.is_closed():
            # Armed on an event loop that has gone since (tests run one loop each).
            self._timer = None
            self.flush()

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buf:
            return
        if self._open_pending:
            self._open()
        lines = self._buf
        self._buf, self._size = [], 0
        fd = self._fd
        if fd is None:
            self.dropped += len(lines)
            return
        data = (("\n" if self._broken_line else "") + "\n".join(lines) + "\n").encode("utf-8", "surrogateescape")
        view = memoryview(data)
        try:
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except OSError as e:
            self._broken_line = len(view) < len(data)  # part of it went out
            self.dropped += len(lines)
            self._fail("write", e)
            return
        self._broken_line = False
        if self._failing and not self._open_pending:
            self._resumed()

    # ------------------------------------------------------------------ the file
    def reopen(self) -> None:
        """After a rotation: what is pending goes to the old file, new records to a new one."""
        self.flush()
        self._open()

    def close(self) -> None:
        self.flush()
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _open(self) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
        try:
            try:
                fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                fd = os.open(self.path, flags)
            else:
                with contextlib.suppress(OSError):
                    os.fchmod(fd, 0o600)  # 0600 even under a umask that takes owner bits away
        except OSError as e:
            # Keep writing to the file opened before (a rotated one, say): nothing is
            # lost, and the open is tried again with the next records.
            self._open_pending = True
            self._fail("open", e)
            return
        old, self._fd = self._fd, fd
        self._open_pending = False
        if old is not None:
            with contextlib.suppress(OSError):
                os.close(old)
        if self._failing:
            self._resumed()

    def _fail(self, op: str, e: OSError) -> None:
        if not self._failing:
            self._failing = True
            _log_event(logging.WARNING, "audit_file_failed", op=op, path=self.path, error=e.strerror or str(e))

    def _resumed(self) -> None:
        self._failing = False
        _log_event(logging.INFO, "audit_file_resumed", path=self.path, dropped=self.dropped)
        self.dropped = 0


_audit_log = logging.getLogger("authproxy.audit")


def _log_event(level: int, event: str, **fields: Any) -> None:
    """:func:`authproxy.observe.log_event` on the ``authproxy.audit`` logger (the same record)."""
    if _audit_log.isEnabledFor(level):
        _audit_log.log(level, event, extra={"fields": fields})


class AccessLog:
    """One record per proxied request (:class:`AccessRecord`), written without the
    logging machinery.

    The access log is the only log line on the hot path, and going through
    ``logging`` (a LogRecord, handler locks, a formatter, a write and a flush per
    line) costs more CPU than the rest of the proxy's own work for a small
    request. Lines are formatted directly and written once per event-loop
    iteration, so a burst of requests costs one ``write`` call, not one each.
    When :func:`setup_logging` has not chosen a stream (a library user, the
    tests), lines go through ``logging`` like every other event.

    With an audit file (:meth:`open_audit`), each record is also one JSON line
    there (the same line as the JSON log format), whatever the log level.
    """

    def __init__(self) -> None:
        self.stream: Any = None
        self.json = False
        self.enabled = True
        self.audit: AuditFile | None = None
        self._buf: list[str] = []
        self._scheduled = False
        self._sec = -1
        self._prefix = ""
        self._logger = logging.getLogger("authproxy.access")

    def configure(self, stream: Any, fmt: str, level: int) -> None:
        self.flush()
        self.stream = stream
        self.json = fmt == "json"
        self.enabled = level <= logging.INFO

    # ------------------------------------------------------------------ the audit file
    def open_audit(self, path: str | None) -> None:
        """Write records to ``path`` too (None: stop). The same path again changes
        nothing; another one closes the old file first."""
        if path is not None:
            path = os.path.expanduser(path)
        current = self.audit
        if current is not None and current.path == path:
            return
        if current is not None:
            current.close()
        self.audit = None
        if path is not None:
            self.audit = AuditFile(path)
            self.audit._open()

    def reopen(self) -> None:
        """SIGHUP: reopen the audit file at its path (logrotate renamed it)."""
        if self.audit is not None:
            self.audit.reopen()

    def close_audit(self) -> None:
        self.open_audit(None)

    # ------------------------------------------------------------------ records
    def _ts(self, now: float) -> str:
        sec = int(now)
        if sec != self._sec:
            self._sec = sec
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self._prefix}.{int((now - sec) * 1000):03d}Z"

    def log(
        self,
        request_id: str,
        client: str | None,
        method: str,
        path: str,
        service: str | None,
        status: int,
        seconds: float,
        key: str | None = None,
    ) -> None:
        """The older call, kept for callers not yet building an :class:`AccessRecord`."""
        self.record(AccessRecord(request_id, client, method, path, service, status, seconds, key))

    def record(self, rec: AccessRecord) -> None:
        audit = self.audit
        stream = self.stream
        if stream is None:
            if self._logger.isEnabledFor(logging.INFO):
                self._logger.info("request", extra={"fields": self._fields(rec)})
            if audit is None:
                return
        elif not self.enabled and audit is None:
            return
        ts = self._ts(time.time())
        doc: str | None = None
        if stream is not None and self.enabled:
            if self.json:
                line = doc = self._json(ts, rec)
            else:
                line = self._text(ts, rec)
            self._buf.append(line)
            if not self._scheduled:
                self._scheduled = True
                try:
                    asyncio.get_running_loop().call_soon(self._flush_lines)
                except RuntimeError:
                    self._flush_lines()
        if audit is not None:
            audit.add(doc if doc is not None else self._json(ts, rec))

    @staticmethod
    def _fields(rec: AccessRecord) -> dict[str, Any]:
        return {
            "request_id": rec.request_id, "client": rec.client, "key": rec.key, "method": rec.method, "path": rec.path,
            "service": rec.service, "decision": rec.decision, "status": rec.status, "upstream_status": rec.upstream_status,
            "bytes_in": rec.bytes_in, "bytes_out": rec.bytes_out, "duration_ms": round(rec.seconds * 1000, 2),
            "credential": rec.credential, "scrubbed": rec.scrubbed,
        }  # fmt: skip

    @staticmethod
    def _text(ts: str, rec: AccessRecord) -> str:
        # A request target never holds a space (it would not parse); quote only a '"'.
        path = rec.path
        p = json.dumps(path) if '"' in path else path
        us = rec.upstream_status
        return (
            f"{ts} INFO  request request_id={rec.request_id} client={rec.client or '-'} key={_t(rec.key)}"
            f" method={rec.method} path={p} service={rec.service or '-'} decision={rec.decision or '-'}"
            f" status={rec.status} upstream_status={'-' if us is None else us} bytes_in={rec.bytes_in}"
            f" bytes_out={rec.bytes_out} duration_ms={round(rec.seconds * 1000, 2)}"
            f" credential={rec.credential or '-'} scrubbed={rec.scrubbed}"
        )

    @staticmethod
    def _json(ts: str, rec: AccessRecord) -> str:
        # Built directly (what json.dumps would print for this dict, with its own C
        # string encoder): no dict and no encoder walk per request.
        us = rec.upstream_status
        return (
            f'{{"ts": "{ts}", "level": "info", "event": "request", "logger": "authproxy.access",'
            f' "request_id": {_q(rec.request_id)}, "client": {_q(rec.client)}, "key": {_q(rec.key)},'
            f' "method": {_q(rec.method)}, "path": {_q(rec.path)}, "service": {_q(rec.service)},'
            f' "decision": {_q(rec.decision)}, "status": {int(rec.status)},'
            f' "upstream_status": {"null" if us is None else int(us)}, "bytes_in": {int(rec.bytes_in)},'
            f' "bytes_out": {int(rec.bytes_out)}, "duration_ms": {float(round(rec.seconds * 1000, 2))!r},'
            f' "credential": {_q(rec.credential)}, "scrubbed": {int(rec.scrubbed)}}}'
        )

    def _flush_lines(self) -> None:
        self._scheduled = False
        if not self._buf:
            return
        if self.stream is None:
            self._buf.clear()
            return
        data = "\n".join(self._buf) + "\n"
        self._buf.clear()
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must not take requests down with it

    def flush(self) -> None:
        """Write everything pending: the log lines, and the audit file's records (at exit)."""
        self._flush_lines()
        if self.audit is not None:
            self.audit.flush()


access_log = AccessLog()
atexit.register(access_log.flush)  # the audit file's last records, however the process ends
