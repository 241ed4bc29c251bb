"""RFC 8705 — OAuth 2.0 Mutual-TLS client authentication (§2.1, PKI method).

With ``client_auth: tls_client_auth`` the client proves who it is by the
certificate it presents in the TLS handshake with the token endpoint, not by
anything in the request: the server matches that certificate against the
subject DN or subject alternative name registered for the client (§2.1.2).
So the request itself carries only ``client_id`` (§2.1: "the client_id
parameter ... MUST be included"), never a secret, and the certificate is the
service's ``tls`` client certificate, which the service's TLS context already
presents on every connection (:func:`authproxy.runtime.ssl_context`): this
module only knows the method's rules, the scheme needs no certificate handling.

Not implemented: ``self_signed_tls_client_auth`` (§2.2: the server pins the
certificate via the client's registered JWK set; the request is the same, so
it would be one more name here — left out until a server that needs it shows
up), certificate-bound access tokens (§3: a server-side feature; authproxy
already presents the same certificate to the upstream when ``tls`` is set) and
``mtls_endpoint_aliases`` (§5: configure the mTLS ``token_url`` directly).
"""

from __future__ import annotations

from typing import Mapping
from urllib.parse import urlsplit

#: The ``client_auth`` value (RFC 8705 §2.1.1's ``token_endpoint_auth_method``).
TLS_CLIENT_AUTH = "tls_client_auth"

#: Why a credential URL must be https with this method: over plain http there is no
#: handshake, so no certificate, so the server cannot know the client.
NEEDS_HTTPS = "must be an https URL with client_auth: tls_client_auth (the client certificate is presented in the TLS handshake)"


def form_params(client_id: str) -> dict[str, str]:
    """The token or revocation request's client parameters: only the client's name."""
    return {"client_id": client_id}


def plain_http(urls: Mapping[str, str | None]) -> str | None:
    """The first key whose URL is set but not https (the method cannot work there), or None."""
    for key, url in urls.items():
        if url is not None and urlsplit(url).scheme != "https":
            return key
    return None
