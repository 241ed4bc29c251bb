"""``authproxy demo``'s workload-identity service: ``grant: token_exchange`` (RFC 8693)
against the strict OAuth 2.0 mock playing a cloud STS.

At demo start a "cluster" key is made and the mock trusts it; the subject token file
holds a Kubernetes-style projected service-account token (a JWT) signed with it. The
tour rotates that file in place, as the kubelet does, and the mock revokes its access
tokens: authproxy exchanges again, reading the new subject token. There is no
``make_app`` here: the mock is :mod:`authproxy.testing.oauth2`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import jwt

from authproxy.testing import DemoService, TourStep
from authproxy.testing import oauth2 as mock
from authproxy.testing.oauth2_assertions import ASSERTIONS, TOKEN_EXCHANGE, DemoFiles, rsa_keypair, served

CLUSTER_ISSUER = "https://kubernetes.default.svc.cluster.local"
STS_AUDIENCE = "sts.demo.test"  # the aud the mock STS requires of subject tokens
SUBJECT = "system:serviceaccount:demo:workload"
TOKEN_LIFETIME = 3600


def demo() -> DemoService:
    app = mock.make_app(clients=[])  # client_auth: none — the STS needs no client
    st, ast = app[mock.STATE], app[ASSERTIONS]
    files = DemoFiles(app, "authproxy-demo-workload-")
    cluster_key, _, cluster_public = rsa_keypair()
    ast.trust(CLUSTER_ISSUER, cluster_public, STS_AUDIENCE)

    def subject_token() -> str:
        """A projected service-account token as the kubelet writes it: fresh iat and jti each time."""
        now = int(time.time())
        claims = {
            "iss": CLUSTER_ISSUER,
            "sub": SUBJECT,
            "aud": [STS_AUDIENCE],
            "iat": now,
            "nbf": now,
            "exp": now + TOKEN_LIFETIME,
            "jti": str(uuid.uuid4()),
        }
        return jwt.encode(claims, cluster_key, algorithm="RS256", headers={"kid": "demo-cluster"})

    def rotate() -> None:
        files.write("token", subject_token() + "\n")

    def config(base: str) -> dict[str, Any]:
        auth = {
            "scheme": "oauth2",
            "grant": "token_exchange",
            "token_url": base + mock.TOKEN_PATH,
            "client_auth": "none",
            "subject_token_file": str(files.write("token", subject_token() + "\n")),  # the first subject token
            "audience": base + mock.API_PATH,
        }
        return {"upstream": base + mock.API_PATH, "auth": auth}

    def exchanged(status: int, headers: dict[str, str], body: bytes) -> str:
        distinct = len({e.subject_token for e in ast.exchanges})
        return f"{served(status, headers, body)}; exchanges so far: {len(ast.exchanges)}, with {distinct} different subject token(s)"

    tour = [
        TourStep(
            "first request: authproxy reads the subject token file (a cluster-signed JWT), exchanges it "
            "for an access token (RFC 8693 token exchange) and sends that as a Bearer",
            path="/workload/v1/things",
            show=exchanged,
        ),
        TourStep("the kubelet rotates the subject token file in place (a new JWT, same file)", action=rotate),
        TourStep("the STS revokes every access token it issued", action=st.revoke_access_tokens),
        TourStep(
            "the API answers 401 invalid_token: authproxy re-reads the file, exchanges the new subject token and replays once",
            path="/workload/v1/things",
            show=exchanged,
        ),
    ]

    def summary() -> str:
        distinct, refused = len({e.subject_token for e in ast.exchanges}), sum(ast.refusals.values())
        return (
            f"token exchanges: {st.token_requests.get(TOKEN_EXCHANGE, 0)} ({len(ast.exchanges) - refused} accepted) "
            f"with {distinct} different subject tokens; API requests served: {st.api_ok}, rejected with 401: {st.api_rejected}"
        )

    return DemoService("workload", app, config, tour, summary)
