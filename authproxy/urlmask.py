"""Masking credentials in URLs and request targets before they are shown.

Two uses: the URL of a credential endpoint named in a message, where any
credential-like query parameter (:data:`SECRET_PARAMS`) is masked; and the
request target in the access log, where a service's :class:`UrlMasker` masks the
parameters its scheme puts credentials in plus its configured secrets in any
encoding (through a :class:`~authproxy.redaction.Redactor`).
"""

from __future__ import annotations

import functools
import re
from typing import Iterable
from urllib.parse import unquote_plus

from authproxy.redaction import MASK, Redactor

# Query parameter names that usually carry credentials: masked in the URLs of
# credential endpoints named in messages, and stripped from rewritten Locations.
# Not used for the access log, which masks only what the service's scheme sends.
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


@functools.lru_cache(maxsize=64)
def _param_re(names: frozenset[str]) -> "re.Pattern[str]":
    """Matches ``name=value`` for one of ``names`` (any case), or for a name written
    with ``%``/``+`` escapes (checked once decoded)."""
    listed = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(rf"(^|[?&;])((?i:{listed})|[^=&;#%+]*[%+][^=&;#]*)=[^&;#]*")


def _mask_params(query: str, names: frozenset[str]) -> str:
    if not names or "=" not in query:
        return query

    def sub(m: re.Match[str]) -> str:
        name = m.group(2)
        if ("%" in name or "+" in name) and unquote_plus(name).lower() not in names:
            return m.group(0)
        return f"{m.group(1)}{name}={MASK}"

    return _param_re(names).sub(sub, query)


def mask_query(query: str, extra: Iterable[str] = ()) -> str:
    """Mask the values of credential-like parameters (:data:`SECRET_PARAMS` and ``extra``) in a raw query string."""
    names = SECRET_PARAMS.union(n.lower() for n in extra) if extra else SECRET_PARAMS
    return _mask_params(query, names)


class UrlMasker:
    """Masks one service's credentials in a request target before it is logged: the
    values of the query parameters its scheme puts credentials in (``token=***``),
    and any of its configured secrets, in any encoding, anywhere in the path or
    query. Built once per service at config load; called once per request."""

    __slots__ = ("names", "redactor")

    def __init__(self, param_names: Iterable[str] = (), redactor: Redactor | None = None) -> None:
        self.names = frozenset(n.lower() for n in param_names)
        self.redactor = redactor if redactor else None

    def __call__(self, path_and_query: str) -> str:
        if self.names:
            path, sep, query = path_and_query.partition("?")
            if sep and "=" in query:
                path_and_query = f"{path}?{_mask_params(query, self.names)}"
        if self.redactor is not None:
            path_and_query = self.redactor.redact(path_and_query)
        return path_and_query

    def __repr__(self) -> str:
        return f"UrlMasker(names={sorted(self.names)}, {self.redactor!r})"


#: Parameters of an authorization response (``/-/callback/NAME``): the code is a
#: credential, and a pending state lets a forged callback in.
CALLBACK_PARAMS = frozenset({"code", "state"})


def mask_url(
    path_and_query: str,
    extra: Iterable[str] = (),
    redactor: Redactor | None = None,
    *,
    param_names: Iterable[str] | None = None,
) -> str:
    """Mask credentials in a URL or request target.

    By default the values of :data:`SECRET_PARAMS` and ``extra`` are masked: for
    URLs of credential endpoints in messages, which may hold anything. With
    ``param_names``, exactly those parameters are (a service's ``secret_params``,
    for the access log). ``redactor`` also masks secret values in any encoding
    anywhere in it. On the request path, build a :class:`UrlMasker` once instead."""
    if param_names is not None:
        names = frozenset(n.lower() for n in param_names)
    else:
        names = SECRET_PARAMS.union(n.lower() for n in extra) if extra else SECRET_PARAMS
    return UrlMasker(names, redactor)(path_and_query)
