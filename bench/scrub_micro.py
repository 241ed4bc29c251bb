#!/usr/bin/env python3
"""Micro-benchmark: what response scrubbing (``scrub_responses``) costs.

1. Detection: a compiled bytes regex alternation of every form (longest first)
   against one ``bytes in`` per form, for 1-4 secrets, on a 64 KiB chunk and on a
   small body (what decided the design: see authproxy/proxy/scrub.py).
2. Per small response: the forwarder's scrub work for one small JSON reply (the
   per-credential cache check, the header block, the whole body), on vs off.
3. Streaming: ``BodyStream.feed`` over 64 KiB chunks, MB/s on vs off.
4. ``--e2e``: the real proxy (``python -m authproxy run``) in front of a raw
   upstream, both in their own processes, scrub on and off interleaved: the
   proxy's CPU per small request (from /proc/PID/stat) and a 1 GiB download
   (MB/s and proxy CPU seconds).

    python bench/scrub_micro.py            # 1-3, a few seconds
    python bench/scrub_micro.py --e2e      # and 4 (a few minutes)
    python bench/scrub_micro.py --instructions   # and 5: the same, counted by callgrind
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from multidict import CIMultiDict  # noqa: E402

from authproxy.proxy.scrub import Scrubber, _memmem, injected_values  # noqa: E402

SECRETS = [
    "ghp_0123456789abcdefghijABCDEFGHIJ012345",  # an opaque token: one form
    "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJlLXdpdGgvc2xhc2g+cGx1cw==",  # a JWT-ish one
    "app+token/with=padding==",  # base64: raw, %2F/%2f, + forms
    "user-token-0123456789abcdef",
]
SMALL = json.dumps({"id": 4711, "name": "small.json", "status": "ok", "tags": ["bench", "authproxy"],
                    "owner": {"id": 42, "login": "bench", "email": "bench@example.invalid"},
                    "items": [{"n": i, "v": "value-%d" % i} for i in range(8)]}, indent=1).encode()
CHUNK = (b'{"id": 123456, "name": "widget-token-like-text", "url": "https://api.example.com/v1/items/123456", '
         b'"tags": ["alpha", "beta", "gamma"], "body": "Lorem ipsum dolor sit amet, consectetur adipiscing"}\n' * 400)[:65536]
HEADERS = [("Content-Type", "application/json; charset=utf-8"), ("Content-Length", str(len(SMALL))),
           ("Date", "Mon, 01 Jan 2024 00:00:00 GMT"), ("Server", "nginx/1.24.0"), ("ETag", '"5f3a-abcdef"'),
           ("Cache-Control", "private, max-age=60"), ("Vary", "Accept, Authorization"),
           ("X-RateLimit-Remaining", "4999"), ("X-Request-Id", "0123456789ab-000001"),
           ("Set-Cookie", "session=abcdef0123456789; Path=/svc; HttpOnly")]


def per_call(fn, seconds: float = 0.3) -> float:
    """Best-of-5 seconds per call of ``fn``."""
    n = 1
    while timeit.timeit(fn, number=n) < seconds / 5:
        n *= 4
    return min(timeit.repeat(fn, number=n, repeat=5)) / n


def detection() -> None:
    print("## 1. detection, no secret present: one regex alternation of every form (longest first),")
    print("##    one `in` per form, one `in` per needle (a secret's longest unreserved run), libc memmem per needle")
    print("##    (scrub.py: memmem from 16 KiB on, `in` below)")
    print("| secrets | forms | needles | 64 KiB: regex | `in` forms | `in` needles | memmem needles "
          "| small (%d B): regex | `in` forms | `in` needles |" % len(SMALL))
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k in range(1, 5):
        s = Scrubber(SECRETS[:k])
        forms, needles = s._forms, s._needles
        rx = re.compile(b"|".join(re.escape(f) for f in forms))
        row = [str(k), str(len(forms)), str(len(needles))]
        for data in (CHUNK, SMALL):
            t_rx = per_call(lambda: rx.search(data))
            t_forms = per_call(lambda: any(f in data for f in forms))
            t_needles = per_call(lambda: any(f in data for f in needles))
            if data is CHUNK:
                times = [t_rx, t_forms, t_needles]
                if _memmem is not None:
                    times.append(per_call(lambda: any(_memmem(data, len(data), f, len(f)) for f in needles)))
                row += ["%.1f µs (%.0f MB/s)" % (t * 1e6, len(data) / t / 1e6) for t in times]
                row += [] if _memmem is not None else ["(none)"]
            else:
                row += ["%.2f µs" % (t * 1e6) for t in (t_rx, t_forms, t_needles)]
        print("| " + " | ".join(row) + " |")
    print()


def small_response() -> None:
    print("## 2. per small response (cache check + %d headers + %d B body), scrub on vs off" % (len(HEADERS), len(SMALL)))
    print("| secrets | off | on | cost |")
    print("|---|---|---|---|")
    for k in (1, 2, 4):
        values = SECRETS[:k]
        exported = {"headers": {"Authorization": "Bearer " + values[0], **{f"X-Key-{i}": v for i, v in enumerate(values[1:])}}, "query": {}}
        s = Scrubber(injected_values(exported))
        cred = object()
        cache = {cred: (tuple(exported["headers"].items()), s)}
        applied = CIMultiDict(exported["headers"])
        applied.update({"Host": "api.example.com", "Accept": "*/*", "X-Forwarded-For": "127.0.0.1"})
        pairs = list(HEADERS)

        def on() -> None:
            entry = cache.get(cred)
            for name, value in entry[0]:
                if applied.get(name) != value:
                    break
            scrubber = entry[1]
            scrubber.headers(pairs)
            scrubber.body(SMALL)

        def off() -> None:
            pass

        t_on, t_off = per_call(on), per_call(off)
        print("| %d | %.2f µs | %.2f µs | %.2f µs |" % (k, t_off * 1e6, t_on * 1e6, (t_on - t_off) * 1e6))
    print()


def streaming() -> None:
    print("## 3. streamed body, 64 KiB chunks (64 MiB of JSON-like text), BodyStream.feed on vs off")
    print("| secrets | off | on | per chunk |")
    print("|---|---|---|---|")
    chunks = [bytes(CHUNK) for _ in range(16)] * 64
    for k in (1, 2, 4):
        s = Scrubber(SECRETS[:k])

        def on() -> None:
            st = s.stream()
            feed = st.feed
            for c in chunks:
                feed(c)
            st.flush()

        def off() -> None:
            for c in chunks:
                pass

        t_on, t_off = per_call(on, 1.0), per_call(off, 0.2)
        mb = len(chunks) * len(CHUNK) / 1e6
        print("| %d | %.0f MB/s | %.0f MB/s | %.2f µs |" % (k, mb / t_off, mb / t_on, (t_on - t_off) / len(chunks) * 1e6))
    print()


# --------------------------------------------------------------------------- end to end

UPSTREAM = r'''
import asyncio, sys
SMALL = sys.argv[2].encode()
BLOCK = __import__("os").urandom(65536)  # like bench/bench.py's large file
async def serve(r, w):
    try:
        while True:
            head = await r.readuntil(b"\r\n\r\n")
            if b"/big/" in head.split(b"\r\n", 1)[0]:
                n = int(head.split(b" ")[1].rsplit(b"/", 1)[1] or 1024) << 20  # /big/MIB
                w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % n)
                while n:
                    piece = BLOCK[: min(n, 65536)]
                    w.write(piece); n -= len(piece)
                    await w.drain()
            else:
                w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(SMALL), SMALL))
                await w.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        w.close()
async def main():
    s = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    await s.serve_forever()
asyncio.run(main())
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} did not open")


def cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def small_load(port: int, n: int, conns: int) -> float:
    req = b"GET /svc/small HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    per = n // conns

    async def one() -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(per):
            w.write(req)
            head = await r.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            await r.readexactly(length)
        w.close()

    t = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(conns)))
    return time.perf_counter() - t


def download(port: int, mib: int = 1024) -> float:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /svc/big/%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % mib)
        t = time.perf_counter()
        buf = bytearray(1 << 20)
        got, need = 0, None
        while need is None or got < need:
            n = s.recv_into(buf)
            if not n:
                break
            got += n
            if need is None and b"\r\n\r\n" in buf[: min(n, 4096)]:
                head, _, _ = bytes(buf[:n]).partition(b"\r\n\r\n")
                need = len(head) + 4 + int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        return time.perf_counter() - t


def e2e(rounds: int, n_small: int) -> None:
    print("## 4. end to end: authproxy (bearer) in front of a raw upstream, scrub on vs off")
    tmp = tempfile.mkdtemp(prefix="scrub-bench-")
    up_port = free_port()
    # On a small machine the proxies get CPU 0 and the upstream and this client the others,
    # so that the proxy's CPU time is not inflated by contention with them.
    cpus = sorted(os.sched_getaffinity(0))
    proxy_cpus, other_cpus = ({cpus[0]}, set(cpus[1:])) if len(cpus) > 1 else (set(cpus), set(cpus))
    os.sched_setaffinity(0, other_cpus)
    procs = [subprocess.Popen([sys.executable, "-c", UPSTREAM, str(up_port), SMALL.decode()])]
    try:
        wait_port(up_port)
        ports = {}
        for mode in ("on", "off"):
            port = ports[mode] = free_port()
            conf = os.path.join(tmp, f"{mode}.yaml")
            with open(conf, "w") as f:
                f.write(f"listen: 127.0.0.1:{port}\nstate_dir: {tmp}/state-{mode}\nlog: {{level: warning}}\nservices:\n"
                        f"  svc:\n    upstream: http://127.0.0.1:{up_port}\n    scrub_responses: {'true' if mode == 'on' else 'false'}\n"
                        f"    auth: {{scheme: bearer, token: {SECRETS[0]}}}\n")
            procs.append(subprocess.Popen([sys.executable, "-m", "authproxy", "run", "-c", conf], cwd=tmp,
                                          stderr=open(os.path.join(tmp, f"{mode}.log"), "w")))
            os.sched_setaffinity(procs[-1].pid, proxy_cpus)
            wait_port(port)
        pids = {"on": procs[1].pid, "off": procs[2].pid}
        res: dict[str, dict[str, list[float]]] = {m: {"us_req": [], "rps": [], "mbs": [], "cpu_gib": []} for m in pids}
        for m in pids:  # warm up
            asyncio.run(small_load(ports[m], 2000, 16))
        for i in range(rounds):
            for m in (("on", "off") if i % 2 == 0 else ("off", "on")):
                c0 = cpu(pids[m])
                wall = asyncio.run(small_load(ports[m], n_small, 16))
                res[m]["us_req"].append((cpu(pids[m]) - c0) / n_small * 1e6)
                res[m]["rps"].append(n_small / wall)
                c0 = cpu(pids[m])
                wall = download(ports[m])
                res[m]["mbs"].append((1 << 30) / wall / 1e6)
                res[m]["cpu_gib"].append(cpu(pids[m]) - c0)
        keys = ("us_req", "rps", "mbs", "cpu_gib")
        med = {m: {k: statistics.median(v) for k, v in r.items()} for m, r in res.items()}
        # Rounds are paired (on and off back to back): the median of the paired ratios
        # cancels most of the drift of a shared machine.
        paired = {k: statistics.median(a / b - 1 for a, b in zip(res["on"][k], res["off"][k])) * 100 for k in keys}
        print(f"{rounds} interleaved rounds; {n_small} small requests over 16 connections; one 1 GiB download (random bytes);"
              f" proxies on CPU {sorted(proxy_cpus)}, upstream and client on {sorted(other_cpus)}")
        print("| scrub | proxy CPU µs/request | req/s | 1 GiB MB/s | proxy CPU s/GiB |")
        print("|---|---|---|---|---|")
        for m in ("off", "on"):
            d = med[m]
            print("| %s (median) | %.1f | %.0f | %.0f | %.2f |" % (m, d["us_req"], d["rps"], d["mbs"], d["cpu_gib"]))
        print("| cost (median of paired rounds) | %+.1f%% | %+.1f%% | %+.1f%% | %+.1f%% |" % tuple(paired[k] for k in keys))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)


def start_upstream() -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", UPSTREAM, str(port), SMALL.decode()])
    wait_port(port)
    return proc, port


def child(kind: str, mode: str, n: int, up_port: int) -> None:
    """One measured run (under callgrind): ``n`` small requests or an ``n`` MiB download,
    straight to the upstream (``direct``) or through an in-process proxy."""
    import yaml

    from authproxy.config import load_config_text
    from authproxy.proxy.app import ProxyServer

    async def run() -> None:
        port = up_port
        server = None
        if mode != "direct":
            port = free_port()
            text = yaml.safe_dump({"listen": f"127.0.0.1:{port}", "state_dir": tempfile.mkdtemp(), "log": {"level": "warning"},
                                   "services": {"svc": {"upstream": f"http://127.0.0.1:{up_port}", "scrub_responses": mode == "on",
                                                        "auth": {"scheme": "bearer", "token": SECRETS[0]}}}})
            server = ProxyServer(load_config_text(text, env={}))
            await server.start()
        if kind == "small":
            await small_load(port, n, 16)
        else:
            await asyncio.to_thread(download, port, n)
        if server is not None:
            await server.shutdown()

    asyncio.run(run())


def instructions(n_small: int) -> None:
    """Instructions counted by callgrind: deterministic on a busy machine. Each figure is
    the difference between a run of 2N and one of N requests, so start-up cancels out;
    the proxy's own cost is (through the proxy) - (straight to the upstream). Small
    requests only: under valgrind libc's memmem is not the native SIMD one, and a
    download's read sizes (so its per-read costs) vary from run to run."""
    print("## 5. instructions (callgrind), scrub on vs off: deterministic, whatever the machine's load")
    up, up_port = start_upstream()
    try:
        per: dict[tuple[str, str], float] = {}
        for kind, n in (("small", n_small),):
            for mode in ("direct", "off", "on"):
                counts = []
                for k in (n, 2 * n):
                    r = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
                                        os.path.abspath(__file__), "--child", kind, mode, str(k), str(up_port)],
                                       capture_output=True, text=True, check=True)
                    counts.append(int(re.search(r"Collected : (\d+)", r.stderr).group(1)))
                per[kind, mode] = (counts[1] - counts[0]) / n
        print("| | proxy (off - direct) | scrubbing (on - off) | cost |")
        print("|---|---|---|---|")
        for kind, unit in (("small", "request"),):
            proxy = per[kind, "off"] - per[kind, "direct"]
            extra = per[kind, "on"] - per[kind, "off"]
            print("| %s | %.0f k instr/%s | %.1f k instr/%s | %+.1f%% |" % (kind, proxy / 1e3, unit, extra / 1e3, unit, extra / proxy * 100))
    finally:
        up.terminate()
        up.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--e2e", action="store_true", help="also measure through the real proxy")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-n", type=int, default=20000, help="small requests per round (--e2e)")
    ap.add_argument("--instructions", action="store_true", help="also count instructions with callgrind (a few minutes)")
    ap.add_argument("--child", nargs=4, metavar=("KIND", "MODE", "N", "PORT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, mode, n, port = a.child
        child(kind, mode, int(n), int(port))
        return
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs\n")
    detection()
    small_response()
    streaming()
    if a.e2e:
        e2e(a.rounds, a.n)
    if a.instructions:
        instructions(1000)


if __name__ == "__main__":
    main()
