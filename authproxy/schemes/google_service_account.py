"""Google service-account key files (``service_account_file: key.json``).

``gcloud iam service-accounts keys create key.json`` (or the console) gives a
JSON document holding everything the RFC 7523 §2.1 JWT-bearer grant needs:
``client_email`` (the assertion's ``iss``), ``private_key`` (PEM, RSA),
``private_key_id`` (the JWT header's ``kid``, so Google finds the key without
trying each) and ``token_uri`` (where the assertion goes). Reading that format
here lets a user point at the file they downloaded rather than copy four values
out of it.

The file is a secret: its ``private_key`` is kept as a :class:`Secret` (no repr,
no log line shows it), and no error message quotes the file's content — a JSON
error says where, never what. The key itself is parsed and checked by
:func:`authproxy.schemes.rfc7523.parse_private_key`; this module only knows the
format, so it depends on nothing but the standard library.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from authproxy.secret import Secret

SERVICE_ACCOUNT_TYPE = "service_account"
_MAX_FILE = 256 * 1024


class ServiceAccountFileError(ValueError):
    """The key file cannot be used; the message says why and never shows its content."""


@dataclass(frozen=True)
class ServiceAccountKey:
    """What authproxy uses of a key file. ``repr`` shows the account, not the key."""

    path: str
    client_email: str
    private_key: Secret  # PEM
    private_key_id: str | None
    token_uri: str | None


def read_service_account(path: str | Path) -> ServiceAccountKey:
    """Read and check a Google service-account key file (``"type": "service_account"``)."""
    try:
        data = Path(path).read_bytes()[: _MAX_FILE + 1]
    except OSError as e:
        raise ServiceAccountFileError(f"cannot read {path}: {e.strerror or type(e).__name__}") from None
    if len(data) > _MAX_FILE:
        raise ServiceAccountFileError(f"{path} is larger than {_MAX_FILE} bytes; it is not a service-account key file")
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ServiceAccountFileError(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as e:  # its message gives the position only, never the text
        raise ServiceAccountFileError(f"{path} is not JSON (line {e.lineno}, column {e.colno})") from None
    if not isinstance(doc, dict):
        raise ServiceAccountFileError(f"{path} is not a JSON object")
    kind = doc.get("type")
    if kind != SERVICE_ACCOUNT_TYPE:
        shown = repr(kind) if isinstance(kind, str) and len(kind) <= 40 else "missing or not a string"
        raise ServiceAccountFileError(
            f'{path} is not a service-account key ("type" is {shown}, not "service_account"; '
            "an authorized_user or external_account file holds no key to sign with)"
        )
    email = doc.get("client_email")
    if not isinstance(email, str) or "@" not in email:
        raise ServiceAccountFileError(f"{path}: client_email is missing or not an e-mail address")
    pem = doc.get("private_key")
    if not isinstance(pem, str) or "PRIVATE KEY" not in pem:
        raise ServiceAccountFileError(f"{path}: private_key is missing or not a PEM private key")
    kid = doc.get("private_key_id")
    if kid is not None and (not isinstance(kid, str) or not kid.strip()):
        raise ServiceAccountFileError(f"{path}: private_key_id is not a string")
    token_uri = doc.get("token_uri")
    if token_uri is not None:
        parts = urlsplit(token_uri) if isinstance(token_uri, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ServiceAccountFileError(f"{path}: token_uri is not an absolute http(s) URL")
    return ServiceAccountKey(str(path), email, Secret(pem), kid or None, token_uri)
