"""The strict OAuth 2.0 mock's grants: each ``grant_type`` is a handler in
:data:`GRANTS`, so a new grant is one function and one line here.

A handler gets the request, the mock's state, the authenticated client and the
form, and returns the token reply (or raises :class:`OAuthFail`)."""

from __future__ import annotations

import hmac
import secrets
import time
from typing import Any, Awaitable, Callable

from aiohttp import web

from authproxy.schemes import rfc7636
from authproxy.testing.oauth2_model import Client, Grant, OAuth2State, OAuthFail

GrantHandler = Callable[[web.Request, OAuth2State, Client, dict[str, str]], Awaitable[dict[str, Any]]]


def scope_for(client: Client, requested: str | None, allowed: str | None) -> str:
    if requested is None:
        return allowed if allowed is not None else client.default_scope
    wanted = set(requested.split())
    limit = set(allowed.split()) if allowed is not None else client.scopes
    if not wanted or not wanted <= limit:
        raise OAuthFail("invalid_scope", f"scope {requested!r} is not allowed")
    return " ".join(sorted(wanted))


def _code_grant(st: OAuth2State, client: Client, form: dict[str, str]) -> dict[str, Any]:
    code = st.codes.get(form.get("code", ""))
    if code is None or code.client_id != client.client_id:
        raise OAuthFail("invalid_grant", "unknown authorization code")
    if code.used:
        if code.grant_id in st.grants:  # RFC 6749 §4.1.2: a code used twice revokes what it gave
            st._kill(st.grants[code.grant_id])
        raise OAuthFail("invalid_grant", "authorization code already used")
    code.used = True
    if time.time() > code.expires_at:
        raise OAuthFail("invalid_grant", "authorization code expired")
    if form.get("redirect_uri") != code.redirect_uri:
        raise OAuthFail("invalid_grant", "redirect_uri differs from the authorization request")
    verifier = form.get("code_verifier")
    if code.challenge is None:
        if verifier is not None:
            raise OAuthFail("invalid_grant", "code_verifier given but the authorization request had no code_challenge")
    else:
        if verifier is None:
            raise OAuthFail("invalid_grant", "code_verifier required (PKCE)")
        if not rfc7636.valid_verifier(verifier) or not hmac.compare_digest(rfc7636.challenge(verifier), code.challenge):
            raise OAuthFail("invalid_grant", "code_verifier does not match the code_challenge")
    grant = Grant(secrets.token_hex(8), client.client_id, code.scope)
    st.grants[grant.grant_id] = grant
    code.grant_id = grant.grant_id
    return st._issue(client, code.scope, grant)


def _refresh_grant(st: OAuth2State, client: Client, form: dict[str, str]) -> dict[str, Any]:
    presented = form.get("refresh_token", "")
    st.refresh_tokens_presented.append(presented)
    rec = st.refresh.get(presented)
    if rec is None or rec.client_id != client.client_id:
        raise OAuthFail("invalid_grant", "unknown refresh token")
    grant = st.grants[rec.grant_id]
    if rec.rotated:
        st.refresh_reuse += 1
        st._kill(grant)
        raise OAuthFail("invalid_grant", "refresh token already used; the grant is revoked")
    if not grant.active:
        raise OAuthFail("invalid_grant", "the grant has been revoked")
    scope = scope_for(client, form.get("scope"), grant.scope)
    reply = st._issue(client, scope, grant, with_refresh=st.rotate_refresh_tokens)
    if st.rotate_refresh_tokens:
        rec.rotated = True
    return reply




async def _client_credentials(request: web.Request, st: OAuth2State, client: Client, form: dict[str, str]) -> dict[str, Any]:
    if client.public:
        raise OAuthFail("unauthorized_client", "a public client may not use client_credentials")
    return st._issue(client, scope_for(client, form.get("scope"), None), None)


async def _authorization_code(request: web.Request, st: OAuth2State, client: Client, form: dict[str, str]) -> dict[str, Any]:
    return _code_grant(st, client, form)


async def _refresh_token(request: web.Request, st: OAuth2State, client: Client, form: dict[str, str]) -> dict[str, Any]:
    return _refresh_grant(st, client, form)


GRANTS: dict[str, GrantHandler] = {
    "client_credentials": _client_credentials,
    "authorization_code": _authorization_code,
    "refresh_token": _refresh_token,
}
