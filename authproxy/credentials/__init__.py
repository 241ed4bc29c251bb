"""Credentials: the manager (:mod:`.manager`), the record of what authproxy created
(:mod:`.records`), and sharing them between processes (:mod:`.shared`)."""

from authproxy.credentials.manager import BACKOFF_CAP, ServiceCredentials, Status, Unavailable, backoff_delay

__all__ = ["BACKOFF_CAP", "ServiceCredentials", "Status", "Unavailable", "backoff_delay"]
