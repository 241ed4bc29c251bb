"""A small HTTP/1.1 engine for both sides of the proxy.

``server`` owns client connections (strict framing, timeouts, a connection cap),
``client``/``pool`` own upstream connections (a fresh parser per response,
idempotency-aware retry). Parsing is llhttp through ``httptools``; the rules on
top of it are in ``framing``. This package imports nothing else of authproxy:
it knows HTTP, not credentials.
"""
