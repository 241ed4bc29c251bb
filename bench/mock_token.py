"""Mock OAuth 2.0 token endpoint for the benchmark.

``POST /auth/token`` answers ``{"access_token": ..., "token_type": "bearer",
"expires_in": 3600}`` after an optional delay and counts the requests;
``GET /count`` returns ``{"count": N}``; ``POST /reset?delay=S`` zeroes the
count and sets the delay.

    python bench/mock_token.py --listen 127.0.0.1:8003 [--delay 1.0]
"""
import argparse
import asyncio
import secrets

from aiohttp import web


def make_app(delay):
    app = web.Application()
    app["count"], app["delay"] = 0, delay

    async def token(request):
        app["count"] += 1
        form = await request.post()
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        if app["delay"]:
            await asyncio.sleep(app["delay"])
        return web.json_response({"access_token": "bench-" + secrets.token_hex(8),
                                  "token_type": "bearer", "expires_in": 3600})

    async def count(request):
        return web.json_response({"count": app["count"]})

    async def reset(request):
        app["count"] = 0
        app["delay"] = float(request.query.get("delay", app["delay"]))
        return web.json_response({"count": 0, "delay": app["delay"]})

    app.router.add_post("/auth/token", token)
    app.router.add_get("/count", count)
    app.router.add_post("/reset", reset)
    return app


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:8003")
    ap.add_argument("--delay", type=float, default=0.0)
    a = ap.parse_args()
    host, _, port = a.listen.rpartition(":")
    web.run_app(make_app(a.delay), host=host, port=int(port), access_log=None, print=None)


if __name__ == "__main__":
    main()
