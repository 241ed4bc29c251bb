"""RFC 7636 — Proof Key for Code Exchange (PKCE), S256 only.

The verifier stays with whoever will exchange the code (the ``login`` process, or
the pending-login record the running proxy reads); only its SHA-256 challenge
travels in the authorization URL. ``plain`` is never used: it protects nothing
once the URL is seen.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets

METHOD = "S256"
_VERIFIER_RE = re.compile(r"^[A-Za-z0-9._~-]{43,128}$")


def make_verifier() -> str:
    """A fresh high-entropy verifier: 64 characters of the unreserved set (RFC 7636 §4.1)."""
    return secrets.token_urlsafe(48)


def challenge(verifier: str) -> str:
    """``BASE64URL(SHA256(ASCII(verifier)))`` without padding (RFC 7636 §4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def valid_verifier(verifier: str) -> bool:
    return bool(_VERIFIER_RE.fullmatch(verifier))
