"""A strict mock of GitHub's REST API for GitHub App installation tokens.

``POST {base}/app/installations/{id}/access_tokens`` checks the app's JWT the
way GitHub does, with GitHub's error bodies (``{"message", "documentation_url"}``):

- RS256 only, signed by the registered app's key, else 401 "A JSON web token
  could not be decoded"; an ``iss`` naming no app (by app id or client id) is
  404 "Integration not found";
- ``iat`` an integer not in the future (a few seconds of skew), ``exp`` a
  number in the future, at most 600 s after ``iat`` and after now, else 401 with
  GitHub's message for that claim;
- the installation must belong to the app (404), and the ``repositories`` /
  ``permissions`` asked for must be a subset of what it has (422);
- the reply (201) is a ``ghs_...`` token with ``expires_at`` (ISO 8601) one hour
  later (``token_lifetime``) and the ``permissions`` / ``repositories`` granted.

The API, ``{base}/repos/{owner}/{repo}/issues``, wants ``Authorization: Bearer``
or ``token`` with a live installation token (401 "Bad credentials"), and answers
404 for a repository the token does not cover and 403 for a write the token's
``issues`` permission does not allow, as GitHub does. ``DELETE
{base}/installation/token`` revokes the token it is called with. ``base`` is ""
for api.github.com and ``/api/v3`` for a GitHub Enterprise Server.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import jwt
from aiohttp import web

from authproxy.testing import DemoService, TourStep

DOCS = "https://docs.github.com/rest"
TOKEN_DOCS = DOCS + "/apps/apps#create-an-installation-access-token-for-an-app"
MAX_JWT_LIFETIME = 600  # exp - iat, and exp - now: GitHub refuses a JWT valid longer
IAT_SKEW = 5  # seconds an iat may be in the future (a clock a little fast)
API_VERSIONS = frozenset({"2022-11-28", "2026-03-10"})
LEVELS = {"read": 1, "write": 2, "admin": 3}

BAD_JWT = "A JSON web token could not be decoded"
BAD_IAT = "'Issued at' claim ('iat') must be an Integer representing the time that the assertion was issued"
BAD_EXP = "'Expiration time' claim ('exp') must be a numeric value representing the future time at which the assertion expires"
FAR_EXP = "'Expiration time' claim ('exp') is too far in the future"
BAD_REPOS = "There is at least one repository that does not exist or is not accessible to the parent installation."
BAD_PERMISSIONS = "The permissions requested are not granted to this installation."


# --------------------------------------------------------------------------- data


@dataclass
class App:
    app_id: str
    public_key_pem: bytes
    client_id: str | None = None


@dataclass
class Installation:
    installation_id: str
    app_id: str
    account: str  # the owner login its repositories belong to
    repositories: tuple[str, ...]
    permissions: dict[str, str]


@dataclass
class Token:
    value: str
    serial: int
    installation_id: str
    repositories: tuple[str, ...]
    permissions: dict[str, str]
    expires_at: float
    revoked: bool = False


class Refusal(Exception):
    def __init__(self, status: int, message: str, docs: str = DOCS) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.docs = docs

    def response(self) -> web.Response:
        return web.json_response({"message": self.message, "documentation_url": self.docs}, status=self.status)


@dataclass
class GitHubState:
    apps: dict[str, App]
    installations: dict[str, Installation]
    token_lifetime: float = 3600.0
    token_delay: float = 0.0  # seconds each token request takes
    tokens: dict[str, Token] = field(default_factory=dict)
    token_requests: int = 0  # every POST .../access_tokens, refused ones included
    token_errors: list[tuple[int, str]] = field(default_factory=list)
    jwt_claims: list[dict[str, Any]] = field(default_factory=list)  # of every JWT whose signature verified
    request_bodies: list[Any] = field(default_factory=list)  # each token request's JSON body (None: none)
    request_headers: list[dict[str, str]] = field(default_factory=list)
    failures: list[tuple[int, Any]] = field(default_factory=list)  # replies the next token requests get
    served: list[int] = field(default_factory=list)  # the serial of the token behind each API reply
    api_rejected: int = 0  # 401 Bad credentials
    api_not_found: int = 0
    api_forbidden: int = 0
    revocations: int = 0
    issues: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def issued(self) -> int:
        return len(self.tokens)

    @property
    def api_ok(self) -> int:
        return len(self.served)

    def fail(self, status: int, body: Any = None, times: int = 1) -> None:
        """The next ``times`` token requests get this reply (a 5xx, a rate limit ...)."""
        self.failures.extend([(status, body if body is not None else {"message": "Server Error", "documentation_url": DOCS})] * times)

    def revoke_all(self) -> None:
        """Every installation token dies (an admin revoked them, the app was suspended)."""
        for t in self.tokens.values():
            t.revoked = True

    def live(self, value: str) -> Token | None:
        t = self.tokens.get(value)
        return t if t is not None and not t.revoked and t.expires_at > time.time() else None


STATE: web.AppKey[GitHubState] = web.AppKey("github_state")


# --------------------------------------------------------------------------- the app's JWT


def _bearer(request: web.Request, schemes: tuple[str, ...]) -> str | None:
    kind, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if kind.lower() in schemes and value.strip() else None


def verify_app_jwt(state: GitHubState, token: str | None, now: float | None = None) -> App:
    """The app a JWT authenticates, or a Refusal with GitHub's message."""
    now = time.time() if now is None else now
    if token is None:
        raise Refusal(401, BAD_JWT)
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise Refusal(401, BAD_JWT) from None
    if header.get("alg") != "RS256":
        raise Refusal(401, BAD_JWT)
    iss = claims.get("iss")
    app = next((a for a in state.apps.values() if iss is not None and str(iss) in (a.app_id, a.client_id)), None)
    if app is None:
        raise Refusal(404, "Integration not found", DOCS + "/apps/apps#get-the-authenticated-app")
    try:
        jwt.decode(token, app.public_key_pem, algorithms=["RS256"], options={"verify_exp": False, "verify_iat": False, "verify_nbf": False})
    except jwt.PyJWTError:
        raise Refusal(401, BAD_JWT) from None
    state.jwt_claims.append(claims)
    iat, exp = claims.get("iat"), claims.get("exp")
    if not isinstance(iat, int) or isinstance(iat, bool) or iat > now + IAT_SKEW:
        raise Refusal(401, BAD_IAT)
    if not isinstance(exp, (int, float)) or isinstance(exp, bool) or exp <= now:
        raise Refusal(401, BAD_EXP)
    if exp - iat > MAX_JWT_LIFETIME or exp > now + MAX_JWT_LIFETIME:
        raise Refusal(401, FAR_EXP)
    return app


# --------------------------------------------------------------------------- endpoints


async def _access_tokens(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.token_requests += 1
    state.request_headers.append(dict(request.headers))
    try:
        version = request.headers.get("X-GitHub-Api-Version")
        if version is not None and version not in API_VERSIONS:
            raise Refusal(400, f"API version '{version}' is not supported.")
        if state.token_delay:
            await asyncio.sleep(state.token_delay)
        if state.failures:
            status, body = state.failures.pop(0)
            raise Refusal(status, body["message"], body.get("documentation_url", DOCS)) if isinstance(body, dict) else _Raw(status, body)
        app = verify_app_jwt(state, _bearer(request, ("bearer",)))
        inst = state.installations.get(request.match_info["id"])
        if inst is None or inst.app_id != app.app_id:
            raise Refusal(404, "Not Found", TOKEN_DOCS)
        body = await _json_body(request)
        state.request_bodies.append(body)
        repos, permissions = _narrowed(inst, body or {})
    except Refusal as e:
        state.token_errors.append((e.status, e.message))
        return e.response()
    except _Raw as e:
        state.token_errors.append((e.status, e.body[:100]))
        return web.Response(status=e.status, text=e.body, content_type="text/html")
    expires = math.floor(time.time() + state.token_lifetime)
    token = Token("ghs_" + secrets.token_urlsafe(27).replace("-", "A").replace("_", "b")[:36], state.issued + 1, inst.installation_id, repos, permissions, expires)
    state.tokens[token.value] = token
    reply: dict[str, Any] = {
        "token": token.value,
        "expires_at": datetime.fromtimestamp(expires, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "permissions": permissions,
        "repository_selection": "selected" if body and "repositories" in body else "all",
    }
    if body and "repositories" in body:
        reply["repositories"] = [{"name": r, "full_name": f"{inst.account}/{r}", "private": True} for r in repos]
    return web.json_response(reply, status=201)


class _Raw(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(status)
        self.status = status
        self.body = str(body)


async def _json_body(request: web.Request) -> dict[str, Any] | None:
    raw = await request.read()
    if not raw:
        return None
    try:
        body = json.loads(raw)
    except ValueError:
        raise Refusal(400, "Problems parsing JSON", TOKEN_DOCS) from None
    if not isinstance(body, dict):
        raise Refusal(400, "Problems parsing JSON", TOKEN_DOCS)
    for key in body:
        if key not in ("repositories", "repository_ids", "permissions"):
            raise Refusal(422, f'Invalid request.\n\n"{key}" is not a permitted key.', TOKEN_DOCS)
    return body


def _narrowed(inst: Installation, body: dict[str, Any]) -> tuple[tuple[str, ...], dict[str, str]]:
    """The repositories and permissions a token gets: what was asked for, if the installation has it."""
    repos = inst.repositories
    if "repositories" in body:
        asked = body["repositories"]
        if not isinstance(asked, list) or not asked or any(not isinstance(r, str) or r not in inst.repositories for r in asked):
            raise Refusal(422, BAD_REPOS, TOKEN_DOCS)
        repos = tuple(asked)
    permissions = dict(inst.permissions)
    if "permissions" in body:
        asked = body["permissions"]
        if not isinstance(asked, dict) or any(
            LEVELS.get(str(level), 99) > LEVELS.get(inst.permissions.get(name, ""), 0) for name, level in asked.items()
        ):
            raise Refusal(422, BAD_PERMISSIONS, TOKEN_DOCS)
        permissions = {str(k): str(v) for k, v in asked.items()}
    return repos, permissions


def _api_token(request: web.Request) -> Token:
    state = request.app[STATE]
    value = _bearer(request, ("bearer", "token"))
    if value is None:
        state.api_rejected += 1
        raise Refusal(401, "Requires authentication")
    token = state.live(value)
    if token is None:
        state.api_rejected += 1
        raise Refusal(401, "Bad credentials")
    return token


async def _issues(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        token = _api_token(request)
        inst = state.installations[token.installation_id]
        owner, repo = request.match_info["owner"], request.match_info["repo"]
        if owner.lower() != inst.account.lower() or repo not in token.repositories:
            state.api_not_found += 1
            raise Refusal(404, "Not Found", DOCS + "/issues/issues")
        need = 2 if request.method == "POST" else 1
        if LEVELS.get(token.permissions.get("issues", ""), 0) < need:
            state.api_forbidden += 1
            raise Refusal(403, "Resource not accessible by integration", DOCS + "/issues/issues")
    except Refusal as e:
        return e.response()
    issues = state.issues.setdefault(f"{owner}/{repo}".lower(), [{"number": 1, "title": "First issue", "state": "open"}])
    state.served.append(token.serial)
    if request.method == "POST":
        doc = await request.json()
        issue = {"number": len(issues) + 1, "title": str(doc.get("title", "")), "state": "open"}
        issues.append(issue)
        return web.json_response(issue, status=201)
    return web.json_response(issues)


async def _revoke(request: web.Request) -> web.Response:
    try:
        token = _api_token(request)
    except Refusal as e:
        return e.response()
    token.revoked = True
    request.app[STATE].revocations += 1
    return web.Response(status=204)


# --------------------------------------------------------------------------- the app


def make_app(
    *,
    apps: Iterable[App] = (),
    installations: Iterable[Installation] = (),
    base: str = "",
    token_lifetime: float = 3600.0,
) -> web.Application:
    """``base``: "" as api.github.com, ``/api/v3`` as a GitHub Enterprise Server."""
    base = base.rstrip("/")
    app = web.Application()
    app[STATE] = GitHubState(
        apps={a.app_id: a for a in apps},
        installations={i.installation_id: i for i in installations},
        token_lifetime=token_lifetime,
    )
    app.router.add_post(base + "/app/installations/{id}/access_tokens", _access_tokens)
    app.router.add_route("GET", base + "/repos/{owner}/{repo}/issues", _issues)
    app.router.add_route("POST", base + "/repos/{owner}/{repo}/issues", _issues)
    app.router.add_delete(base + "/installation/token", _revoke)
    return app


# --------------------------------------------------------------------------- authproxy demo

DEMO_APP_ID = "1001"
DEMO_INSTALLATION_ID = "2002"


def _demo_key(folder: Path) -> tuple[Path, bytes]:
    """A key pair made now: the private key in a file for the service, the public key for the mock."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = folder / "github-app.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    path.chmod(0o600)
    return path, key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def demo() -> DemoService:
    folder = tempfile.TemporaryDirectory(prefix="authproxy-demo-github-")
    key_file, public = _demo_key(Path(folder.name))
    inst = Installation(DEMO_INSTALLATION_ID, DEMO_APP_ID, "acme", ("widgets", "gadgets"), {"issues": "write", "metadata": "read"})
    app = make_app(apps=[App(DEMO_APP_ID, public)], installations=[inst])
    st = app[STATE]

    async def cleanup(_: web.Application) -> None:
        folder.cleanup()

    app.on_cleanup.append(cleanup)

    def config(url: str) -> dict[str, Any]:
        return {
            "upstream": url,
            "auth": {
                "scheme": "github_app",
                "app_id": DEMO_APP_ID,
                "private_key_file": str(key_file),
                "installation_id": DEMO_INSTALLATION_ID,
                "repositories": ["widgets"],
                "permissions": {"issues": "read"},
            },
        }

    def show(status: int, headers: dict[str, str], body: bytes) -> str:
        text = body[:100].decode("utf-8", "replace")
        return f"{text} (installation token #{st.served[-1]})" if status == 200 and st.served else text

    tour = [
        TourStep("first request: authproxy signs the app's JWT, gets an installation token for acme/widgets with issues: read", path="/github/repos/acme/widgets/issues", show=show),
        TourStep("the next request reuses the token (it lives an hour; renewed 5 minutes before expires_at)", path="/github/repos/acme/widgets/issues?state=open", show=show),
        TourStep("another repository of the installation: the token does not cover it, GitHub answers 404", path="/github/repos/acme/gadgets/issues", expect=404),
        TourStep("a write: the token has issues: read, GitHub answers 403", method="POST", path="/github/repos/acme/widgets/issues", json={"title": "x"}, expect=403),
        TourStep("GitHub revokes every installation token (as when the app's key is rotated)", action=st.revoke_all),
        TourStep("the API answers 401 Bad credentials: authproxy gets a new token and replays the request once", path="/github/repos/acme/widgets/issues", show=show),
    ]

    def summary() -> str:
        return f"installation tokens issued: {st.issued}; API requests served: {st.api_ok}, 401: {st.api_rejected}, 404: {st.api_not_found}, 403: {st.api_forbidden}"

    return DemoService("github", app, config, tour, summary)
