"""Static credentials: a bearer token, fixed headers, or fixed query parameters.

Nothing to obtain or refresh; they are schemes all the same so that the proxy
has one code path for every service.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from authproxy.schemes.base import Credential, Outgoing, Scheme, set_query_param
from authproxy.secret import Secret
from authproxy.settings import FieldError


@dataclass(frozen=True)
class BearerConfig:
    token: Secret


@dataclass(frozen=True)
class HeaderConfig:
    headers: dict[str, Secret]

    def check(self) -> None:
        if not self.headers:
            raise FieldError("headers", "give at least one header")
        for name in self.headers:
            if not name or any(c in name for c in " \t\r\n:()<>@,;\\\"/[]?={}"):
                raise FieldError("headers", f"{name!r} is not a valid header name")
        for name, value in self.headers.items():
            if any(c in value.reveal() for c in "\r\n\0"):
                raise FieldError("headers", f"the value of {name} contains a line break")


@dataclass(frozen=True)
class QueryConfig:
    params: dict[str, Secret]

    def check(self) -> None:
        if not self.params:
            raise FieldError("params", "give at least one parameter")


class _Static(Scheme):
    """A static credential is not renewed by fetching it again, so a rejection is the
    client's answer, never a reason to replay. But one read from a ``k_file`` or
    ``k_command`` may have changed there: then a 401 is reported as a rejection, and
    the proxy reads the secret again (at most once a minute) for the next requests."""

    refetch_renews = False

    def is_rejection(self, status: int, headers: Mapping[str, str], body: bytes | None) -> bool:
        return status == 401 and bool(self.ctx.service.secret_sources)


class BearerScheme(_Static):
    Config = BearerConfig

    async def obtain(self, key: str | None) -> Credential:
        return Credential(token=self.config.token)

    def apply(self, out: Outgoing, cred: Credential) -> None:
        out.headers["Authorization"] = self._value

    def __init__(self, ctx) -> None:  # type: ignore[no-untyped-def]
        super().__init__(ctx)
        self._value = "Bearer " + self.config.token.reveal()


class HeaderScheme(_Static):
    Config = HeaderConfig

    def __init__(self, ctx) -> None:  # type: ignore[no-untyped-def]
        super().__init__(ctx)
        self._headers = [(k, v.reveal()) for k, v in self.config.headers.items()]

    async def obtain(self, key: str | None) -> Credential:
        # The value `authproxy token` prints: the one header's value, else every header.
        if len(self._headers) == 1:
            return Credential(token=self.config.headers[self._headers[0][0]])
        return Credential(token=Secret("\n".join(f"{k}: {v}" for k, v in self._headers)))

    def apply(self, out: Outgoing, cred: Credential) -> None:
        for name, value in self._headers:
            out.headers[name] = value


class QueryScheme(_Static):
    Config = QueryConfig

    def __init__(self, ctx) -> None:  # type: ignore[no-untyped-def]
        super().__init__(ctx)
        self._params = [(k, v.reveal()) for k, v in self.config.params.items()]
        self.secret_params = tuple(self.config.params)  # type: ignore[misc]

    async def obtain(self, key: str | None) -> Credential:
        # The value `authproxy token` prints: the one parameter's value, else every one.
        if len(self._params) == 1:
            return Credential(token=self.config.params[self._params[0][0]])
        return Credential(token=Secret("\n".join(f"{k}={v}" for k, v in self._params)))

    def apply(self, out: Outgoing, cred: Credential) -> None:
        for name, value in self._params:
            out.query = set_query_param(out.query, name, value)
