"""GitHub App installation tokens (``scheme: github_app``): ``Authorization: Bearer ghs_...``.

A GitHub App proves who it is with a short JWT signed by its private key
(RS256; ``iss`` = the app id or client id; ``iat`` backdated 60 s against clock
drift; ``exp`` - ``iat`` = 600 s, the most GitHub accepts), and trades it at
``POST {api_url}/app/installations/{installation_id}/access_tokens`` for an
installation token that lives one hour (the reply's ``expires_at``). The token
can be narrowed to some of the installation's repositories and permissions
(the request's JSON body); GitHub refuses more than the installation has (422).

What authproxy does with the tokens:

- each one is recorded in the store (``persist_created``): a restart reuses it,
  and ``authproxy logout`` revokes every still-valid one (``DELETE
  {api_url}/installation/token``);
- it is not revoked at exit (``revoke_on_exit`` False): it dies within the hour
  anyway, a restart would have to make a new one for nothing, and a token
  ``authproxy token`` printed for a person shares the record — the proxy's exit
  must not pull it from under them;
- a token replaced by a refresh (``refresh_margin`` before it expires) is left
  to expire: requests still in flight may carry it.

The private key is read at start and on SIGHUP (a key rotated under the same
file name); it is never logged, and no message here shows it or the JWT.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import jwt

from authproxy.schemes.base import Credential, CredentialError, Outgoing, Scheme, SchemeContext, Stateful
from authproxy.schemes.context import Reply
from authproxy.schemes.rfc7523 import KeyFileError, load_private_key
from authproxy.secret import Secret
from authproxy.settings import FieldError, FilePath

API_VERSION = "2022-11-28"
ACCEPT = "application/vnd.github+json"
JWT_BACKDATE = 60  # seconds iat is set in the past: GitHub's own advice against clock drift
JWT_AHEAD = 540  # seconds exp is set in the future: exp - iat = 600, the most GitHub accepts
TOKEN_LIFETIME = 3600  # GitHub's documented lifetime, should a reply ever lack expires_at
MAX_REPOSITORIES = 500  # GitHub's limit for one token
PERMISSION_LEVELS = ("read", "write", "admin")
_REPO_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")
_PERMISSION_NAME = re.compile(r"[a-z][a-z0-9_]*")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class GitHubAppConfig:
    app_id: str  # the JWT's iss: the numeric app id, or the app's client id (Iv1...)
    private_key_file: FilePath  # the app's PEM private key (RSA), as GitHub downloads it
    installation_id: str
    api_url: str | None = None  # default: the service's upstream (GHES: https://HOST/api/v3)
    repositories: tuple[str, ...] = ()  # repository names (no owner) the token is restricted to
    permissions: dict[str, str] = field(default_factory=dict)  # e.g. {issues: read}
    refresh_margin: float = 300.0

    def check(self) -> None:
        if not self.app_id.strip() or any(c.isspace() for c in self.app_id):
            raise FieldError("app_id", "the app's id (e.g. \"123456\") or client id (e.g. Iv1.abc...), without spaces")
        if not self.installation_id.isdigit():
            raise FieldError("installation_id", "the installation's numeric id (the number at the end of its settings page URL)")
        if self.api_url is not None:
            parts = urlsplit(self.api_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise FieldError("api_url", "must be an absolute http(s) URL, e.g. https://api.github.com or https://ghe.example/api/v3")
            if parts.query or parts.fragment or parts.username or parts.password:
                raise FieldError("api_url", "must not contain a query, a fragment or user info")
        if len(self.repositories) > MAX_REPOSITORIES:
            raise FieldError("repositories", f"GitHub restricts a token to at most {MAX_REPOSITORIES} repositories")
        for i, name in enumerate(self.repositories):
            if "/" in name:
                raise FieldError("repositories", f"give the repository's name without its owner ({name} → {name.rsplit('/', 1)[-1]})", i)
            if not _REPO_NAME.fullmatch(name):
                raise FieldError("repositories", f"{name!r} is not a repository name", i)
        if len(set(self.repositories)) != len(self.repositories):
            raise FieldError("repositories", "a repository is named twice")
        for name, level in self.permissions.items():
            if not _PERMISSION_NAME.fullmatch(name):
                raise FieldError("permissions", f"{name!r} is not a permission name (e.g. issues, contents, pull_requests)")
            if level not in PERMISSION_LEVELS:
                raise FieldError("permissions", f"{name}: {level!r} must be one of {', '.join(PERMISSION_LEVELS)}")
        if self.refresh_margin < 0:
            raise FieldError("refresh_margin", "must not be negative")
        try:
            load_private_key(self.private_key_file, "RS256")
        except KeyFileError as e:
            raise FieldError("private_key_file", f"{e} (GitHub Apps sign with RS256: give the .pem GitHub generated)") from None


# --------------------------------------------------------------------------- the scheme


class GitHubAppScheme(Scheme, Stateful):
    Config = GitHubAppConfig
    persist_created = True  # a restart reuses the token; `authproxy logout` revokes it

    def __init__(self, ctx: SchemeContext) -> None:
        super().__init__(ctx)
        cfg: GitHubAppConfig = self.config
        self.api_url = (cfg.api_url or ctx.service.upstream.url).rstrip("/")
        self.token_url = f"{self.api_url}/app/installations/{quote(cfg.installation_id, safe='')}/access_tokens"
        self._key: Any = None
        self.setup_error: str | None = None
        self._load_key()

    def __repr__(self) -> str:
        return f"GitHubAppScheme(app_id={self.config.app_id!r}, installation_id={self.config.installation_id!r}, api_url={self.api_url!r})"

    def _load_key(self) -> None:
        try:
            self._key = load_private_key(str(self.config.private_key_file), "RS256")
            self.setup_error = None
        except KeyFileError as e:
            self._key = None
            self.setup_error = f"private_key_file: {e}"

    def identity(self) -> str:
        """A recorded token is reused only by the configuration that asked for it."""
        cfg: GitHubAppConfig = self.config
        return json.dumps(["github_app", self.api_url, cfg.app_id, cfg.installation_id, sorted(cfg.repositories), sorted(cfg.permissions.items())])

    async def reload(self) -> None:
        """SIGHUP: re-read the private key (a new key under the same file name)."""
        self._load_key()

    # ------------------------------------------------------------------ obtain
    def app_jwt(self, now: float | None = None) -> Secret:
        """The app's JWT: iat backdated 60 s, exp 540 s ahead (600 s apart, GitHub's maximum)."""
        issued = int(time.time() if now is None else now)
        claims = {"iat": issued - JWT_BACKDATE, "exp": issued + JWT_AHEAD, "iss": self.config.app_id}
        return Secret(jwt.encode(claims, self._key, algorithm="RS256", headers={"typ": "JWT"}))

    def _body(self) -> dict[str, Any] | None:
        cfg: GitHubAppConfig = self.config
        body: dict[str, Any] = {}
        if cfg.repositories:
            body["repositories"] = list(cfg.repositories)
        if cfg.permissions:
            body["permissions"] = dict(cfg.permissions)
        return body or None

    async def obtain(self, key: str | None) -> Credential:
        if self._key is None:
            raise CredentialError(self.setup_error or "private_key_file: no key", refused=True)
        started = time.time()
        assertion = self.app_jwt(started)
        reply = await self.ctx.request(
            "POST",
            self.token_url,
            what="installation token request",
            json_body=self._body(),
            headers=self._headers(assertion),
        )
        if reply.status not in (200, 201):
            raise self._failure(reply, assertion)
        doc = reply.json()
        token = doc.get("token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise CredentialError(f"installation token request: {reply.url} answered {reply.status} without a token")
        expires_at = _expiry(doc.get("expires_at"), started, reply.url)
        meta = {k: doc[k] for k in ("permissions", "repository_selection") if k in doc}
        return Credential(token=Secret(token), expires_at=expires_at, created=True, obtained_at=started, meta=meta)

    def _headers(self, bearer: Secret) -> dict[str, str]:
        return {"Authorization": "Bearer " + bearer.reveal(), "Accept": ACCEPT, "X-GitHub-Api-Version": API_VERSION}

    def _failure(self, reply: Reply, *sent: Secret) -> CredentialError:
        """GitHub's ``{"message", "documentation_url"}`` as a message saying what to fix.
        A refusal (the JWT, the installation, the repositories or permissions asked
        for) puts the service in ``error``; 5xx, 429 and rate limits are transient."""
        cfg: GitHubAppConfig = self.config
        status = reply.status
        said = self.ctx.error_text(_github_message(reply), *sent)
        where = f"{reply.url} answered HTTP {status}: {said}"
        if status >= 500 or status in (408, 429) or (status == 403 and _rate_limited(reply, said)):
            return CredentialError(f"installation token request: {where}")
        if status == 401:
            hint = (
                f"GitHub refused the app's JWT: check app_id ({cfg.app_id}) and private_key_file "
                "(one of the app's current private keys), and that this machine's clock is right"
            )
        elif status == 404 and "integration not found" in said.lower():
            hint = f"GitHub knows no app {cfg.app_id}: check app_id (the App ID or Client ID on the app's settings page)"
        elif status == 404:
            hint = f"installation {cfg.installation_id} of app {cfg.app_id} not found: check installation_id and app_id"
        elif status == 422:
            hint = "GitHub refused the repositories or permissions asked for (more than the installation has?)"
        else:
            hint = "GitHub refused the installation token request"
        return CredentialError(f"{hint} ({where})", refused=True)

    # ------------------------------------------------------------------ apply, revoke
    def apply(self, out: Outgoing, cred: Credential) -> None:
        out.headers["Authorization"] = "Bearer " + cred.token.reveal()

    async def revoke(self, cred: Credential) -> None:
        """``DELETE {api_url}/installation/token`` with the token itself (204). A token
        GitHub no longer knows (401) is as good as revoked."""
        reply = await self.ctx.request("DELETE", f"{self.api_url}/installation/token", what="token revocation", headers=self._headers(cred.token))
        if reply.status not in (204, 200, 401):
            raise CredentialError(f"token revocation: {reply.url} answered HTTP {reply.status}: {self.ctx.error_text(_github_message(reply), cred.token)}")


# --------------------------------------------------------------------------- helpers


def _github_message(reply: Reply) -> str:
    """GitHub's error JSON (``message``, ``errors``, ``documentation_url``), or the start of the body."""
    try:
        doc = json.loads(reply.body)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("message"), str):
        return reply.text(200) or "(no body)"
    text = doc["message"].strip()
    errors = doc.get("errors")
    if isinstance(errors, list) and errors:
        details = [e.get("message") or e.get("code") if isinstance(e, dict) else e for e in errors[:3]]
        text += " (" + "; ".join(str(d) for d in details if d) + ")"
    if isinstance(doc.get("documentation_url"), str):
        text += f" — see {doc['documentation_url']}"
    return text[:600]


def _rate_limited(reply: Reply, message: str) -> bool:
    return reply.headers.get("x-ratelimit-remaining") == "0" or "rate limit" in message.lower()


def _expiry(value: Any, started: float, url: str) -> float:
    """``expires_at`` (ISO 8601, e.g. ``2026-12-01T23:00:00Z``) as wall-clock seconds."""
    if value is None:
        return started + TOKEN_LIFETIME
    try:
        when = dt.datetime.fromisoformat(str(value))
    except ValueError:
        raise CredentialError(f"installation token request: {url} answered with an expires_at that is not ISO 8601: {str(value)[:40]!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)  # GitHub's times are UTC
    return when.timestamp()


__all__ = ["GitHubAppConfig", "GitHubAppScheme", "API_VERSION", "JWT_AHEAD", "JWT_BACKDATE"]
