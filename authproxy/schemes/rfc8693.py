"""RFC 8693 — OAuth 2.0 Token Exchange (``grant: token_exchange``), for workload identity.

A workload already holds a token someone else issued to it — a Kubernetes
projected service-account token, a CI job's OIDC token — and trades it at the
token endpoint for an access token to the API. No client secret needs to be
deployed, which is the point: so client authentication may be ``none``.

The subject (and actor) token file is read again at *every* exchange: the kubelet
and CI runners rotate these files in place, and a token remembered from start-up
would expire under a long-running proxy. What the file holds is a secret: an
error names the path, never the content, and the token is masked in whatever the
server echoes back (``GRANT_SECRETS`` in :mod:`authproxy.schemes.oauth2`).
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from authproxy.schemes.base import CredentialError
from authproxy.secret import Secret
from authproxy.settings import FieldError

if TYPE_CHECKING:
    from authproxy.schemes.oauth2 import OAuth2Scheme
    from authproxy.schemes.oauth2_config import OAuth2Config

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"
#: Settings only this grant reads: with another grant they would be ignored, so they are errors.
KEYS = (
    "subject_token_file",
    "subject_token_type",
    "actor_token_file",
    "actor_token_type",
    "audience",
    "resource",
    "requested_token_type",
)
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$")  # RFC 3986 §3.1 scheme, then anything visible
_MAX_TOKEN_FILE = 64 * 1024  # a token, not a document: a larger file is the wrong file


def resources(value: str | tuple[str, ...] | None) -> list[str]:
    """``resource`` given as one URI or a list → the list (sent as repeated parameters)."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def read_token_file(path: str, key: str) -> Secret:
    """The token in ``path`` now, trailing newline stripped. A missing or empty file is a
    CredentialError naming ``key`` and the path (never the content); it is not a refusal:
    a projected volume being (re)mounted heals by itself, so the service backs off and retries."""
    try:
        data = Path(path).read_bytes()[: _MAX_TOKEN_FILE + 1]
    except FileNotFoundError:
        raise CredentialError(f"{key}: {path} does not exist (is the token volume mounted?)") from None
    except OSError as e:
        raise CredentialError(f"{key}: cannot read {path}: {e.strerror or type(e).__name__}") from None
    if len(data) > _MAX_TOKEN_FILE:
        raise CredentialError(f"{key}: {path} is larger than {_MAX_TOKEN_FILE} bytes; it does not hold a token")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CredentialError(f"{key}: {path} is not UTF-8 text") from None
    if not text:
        raise CredentialError(f"{key}: {path} is empty")
    if any(c.isspace() for c in text):
        raise CredentialError(f"{key}: {path} holds more than one token (whitespace inside)")
    return Secret(text)


async def token_exchange_params(scheme: "OAuth2Scheme") -> dict[str, str | list[str]]:
    """RFC 8693 §2.1: the token request's parameters, with the subject (and actor) token
    read from its file now. Several ``resource`` values are repeated parameters."""
    cfg: OAuth2Config = scheme.config
    assert cfg.subject_token_file is not None  # the config's check
    subject = await asyncio.to_thread(read_token_file, cfg.subject_token_file, "subject_token_file")
    params: dict[str, str | list[str]] = {
        "grant_type": GRANT_TYPE,
        "subject_token": subject.reveal(),
        "subject_token_type": cfg.subject_token_type or TOKEN_TYPE_JWT,
    }
    if cfg.actor_token_file is not None and cfg.actor_token_type is not None:
        actor = await asyncio.to_thread(read_token_file, cfg.actor_token_file, "actor_token_file")
        params["actor_token"] = actor.reveal()
        params["actor_token_type"] = cfg.actor_token_type
    if cfg.audience is not None:
        params["audience"] = cfg.audience
    targets = resources(cfg.resource)
    if targets:
        params["resource"] = targets
    if cfg.requested_token_type is not None:
        params["requested_token_type"] = cfg.requested_token_type
    if cfg.scope:
        params["scope"] = cfg.scope
    return params


def check_config(cfg: "OAuth2Config") -> None:
    """The rules of ``grant: token_exchange`` (keys of other grants are checked by the config)."""
    if cfg.subject_token_file is None:
        raise FieldError(
            "subject_token_file",
            "required with grant: token_exchange (the file holding the token to exchange, "
            "e.g. a Kubernetes projected service-account token)",
        )
    if (cfg.actor_token_file is None) != (cfg.actor_token_type is None):
        missing = "actor_token_type" if cfg.actor_token_file is not None else "actor_token_file"
        raise FieldError(missing, "actor_token_file and actor_token_type go together (RFC 8693 §2.1)")
    for key in ("subject_token_type", "actor_token_type", "requested_token_type"):
        value = getattr(cfg, key)
        if value is not None and not _URI.fullmatch(value):
            raise FieldError(key, "a token type URI, e.g. urn:ietf:params:oauth:token-type:jwt (RFC 8693 §3)")
    if cfg.audience is not None and not cfg.audience.strip():
        raise FieldError("audience", "must not be empty")
    listed = not isinstance(cfg.resource, str)
    for i, uri in enumerate(resources(cfg.resource)):
        parts = urlsplit(uri)
        if not _URI.fullmatch(uri) or parts.fragment:
            raise FieldError("resource", "an absolute URI without a fragment (RFC 8707 §2)", index=i if listed else None)
