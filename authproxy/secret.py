"""A value that must never be printed.

Every password, client secret, key and token travels wrapped in :class:`Secret`
so that an f-string, a ``repr()`` in a traceback, a dataclass ``__repr__`` or a
log call shows ``***`` instead of the value. The only way out is ``reveal()``,
which makes each place that sends a secret somewhere easy to find.
"""

from __future__ import annotations

import re
from typing import Iterable

MASK = "***"


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if isinstance(value, Secret):
            value = value.reveal()
        self._value = str(value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return MASK

    def __format__(self, spec: str) -> str:
        return MASK

    def __eq__(self, other: object) -> bool:
        # Equality lets a reload tell whether a service's resolved config changed.
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __bool__(self) -> bool:
        return bool(self._value)

    def __len__(self) -> int:
        return len(self._value)

    def __reduce__(self) -> tuple:  # pragma: no cover - pickling would leak it
        raise TypeError("Secret values cannot be pickled")


def reveal(value: "Secret | str | None") -> str | None:
    if value is None:
        return None
    return value.reveal() if isinstance(value, Secret) else value


def redact(text: str, secrets: Iterable["Secret | str | None"]) -> str:
    """Replace every occurrence of the given secrets in a text (e.g. an upstream's error
    message, which may echo what it was sent) by ``***``."""
    for s in secrets:
        raw = reveal(s)
        if raw and len(raw) >= 3:
            text = text.replace(raw, MASK)
    return text


# Query parameters whose values are credentials: masked wherever a URL is logged.
SECRET_PARAMS = frozenset(
    {
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "password",
        "client_secret",
        "client_assertion",
        "code",
        "code_verifier",
        "api_key",
        "apikey",
        "key",
        "secret",
        "sig",
        "signature",
    }
)

_PARAM_RE = re.compile(r"(^|[?&;])([^=&;#]*)=([^&;#]*)")


def mask_query(query: str, extra: Iterable[str] = ()) -> str:
    """Mask the values of credential-like parameters in a raw query string."""
    if "=" not in query:
        return query
    names = SECRET_PARAMS.union(n.lower() for n in extra) if extra else SECRET_PARAMS

    def sub(m: re.Match[str]) -> str:
        name = m.group(2)
        if name.lower() in names:
            return f"{m.group(1)}{name}={MASK}"
        return m.group(0)

    return _PARAM_RE.sub(sub, query)


def mask_url(path_and_query: str, extra: Iterable[str] = ()) -> str:
    path, sep, query = path_and_query.partition("?")
    if not sep:
        return path
    return f"{path}?{mask_query(query, extra)}"
