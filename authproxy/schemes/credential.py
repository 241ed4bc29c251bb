"""What a scheme hands to the rest of authproxy, and what it may raise.

A :class:`Credential` is the value a scheme obtained, with what the credential
manager needs to know about it (expiry, whether authproxy made it); an
:class:`Outgoing` is the part of a request a scheme may change. The exceptions
say why no credential could be had, in the words the proxy and the CLI turn
into status codes and exit codes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from multidict import CIMultiDict

from authproxy.secret import Secret


# --------------------------------------------------------------------------- credentials


@dataclass(eq=False)
class Credential:
    """One credential as a scheme obtained it. ``repr()`` never shows the secret."""

    token: Secret
    expires_at: float | None = None  # wall-clock seconds; None = good until the upstream rejects it
    created: bool = False  # authproxy made it upstream, so authproxy revokes it
    key: str | None = None  # None for the service's own credential; a user id for OBO
    obtained_at: float = field(default_factory=time.time)
    meta: dict[str, Any] = field(default_factory=dict)  # non-secret facts a scheme wants kept

    def lifetime(self) -> float | None:
        return None if self.expires_at is None else self.expires_at - self.obtained_at

    def to_record(self) -> dict[str, Any]:
        return {
            "token": self.token.reveal(),
            "expires_at": self.expires_at,
            "created": self.created,
            "key": self.key,
            "obtained_at": self.obtained_at,
            "meta": self.meta,
        }

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> "Credential":
        return cls(
            token=Secret(str(rec["token"])),
            expires_at=None if rec.get("expires_at") is None else float(rec["expires_at"]),
            created=bool(rec.get("created", False)),
            key=rec.get("key"),
            obtained_at=float(rec.get("obtained_at") or time.time()),
            meta=dict(rec.get("meta") or {}),
        )


# --------------------------------------------------------------------------- failures


class CredentialError(Exception):
    """A credential could not be had. ``refused`` means the upstream said no (bad
    password, invalid_client): retrying soon will not help, so back off harder."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.refused = refused


class LoginRequired(CredentialError):
    """Only a person can fix this (``authproxy login SERVICE``)."""


class UpstreamReply(Exception):
    """The credential endpoint's own reply should go back to the client as is (e.g. an
    on-behalf-of user id the upstream rejects): the client asked for something wrong."""

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        super().__init__(f"upstream replied {status}")
        self.status = status
        self.headers = dict(headers)
        self.body = body


class Forbidden(Exception):
    """The client may not ask for this (``obo_forbidden``); nothing goes upstream."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------- the outgoing request


@dataclass(slots=True)
class Outgoing:
    """The parts of a request a scheme may change before it is forwarded."""

    headers: CIMultiDict[str]
    query: str  # the raw query string, without '?'
    body: bytes | None  # the kept body, or None when it streams (or there is none)
    method: str = "GET"
    path: str = "/"  # the raw upstream path


def set_query_param(query: str, name: str, value: str) -> str:
    """Replace every ``name=`` parameter of a raw query string by one with ``value``,
    leaving every other byte as the client sent it."""
    from urllib.parse import quote, unquote_plus

    encoded = f"{quote(name, safe='')}={quote(value, safe='')}"
    if not query:
        return encoded
    kept = [p for p in query.split("&") if unquote_plus(p.partition("=")[0]) != name]
    kept.append(encoded)
    return "&".join(p for p in kept if p)


class NotSupported(Exception):
    """A CLI command that does not apply to the service's scheme (exit 2)."""
