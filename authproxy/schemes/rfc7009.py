"""RFC 7009 — token revocation, used by ``authproxy logout``.

The client authenticates exactly as at the token endpoint. The server answers
200 whether or not it knew the token (§2.2), so only a non-200 reply is a
failure; ``unsupported_token_type`` means the server cannot revoke that kind.
"""

from __future__ import annotations

from typing import Literal

from authproxy.schemes.rfc6749 import TokenEndpoint, oauth_error
from authproxy.secret import Secret

TokenTypeHint = Literal["refresh_token", "access_token"]


async def revoke(endpoint: TokenEndpoint, url: str, token: Secret, hint: TokenTypeHint) -> None:
    """Ask the server to revoke ``token``; raises CredentialError when it did not."""
    what = "token revocation"
    params = {"token": token.reveal(), "token_type_hint": hint}
    reply, masks = await endpoint.post(url, params, what=what, secrets=(token,))
    if reply.status != 200:
        raise oauth_error(endpoint.ctx, reply, what, masks)
