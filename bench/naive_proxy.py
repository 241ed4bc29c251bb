"""The naive-Python reference: a minimal aiohttp pass-through proxy.

What someone would write in an afternoon: one ClientSession, bodies streamed
both ways, hop-by-hop headers stripped, one header (Authorization) added, and
longest-prefix routing like authproxy's (``/static/x`` -> UPSTREAM/x).  It runs
on aiohttp's defaults (the stock asyncio event loop) unless ``--uvloop``.

    python bench/naive_proxy.py --listen 127.0.0.1:8001 \
        --route /static=http://127.0.0.1:8000 --header "Authorization: Bearer x"
"""
import argparse
import asyncio

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer",
       "transfer-encoding", "upgrade", "proxy-authorization", "host"}


def strip(headers):
    named = {t.strip().lower() for v in headers.getall("Connection", []) for t in v.split(",")}
    return [(k, v) for k, v in headers.items() if k.lower() not in HOP and k.lower() not in named]


def make_app(routes, header):
    name, _, value = header.partition(":")
    routes = sorted(routes, key=lambda r: -len(r[0]))
    app = web.Application(client_max_size=0)

    async def start(app):
        app["session"] = ClientSession(
            connector=TCPConnector(limit=0), auto_decompress=False,
            timeout=ClientTimeout(total=None, sock_connect=10))

    async def stop(app):
        await app["session"].close()

    async def handler(request: web.Request) -> web.StreamResponse:
        path = request.raw_path
        for prefix, upstream in routes:
            rest = path[len(prefix):]
            if path.startswith(prefix) and (rest == "" or rest[0] in "/?"):
                break
        else:
            return web.json_response({"error": "no_route"}, status=404)
        headers = strip(request.headers) + [(name.strip(), value.strip())]
        body = request.content if request.body_exists else None
        async with app["session"].request(
                request.method, upstream + (rest if rest.startswith("/") else "/" + rest),
                headers=headers, data=body, allow_redirects=False,
                skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type")) as up:
            resp = web.StreamResponse(status=up.status, reason=up.reason)
            for k, v in strip(up.headers):
                resp.headers.add(k, v)
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app.router.add_route("*", "/{tail:.*}", handler)
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:8001")
    ap.add_argument("--route", action="append", required=True, help="PREFIX=UPSTREAM")
    ap.add_argument("--header", default="Authorization: Bearer bench-token")
    ap.add_argument("--uvloop", action="store_true")
    a = ap.parse_args()
    if a.uvloop:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    host, _, port = a.listen.rpartition(":")
    routes = [tuple(r.split("=", 1)) for r in a.route]
    web.run_app(make_app(routes, a.header), host=host, port=int(port),
                access_log=None, print=None)


if __name__ == "__main__":
    main()
