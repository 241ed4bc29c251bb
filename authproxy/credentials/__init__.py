"""Credentials: the manager (:mod:`.manager`), the record of what authproxy created
(:mod:`.records`), and sharing them between processes (:mod:`.shared`)."""

from authproxy.credentials.health import BACKOFF_CAP, Status, Unavailable, backoff_delay
from authproxy.credentials.manager import ServiceCredentials

__all__ = ["BACKOFF_CAP", "ServiceCredentials", "Status", "Unavailable", "backoff_delay"]
