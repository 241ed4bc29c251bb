"""``python -m authproxy.testing NAME [--host H] [--port N]``: run one mock upstream."""

from __future__ import annotations

import argparse
import importlib

from aiohttp import web

MOCKS = ("echo", "fogbugz", "oauth2", "enfix")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m authproxy.testing")
    p.add_argument("name", choices=MOCKS)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    module = importlib.import_module(f"authproxy.testing.{args.name}")
    web.run_app(module.make_app(), host=args.host, port=args.port, print=lambda s: print(s, flush=True))


if __name__ == "__main__":
    main()
