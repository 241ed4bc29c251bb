"""Mock upstreams that behave like the real APIs, error replies included.

They serve three users: ``authproxy demo``, the project's own tests, and users
testing their own configs (``python -m authproxy.testing NAME --port N``).
Each module has a ``make_app(...)`` returning an aiohttp application whose
``app[STATE]`` exposes what a test wants to count or flip.
"""

from __future__ import annotations



from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from aiohttp import web


@dataclass
class TourStep:
    """One step of ``authproxy demo``: a request through the proxy, or an action on a mock."""

    note: str  # what the step shows, printed before it
    method: str = "GET"
    path: str = ""  # the proxy path, e.g. /fogbugz/api.asp?cmd=search&q=foo
    headers: dict[str, str] = field(default_factory=dict)
    data: bytes | str | None = None
    json: Any = None
    expect: int | None = 200  # the status the tour expects (None: any)
    action: Callable[[], Awaitable[None] | None] | None = None  # instead of a request
    show: Callable[[int, dict[str, str], bytes], str] | None = None  # how to print the reply (default: status + short body)


@dataclass
class DemoService:
    """What a mock module gives ``authproxy demo``: the mock app, the service's
    config for a given mock URL, and the tour of requests that show the scheme."""

    name: str
    app: web.Application
    config: Callable[[str], dict[str, Any]]  # mock base URL → the service's config mapping
    tour: list[TourStep]
    summary: Callable[[], str] | None = None  # e.g. "logons: 1, logoffs: 0"
