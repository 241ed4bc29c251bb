"""What leaves the credential manager: the door a scheme gets to its sibling
credentials, and messages masked of every secret they might quote."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from authproxy.credentials.health import Unavailable
from authproxy.schemes.base import Credential, CredentialError
from authproxy.secret import Secret, redactor_for

if TYPE_CHECKING:
    from authproxy.credentials.manager import ServiceCredentials


class CredentialDoor:
    """``ctx.credentials``: get / current / rejected of the service's credentials, with
    the manager's cache, single-flight, persistence and sharing behind them — and
    failures as CredentialError, the scheme's own terms. A scheme never holds more."""

    def __init__(self, manager: "ServiceCredentials") -> None:
        self._manager = manager

    async def get(self, key: str | None = None) -> Credential:
        try:
            return await self._manager.get(key)
        except Unavailable as e:
            raise CredentialError(e.message.removeprefix(f"{self._manager.name}: ")) from None

    def current(self, key: str | None = None) -> Credential | None:
        return self._manager.current(key)

    def rejected(self, cred: Credential) -> None:
        self._manager.rejected(cred)


def mask(text: str, scheme: Any, held: Iterable[Credential | None]) -> str:
    """``text`` with every secret of the service masked, in any encoding an upstream may
    have echoed it in: its configured ones and the credentials ``held`` (the service's
    own — sent with on-behalf-of and revocation requests — and the one a failure is
    about; not every cached one: there may be thousands of on-behalf-of ones). Schemes
    mask what they sent already; this is the one place every message passes on its
    way out, so nothing depends on each scheme remembering every secret."""
    if not text:
        return text
    known = getattr(getattr(scheme, "ctx", None), "known_secrets", None)
    secrets: list[Secret | str | None] = list(known()) if callable(known) else []
    secrets.extend(c.token for c in held if c is not None)
    return redactor_for(secrets).redact(text)
