"""A service's visible state after failures: backoff, the last error, readiness.

Kept apart from the manager because it is the part operators see (``/-/readyz``,
503 bodies, log lines) and the part with the rules that protect upstream
accounts: exponential backoff with jitter, and a slower start after a refusal,
so that a wrong password is never hammered.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Callable

from authproxy.observe import log_event

log = logging.getLogger("authproxy.credentials")

BACKOFF_CAP = 60.0
BACKOFF_FIRST = 1.0  # after a transient failure (connection, timeout, 5xx)
BACKOFF_FIRST_REFUSED = 10.0  # after a refusal (bad password): never hammer an account


class Unavailable(Exception):
    """No credential can be had now: the proxy answers 503 with this code."""

    def __init__(self, code: str, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.code = code  # token_unavailable | login_required
        self.message = message
        self.retry_after = retry_after


@dataclass
class Status:
    state: str  # ready | pending | backoff | login_required | error
    expires_in: float | None
    last_error: str | None


def backoff_delay(failures: int, refused: bool, rng: Callable[[], float] = random.random) -> float:
    """Exponential with ±20 % jitter, capped: 1, 2, 4 … 60 s (10, 20, 40, 60 s after a refusal)."""
    first = BACKOFF_FIRST_REFUSED if refused else BACKOFF_FIRST
    base = min(BACKOFF_CAP, first * (2 ** max(0, failures - 1)))
    return min(BACKOFF_CAP, base * (0.8 + 0.4 * rng()))


class Health:
    """The failures of the service's own credential (on-behalf-of failures do not
    change the service's state: they are about one user)."""

    def __init__(self, name: str, clock: Callable[[], float]) -> None:
        self.name = name
        self.clock = clock
        self.failures = 0
        self.retry_at = 0.0
        self.error: str | None = None  # masked, safe to show
        self.state: str | None = None  # backoff | error | login_required; None: no failure

    def failed(self, masked_error: str, state: str, refused: bool) -> None:
        self.failures += 1
        self.error = masked_error
        self.state = state
        if state == "login_required":
            self.retry_at = 0.0
            log_event(log, logging.WARNING, "login_required", service=self.name, error=self.error)
            return
        delay = backoff_delay(self.failures, refused)
        self.retry_at = self.clock() + delay
        log_event(
            log,
            logging.WARNING,
            "token_backoff",
            service=self.name,
            state=state,
            retry_in=round(delay, 1),
            failures=self.failures,
            error=self.error,
        )

    def recovered(self) -> None:
        self.failures = 0
        self.error = None
        self.state = None

    def backing_off(self) -> float | None:
        """Seconds until the next attempt while in backoff/error, else None."""
        if self.state in ("backoff", "error"):
            wait = self.retry_at - self.clock()
            if wait > 0:
                return wait
        return None

    def retry_after(self) -> float:
        return max(1.0, self.retry_at - self.clock())

    def next_due(self) -> float | None:
        """When the background loop must try again because of a failure (None: never, a
        person must act; NotImplemented: no failure, follow the credential's own time)."""
        if self.state in ("backoff", "error"):
            return self.retry_at
        if self.state == "login_required":
            return None
        return NotImplemented  # type: ignore[return-value]

    def status(self, expires_in: float | None, have_credential: bool) -> Status:
        if self.state == "login_required":
            return Status("login_required", expires_in, self.error)
        if have_credential:
            return Status("ready", expires_in, self.error)
        if self.state:
            return Status(self.state, None, self.error)
        return Status("pending", None, None)

    def unavailable_message(self) -> str:
        return f"{self.name}: no credential ({self.error or 'still being fetched'}); retrying"
