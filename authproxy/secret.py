"""A value that must never be printed.

Every password, client secret, key and token travels wrapped in :class:`Secret`
so that an f-string, a ``repr()`` in a traceback, a dataclass ``__repr__`` or a
log call shows ``***`` instead of the value. The only way out is ``reveal()``,
which makes each place that sends a secret somewhere easy to find.
:func:`collect_secrets` finds every one a configuration object holds.

Masking text that might show one lives beside it: :mod:`authproxy.redaction`
(the :class:`Redactor`, every encoding a secret travels in) and
:mod:`authproxy.urlmask` (credentials in URLs and request targets). Their names
are re-exported here, the import path the rest of authproxy uses.
"""

from __future__ import annotations

import dataclasses

from authproxy.redaction import MASK as MASK
from authproxy.redaction import MIN_SECRET as MIN_SECRET
from authproxy.redaction import NO_SECRETS as NO_SECRETS
from authproxy.redaction import Redactor as Redactor
from authproxy.redaction import redact as redact
from authproxy.redaction import redactor_for as redactor_for
from authproxy.urlmask import CALLBACK_PARAMS as CALLBACK_PARAMS
from authproxy.urlmask import SECRET_PARAMS as SECRET_PARAMS
from authproxy.urlmask import UrlMasker as UrlMasker
from authproxy.urlmask import mask_query as mask_query
from authproxy.urlmask import mask_url as mask_url

__all__ = [
    "CALLBACK_PARAMS",
    "MASK",
    "MIN_SECRET",
    "NO_SECRETS",
    "SECRET_PARAMS",
    "Redactor",
    "Secret",
    "UrlMasker",
    "collect_secrets",
    "mask_query",
    "mask_url",
    "redact",
    "redactor_for",
    "reveal",
]


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


def collect_secrets(obj: object) -> list[Secret]:
    """Every :class:`Secret` held by a configuration object — dataclasses, dicts,
    lists and tuples, walked all the way down (a whole ``Config``, one service's
    ``ServiceConfig`` or its ``auth``): what to build a :class:`Redactor` from."""
    out: list[Secret] = []
    seen: set[int] = set()
    todo: list[object] = [obj]
    while todo:
        item = todo.pop()
        if isinstance(item, Secret):
            out.append(item)
            continue
        if isinstance(item, (str, bytes, int, float, bool)) or item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if dataclasses.is_dataclass(item) and not isinstance(item, type):
            todo.extend(getattr(item, f.name, None) for f in dataclasses.fields(item))
        elif isinstance(item, dict):
            todo.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            todo.extend(item)
    return out
