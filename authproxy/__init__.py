"""authproxy: a local authenticating reverse proxy."""

__version__ = "0.1.0"
