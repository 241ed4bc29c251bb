"""Mock upstreams that behave like the real APIs, error replies included.

They serve three users: ``authproxy demo``, the project's own tests, and users
testing their own configs (``python -m authproxy.testing NAME --port N``).
Each module has a ``make_app(...)`` returning an aiohttp application whose
``app[STATE]`` exposes what a test wants to count or flip.
"""
