#!/usr/bin/env python3
"""authproxy benchmark harness (run it through ``bench/run``).

Starts, in a temp dir, an upstream nginx (small JSON, a generated large file),
an upload sink, a mock OAuth 2.0 token endpoint, and the targets:

  direct          the upstream itself (nginx; the sink for uploads)
  nginx           nginx reverse proxy adding a static Authorization header
  naive           bench/naive_proxy.py, a minimal aiohttp pass-through proxy
  authproxy       authproxy, static `bearer` scheme
  authproxy-oauth authproxy, `oauth2` client_credentials scheme

then measures, interleaved round-robin so machine drift hits every target
alike: small requests with wrk at 32 and 128 connections (req/s, p50, p99, the
target's CPU us per request from /proc/PID/stat), 1 GiB download and upload
(MB/s, the target's RSS before and its peak during each transfer), 4,000 idle
client connections (held? the RSS they cost; a new request's latency while they
are open), and token single-flight (1,000 concurrent first requests against a
fresh authproxy, counting token-endpoint requests).  Ends with the targets of
the "One HTTP/1.1 engine" issue, each PASS or MISS (and by how much), beside
nginx and the naive proxy.  Prints markdown; every process it starts is stopped
by PID at the end.
"""
import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import selectors
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CLK = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024
TOKEN = "bench-token"
SMALL_JSON = json.dumps({
    "id": 4711, "name": "small.json", "status": "ok", "tags": ["bench", "authproxy", "small"],
    "owner": {"id": 42, "login": "bench", "email": "bench@example.invalid"},
    "items": [{"n": i, "v": "value-%d" % i} for i in range(8)],
}, indent=1).encode() + b"\n"

TARGETS = ["direct", "nginx", "naive", "naive-uvloop", "authproxy", "authproxy-oauth"]
DEFAULT_TARGETS = ["direct", "nginx", "naive", "authproxy", "authproxy-oauth"]
LABEL = {
    "direct": "(a) upstream direct",
    "nginx": "(b) nginx proxy",
    "naive": "(c) naive aiohttp proxy",
    "naive-uvloop": "(c') naive proxy on uvloop",
    "authproxy": "(d) authproxy static",
    "authproxy-oauth": "(e) authproxy oauth2",
}


def log(*a):
    print("[bench %s]" % time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------- processes

def _stat(pid):
    """(ppid, utime+stime ticks, starttime) of PID, or None if gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            s = f.read()
    except OSError:
        return None
    rest = s[s.rindex(")") + 2:].split()
    return int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[19])


def descendants(pid):
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(int(d))
            if st:
                kids.setdefault(st[0], []).append(int(d))
    out, todo = [], [pid]
    while todo and len(out) < 10000:
        p = todo.pop()
        for c in kids.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def tree(pid):
    return [pid] + descendants(pid)


def cpu_ticks(pids):
    return sum((_stat(p) or (0, 0, 0))[1] for p in pids)


def sys_ticks(pids):
    total = 0
    for p in pids:
        try:
            with open("/proc/%d/stat" % p) as f:
                s = f.read()
            total += int(s[s.rindex(")") + 2:].split()[12])
        except (OSError, ValueError, IndexError):
            pass
    return total


def mem_kb(pids, field):
    total = 0
    for p in pids:
        try:
            with open("/proc/%d/status" % p) as f:
                for line in f:
                    if line.startswith(field + ":"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def reset_hwm(pids):
    ok = True
    for p in pids:
        try:
            with open("/proc/%d/clear_refs" % p, "w") as f:
                f.write("5")
        except OSError:
            ok = False
    return ok


def event_loop_of(pid):
    try:
        with open("/proc/%d/maps" % pid) as f:
            return "uvloop" if "uvloop" in f.read() else "asyncio"
    except OSError:
        return "?"


def clean_env():
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Procs:
    """Every process the bench starts, stopped by PID (TERM, then KILL)."""

    def __init__(self):
        self.items = []  # [name, Popen, logfile, [(pid, starttime) of descendants]]

    def start(self, name, argv, logpath, cwd=None):
        f = open(logpath, "ab")
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                             cwd=cwd, env=clean_env(), start_new_session=True)
        self.items.append([name, p, f, []])
        log("started %s pid %d" % (name, p.pid))
        return p

    def note_children(self, p):
        for item in self.items:
            if item[1] is p:
                item[3] = [(c, (_stat(c) or (0, 0, 0))[2]) for c in descendants(p.pid)]

    def stop(self, p, deadline=8.0):
        for item in list(self.items):
            if item[1] is not p:
                continue
            name, _, f, kids = item
            kids = kids + [(c, (_stat(c) or (0, 0, 0))[2]) for c in descendants(p.pid)]
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(deadline)
                except subprocess.TimeoutExpired:
                    log("%s pid %d did not stop on SIGTERM, killing" % (name, p.pid))
                    p.kill()
                    p.wait(5)
            t_end = time.monotonic() + 3
            for pid, start in kids:
                while time.monotonic() < t_end and (_stat(pid) or (0, 0, -1))[2] == start:
                    time.sleep(0.05)
                if (_stat(pid) or (0, 0, -1))[2] == start:  # same process still there
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
            f.close()
            self.items.remove(item)

    def stop_all(self):
        for item in reversed(list(self.items)):
            self.stop(item[1])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return True
        except OSError:
            time.sleep(0.02)
    return False


_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(url, data=None, method=None, timeout=10):
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with _opener.open(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:
        return None, str(e).encode()


def tail(path, n=15, skip=None):
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()[-n:]
        if skip:
            lines = [x for x in lines if skip.encode() not in x][-5:]
        return b"\n".join(lines).decode("utf-8", "replace")
    except OSError:
        return ""


# ------------------------------------------------------------------- configs

NGINX_COMMON = """\
worker_processes 1;
{user}
pid {d}/{name}.pid;
error_log {d}/{name}.error.log warn;
events {{ worker_connections 8192; }}
http {{
  default_type application/octet-stream;
  client_body_temp_path {d}/{name}-tmp/body;
  proxy_temp_path {d}/{name}-tmp/proxy;
  fastcgi_temp_path {d}/{name}-tmp/fastcgi;
  uwsgi_temp_path {d}/{name}-tmp/uwsgi;
  scgi_temp_path {d}/{name}-tmp/scgi;
  keepalive_timeout 300s;
  keepalive_requests 1000000;
  tcp_nodelay on;
{body}
}}
"""

UPSTREAM_BODY = """\
  access_log off;
  sendfile on;
  tcp_nopush on;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    root {d}/www;
    location = /small.json {{ default_type application/json; }}
    location = /large.bin {{ }}
  }}
"""

REFPROXY_BODY = """\
  access_log {d}/nginx-ref.access.log;
  client_max_body_size 0;
  upstream up {{ server 127.0.0.1:{up}; keepalive 64; keepalive_requests 1000000; keepalive_timeout 300s; }}
  upstream sink {{ server 127.0.0.1:{sink}; keepalive 64; keepalive_requests 1000000; keepalive_timeout 300s; }}
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  proxy_set_header Authorization "Bearer {token}";
  proxy_buffering off;
  proxy_request_buffering off;
  proxy_buffer_size 256k;
  proxy_buffers 4 256k;
  proxy_busy_buffers_size 512k;
  client_body_buffer_size 256k;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location /static/ {{ proxy_pass http://up/; }}
    location /sink/ {{ proxy_pass http://sink/; }}
  }}
"""

AUTHPROXY_CONFIG = """\
listen: 127.0.0.1:{port}
state_dir: {state}
log: {{level: info, format: text}}
shutdown_timeout: 2
services:
{services}"""

STATIC_SVC = """\
  {name}:
    upstream: http://127.0.0.1:{up}
    auth: {{scheme: bearer, token: {token}}}
"""

OAUTH_SVC = """\
  {name}:
    upstream: http://127.0.0.1:{up}
    auth:
      scheme: oauth2
      token_url: http://127.0.0.1:{tok}/auth/token
      grant: client_credentials
      client_id: bench
      client_auth: client_secret_post
      client_secret: bench-secret
"""


def write_nginx(d, name, body):
    os.makedirs(os.path.join(d, name + "-tmp"), exist_ok=True)
    user = "user root;" if os.geteuid() == 0 else ""
    path = os.path.join(d, name + ".conf")
    with open(path, "w") as f:
        f.write(NGINX_COMMON.format(d=d, name=name, user=user, body=body))
    return path


def make_large(path, size):
    block = os.urandom(MIB)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, MIB)
            f.write(block[:n])
            left -= n


# ---------------------------------------------------------------- measuring

_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(s):
    m = re.match(r"([\d.]+)(us|ms|s|m|h)$", s)
    return float(m.group(1)) * _UNIT[m.group(2)] if m else float("nan")


def parse_wrk(out):
    r = {}
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    r["requests"] = int(m.group(1)) if m else 0
    r["elapsed"] = _ms(m.group(2) + m.group(3)) / 1e3 if m else float("nan")
    for pct in ("50", "99"):
        m = re.search(r"^\s+%s(?:\.0+)?%%\s+(\S+)" % pct, out, re.M)
        r["p" + pct] = _ms(m.group(1)) if m else float("nan")
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    r["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    r["errors"] = errors
    return r


def run_wrk(wrk, url, conns, duration, pids, threads=2):
    argv = [wrk, "-t%d" % threads, "-c%d" % conns, "-d%ds" % duration, "--latency",
            "--timeout", "10s", url]
    before, sys0 = cpu_ticks(pids), sys_ticks(pids)
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60,
                             env=clean_env()).stdout
    except subprocess.TimeoutExpired:
        out = ""
    after, sys1 = cpu_ticks(pids), sys_ticks(pids)
    r = parse_wrk(out)
    r["sys_pct"] = 100.0 * (sys1 - sys0) / (after - before) if after > before else float("nan")
    r["cpu_us"] = (after - before) / CLK * 1e6 / r["requests"] if r["requests"] else float("nan")
    r["cpu_util"] = (after - before) / CLK / r["elapsed"] if r["requests"] else float("nan")
    return r


def run_curl(argv, timeout):
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=clean_env())
        return p.stdout.strip()
    except subprocess.TimeoutExpired:
        return ""


def transfer(kind, url, size, large_path, pids, tmp, timeout):
    reset_ok = reset_hwm(pids)
    rss0 = mem_kb(pids, "VmRSS")
    hwm0 = mem_kb(pids, "VmHWM")
    cpu0 = cpu_ticks(pids)
    common = ["curl", "-s", "--noproxy", "*", "--max-time", str(timeout)]
    if kind == "download":
        out = run_curl(common + ["-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}", url],
                       timeout + 10)
    else:
        resp = os.path.join(tmp, "upload-response.json")
        out = run_curl(common + ["-H", "Expect:", "-T", large_path, "-o", resp, "-w",
                                 "%{http_code} %{size_upload} %{time_total}", url], timeout + 10)
    cpu1 = cpu_ticks(pids)
    hwm1 = mem_kb(pids, "VmHWM")
    r = {"ok": False, "mbps": float("nan"), "rss0": rss0 / 1024,
         "peak": hwm1 / 1024, "reset": reset_ok, "hwm0": hwm0 / 1024}
    try:
        code, nbytes, secs = out.split()
        code, nbytes, secs = int(code), int(nbytes), float(secs)
    except ValueError:
        r["note"] = "curl failed"
        return r
    ok = code == 200 and nbytes == size
    if kind == "upload" and ok:
        try:
            with open(resp) as f:
                ok = json.load(f).get("received") == size
        except (OSError, ValueError):
            ok = False
    r.update(ok=ok, mbps=nbytes / secs / 1e6, secs=secs, code=code,
             cpu_s_gib=(cpu1 - cpu0) / CLK / (size / (1024 * MIB)))
    if not ok:
        r["note"] = "status %d, %d bytes" % (code, nbytes)
    return r


async def _single_flight(url, n):
    import aiohttp
    conn = aiohttp.TCPConnector(limit=0)
    results = {}
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as s:
        async def one():
            try:
                async with s.get(url) as r:
                    await r.read()
                    return str(r.status)
            except Exception as e:  # noqa: BLE001 - reported, not raised
                return type(e).__name__
        t0 = time.monotonic()
        for st in await asyncio.gather(*(one() for _ in range(n))):
            results[st] = results.get(st, 0) + 1
        return results, time.monotonic() - t0


def held_count(pids, port):
    """Established TCP connections to ``port`` that the processes ``pids`` hold open
    (accepted: a descriptor of theirs; a connection still in the backlog has none)."""
    inodes = set()
    for p in pids:
        try:
            for fd in os.listdir("/proc/%d/fd" % p):
                try:
                    link = os.readlink("/proc/%d/fd/%s" % (p, fd))
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            pass
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                        n += 1
        except (OSError, StopIteration):
            pass
    return n


def _get_small(addr, path, host, timeout=5.0):
    """One GET on a fresh connection, read to the end of the body: (status, ms)."""
    t0 = time.perf_counter()
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(("GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (path, host)).encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
        want = int(m.group(1)) if m else None
        while want is None or len(body) < want:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
    ms = (time.perf_counter() - t0) * 1e3
    m = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    return (int(m.group(1)) if m else 0), ms


def idle_connections(url, pids, n, probes=20, batch=256):
    """Open n idle client connections to the target (no request sent), check that
    the target holds them (its descriptor count), measure its RSS growth, then time
    ``probes`` requests on new connections while they stay open."""
    m = re.match(r"http://([^/:]+):(\d+)(/.*)$", url)
    host, port, path = m.group(1), int(m.group(2)), m.group(3)
    addr = (host, port)
    rss0, held0 = mem_kb(pids, "VmRSS"), held_count(pids, port)
    socks, failed = [], 0
    t_open = time.monotonic()
    while len(socks) + failed < n:
        pending = []
        for _ in range(min(batch, n - len(socks) - failed)):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # no TIME_WAIT at the end
            s.setblocking(False)
            s.connect_ex(addr)
            pending.append(s)
        sel = selectors.DefaultSelector()
        for s in pending:
            sel.register(s, selectors.EVENT_WRITE)
        end = time.monotonic() + 10
        left = set(pending)
        while left and time.monotonic() < end:
            for key, _ in sel.select(0.5):
                s = key.fileobj
                sel.unregister(s)
                left.discard(s)
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    socks.append(s)
                else:
                    failed += 1
                    s.close()
        for s in left:
            sel.unregister(s)
            s.close()
            failed += 1
        sel.close()
        # let the target accept this batch before the next one (the backlog is finite)
        end = time.monotonic() + 5
        while held_count(pids, port) - held0 < len(socks) and time.monotonic() < end:
            time.sleep(0.02)
    open_s = time.monotonic() - t_open
    time.sleep(1.0)  # settle
    held = held_count(pids, port) - held0
    rss1 = mem_kb(pids, "VmRSS")
    lat, codes = [], {}
    for _ in range(probes):
        try:
            code, ms = _get_small(addr, path, "%s:%d" % addr)
        except OSError as e:
            code, ms = type(e).__name__, float("nan")
        codes[str(code)] = codes.get(str(code), 0) + 1
        lat.append(ms)
    alive = 0
    for s in socks:
        try:
            alive += s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
    for s in socks:
        s.close()
    end = time.monotonic() + 10
    while held_count(pids, port) - held0 > 50 and time.monotonic() < end:
        time.sleep(0.05)
    ok_lat = [x for x in lat if x == x]
    return {"n": n, "opened": len(socks), "failed": failed, "held": held, "alive": alive,
            "open_s": open_s, "rss0": rss0 / 1024, "rss1": rss1 / 1024, "growth": (rss1 - rss0) / 1024,
            "probes": probes, "codes": codes, "lat_med": med(ok_lat),
            "lat_max": max(ok_lat) if ok_lat else float("nan")}


# ------------------------------------------------------------------- output

def fmt(x, nd=1):
    if x is None or (isinstance(x, float) and x != x):
        return "—"
    if isinstance(x, float) and abs(x) >= 1000:
        return "{:,.0f}".format(x)
    return "{:.{}f}".format(x, nd)


def med(values):
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def render(res):
    L = []
    env = res["env"]
    L.append("### authproxy benchmark — %s" % env["date"])
    L.append("")
    L.append("%s cores (%s), wrk %s threads sharing the cores; %s; Python %s, aiohttp %s; "
             "event loop: naive=%s, authproxy=%s; %d round(s), %d s per wrk run; streaming %s MiB, %d round(s); "
             "load average at start %s, at the end %s (over 2 means something else competed for the cores); %s s in all."
             % (env["cores"], env["cpu"], env["wrk_threads"], env["nginx"], env["python"],
                env["aiohttp"], env.get("loop_naive", "?"), env.get("loop_authproxy", "?"),
                env["rounds"], env["duration"], env["size_mib"], env["stream_rounds"], env.get("loadavg", "?"),
                env.get("loadavg_end", "?"), env.get("wall_s", "?")))
    if res.get("skipped"):
        L.append("")
        L.append("**Skipped:** " + res["skipped"])
    for conns in res["conns"]:
        L.append("")
        L.append("#### Small requests (%d-byte JSON), %d connections" % (len(SMALL_JSON), conns))
        L.append("")
        L.append("| target | req/s | p50 ms | p99 ms | CPU µs/req | of it kernel | CPU cores | errors |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for t in res["targets"]:
            runs = res["small"].get("%s@%d" % (t, conns), [])
            if not runs:
                continue
            L.append("| %s | %s | %s | %s | %s | %s%% | %s | %d |" % (
                LABEL[t], fmt(med([r["rps"] for r in runs]), 0), fmt(med([r["p50"] for r in runs]), 2),
                fmt(med([r["p99"] for r in runs]), 2), fmt(med([r["cpu_us"] for r in runs]), 0),
                fmt(med([r.get("sys_pct", float("nan")) for r in runs]), 0),
                fmt(med([r["cpu_util"] for r in runs]), 2), sum(r["errors"] for r in runs)))
    if res["stream"]:
        L.append("")
        L.append("#### Streaming, %s MiB through each target (MB = 10^6 bytes)" % env["size_mib"])
        L.append("")
        L.append("| target | download MB/s | upload MB/s | RSS before MiB | peak RSS download MiB "
                 "| peak RSS upload MiB | growth MiB | CPU s/GiB down | CPU s/GiB up |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for t in res["targets"]:
            d = res["stream"].get(t + ":download", [])
            u = res["stream"].get(t + ":upload", [])
            if not d and not u:
                continue
            rss0 = min([r["rss0"] for r in d + u] or [float("nan")])
            pd = max([r["peak"] for r in d] or [float("nan")])
            pu = max([r["peak"] for r in u] or [float("nan")])
            growth = max([r["peak"] - r["rss0"] for r in d + u if r["ok"]] or [float("nan")])
            bad = [r.get("note", "") for r in d + u if not r["ok"]]
            L.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s |%s" % (
                LABEL[t], fmt(med([r["mbps"] for r in d if r["ok"]])), fmt(med([r["mbps"] for r in u if r["ok"]])),
                fmt(rss0), fmt(pd), fmt(pu), fmt(growth), fmt(med([r.get("cpu_s_gib") for r in d if r["ok"]]), 2),
                fmt(med([r.get("cpu_s_gib") for r in u if r["ok"]]), 2),
                (" failed: " + "; ".join(bad)) if bad else ""))
        if not res.get("hwm_reset", True):
            L.append("")
            L.append("(VmHWM could not be reset per transfer: peaks are lifetime peaks.)")
    sf = res.get("single_flight")
    if sf:
        L.append("")
        L.append("#### Token single-flight (fresh authproxy, token endpoint answering after %.1f s)"
                 % sf["delay"])
        L.append("")
        L.append("| concurrent first requests | replies | token-endpoint requests | wall time s |")
        L.append("|---:|---|---:|---:|")
        L.append("| %d | %s | %s | %.2f |" % (sf["n"], ", ".join("%s×%d" % kv for kv in sorted(sf["results"].items())),
                                             sf["count"], sf["elapsed"]))
    idle = res.get("idle") or {}
    if idle:
        n = max(r["n"] for r in idle.values())
        L.append("")
        L.append("#### %s idle client connections (opened, never sent a byte), then new requests" % "{:,}".format(n))
        L.append("")
        L.append("| target | held | still open at the end | RSS before MiB | RSS with them MiB | growth MiB "
                 "| new request median ms | max ms (of %d) | replies |" % max(r["probes"] for r in idle.values()))
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for t in res["targets"]:
            r = idle.get(t)
            if not r:
                continue
            L.append("| %s | %d | %d | %s | %s | %s | %s | %s | %s |" % (
                LABEL[t], r["held"], r["alive"], fmt(r["rss0"]), fmt(r["rss1"]), fmt(r["growth"]),
                fmt(r["lat_med"], 2), fmt(r["lat_max"], 2), ", ".join("%s×%d" % kv for kv in sorted(r["codes"].items()))))
    L.append("")
    L.append("#### Targets")
    L.append("")
    L.append("| check | authproxy | nginx | naive | authproxy / nginx | target | result |")
    L.append("|---|---:|---:|---:|---:|---|---|")
    for c in res["checks"]:
        L.append("| %s | %s | %s | %s | %s | %s | %s |" % (
            c["name"], c["value"], c.get("nginx", "—"), c.get("naive", "—"), c.get("ratio", "—"), c["target"], c["result"]))
    return "\n".join(L) + "\n"


def verdict(value, limit, higher_is_better):
    """PASS, or MISS with how far off: "MISS by 38%" (short of a floor, or over a ceiling)."""
    if value is None or value != value:
        return "—"
    ok = value >= limit if higher_is_better else value <= limit
    if ok:
        return "PASS"
    off = (limit - value) / limit if higher_is_better else (value - limit) / limit
    return "MISS by %.0f%%" % (100 * off) if off >= 0.005 else "MISS by <1%"


def checks(res):
    """The targets of the "One HTTP/1.1 engine" issue, each beside nginx and the naive proxy."""
    out = []

    def small(t, conns, key):
        runs = res["small"].get("%s@%d" % (t, conns), [])
        return med([r[key] for r in runs]) if runs else float("nan")

    def stream(t, kind):
        runs = [r for r in res["stream"].get("%s:%s" % (t, kind), []) if r["ok"]]
        return med([r["mbps"] for r in runs]) if runs else float("nan")

    def growth(t):
        runs = [r for k in ("download", "upload") for r in res["stream"].get("%s:%s" % (t, k), []) if r["ok"]]
        return max([r["peak"] - r["rss0"] for r in runs]) if runs else float("nan")

    def row(name, get, nd, unit, relative, limit, higher, target):
        """``relative``: the target is ``limit`` × nginx's value; else an absolute ``limit``."""
        for ap in [t for t in ("authproxy", "authproxy-oauth") if t in res["targets"]]:
            v, ng, nv = get(ap), get("nginx"), get("naive")
            if v != v:
                continue
            ratio = v / ng if ng == ng and ng else float("nan")
            value = ratio if relative else v
            label = name if ap == "authproxy" else name + " (oauth2 row)"
            out.append({"name": label, "value": fmt(v, nd) + unit, "nginx": fmt(ng, nd) + unit if ng == ng else "—",
                        "naive": fmt(nv, nd) + unit if nv == nv else "—",
                        "ratio": fmt(ratio, 2) + "×" if ratio == ratio and relative else "—", "target": target,
                        "result": verdict(value, limit, higher)})

    if 32 in res["conns"]:
        row("small requests @32: req/s", lambda t: small(t, 32, "rps"), 0, "", True, 0.45, True, "≥ 0.45× nginx")
        row("small requests @32: CPU µs/request", lambda t: small(t, 32, "cpu_us"), 0, "", True, 2.5, False,
            "≤ 2.5× nginx")
    if 128 in res["conns"]:
        row("small requests @128: p99 latency", lambda t: small(t, 128, "p99"), 1, " ms", True, 3.0, False,
            "≤ 3× nginx")
    if res["stream"]:
        row("1 GiB download: MB/s", lambda t: stream(t, "download"), 0, "", True, 1.0, True, "≥ 1.0× nginx")
        row("1 GiB upload: MB/s", lambda t: stream(t, "upload"), 0, "", True, 1.0, True, "≥ 1.0× nginx")
        row("streaming: peak RSS growth", growth, 1, " MiB", False, 16, False, "≤ 16 MiB")
    idle = res.get("idle") or {}
    if "authproxy" in idle:
        r = idle["authproxy"]
        n = "{:,}".format(r["n"])
        other = lambda t, key, nd, unit: fmt(idle[t][key], nd) + unit if t in idle else "—"
        held = "" if r["held"] >= r["n"] and r["alive"] >= r["n"] else " (held %d, open at the end %d, of %d)" % (
            r["held"], r["alive"], r["n"])
        res_g = verdict(r["growth"], 64, False)
        out.append({"name": "%s idle connections: RSS growth" % n, "value": fmt(r["growth"], 1) + " MiB",
                    "nginx": other("nginx", "growth", 1, " MiB"), "naive": other("naive", "growth", 1, " MiB"),
                    "target": "≤ 64 MiB, all held",
                    "result": (res_g if not held else "MISS" + held)})
        bad = r["codes"].get("200", 0) != r["probes"]
        out.append({"name": "new request while %s idle are open: max of %d" % (n, r["probes"]),
                    "value": fmt(r["lat_max"], 1) + " ms", "nginx": other("nginx", "lat_max", 1, " ms"),
                    "naive": other("naive", "lat_max", 1, " ms"),
                    "target": "≤ 50 ms, all 200",
                    "result": verdict(r["lat_max"], 50, False) if not bad else "MISS (replies %s)" % r["codes"]})
    sf = res.get("single_flight")
    if sf:
        ok = sf["count"] == 1 and sf["results"].get("200", 0) == sf["n"]
        out.append({"name": "token requests for %d concurrent first requests" % sf["n"],
                    "value": "%d (%d × 200)" % (sf["count"], sf["results"].get("200", 0)),
                    "target": "= 1", "result": "PASS" if ok else "MISS"})
    res["checks"] = out


# --------------------------------------------------------------------- main

def parse_size(s):
    m = re.match(r"(?i)^(\d+(?:\.\d+)?)\s*([kmg]?)i?b?$", s.strip())
    if not m:
        raise argparse.ArgumentTypeError("size like 1G, 256M, 1048576")
    return int(float(m.group(1)) * {"": 1, "k": 1024, "m": MIB, "g": 1024 * MIB}[m.group(2).lower()])


def main(argv=None):
    ap = argparse.ArgumentParser(description="authproxy benchmark (see bench/README or the README's Performance section)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 s per wrk run, 1 round, 256 MiB streaming")
    ap.add_argument("--duration", type=int, help="seconds per wrk run (default 10; --quick 3)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds, median reported (default 3; --quick 1)")
    ap.add_argument("--size", type=parse_size, help="streaming size (default 1G; --quick 256M)")
    ap.add_argument("--stream-rounds", type=int,
                    help="interleaved download/upload rounds, median reported (default 5; --quick 1)")
    ap.add_argument("--connections", help="wrk connection counts (default 32,128)")
    ap.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                    help="comma-separated, from %s (default: all but naive-uvloop)" % ",".join(TARGETS))
    ap.add_argument("--single-flight", type=int, default=1000, metavar="N",
                    help="concurrent first requests for the single-flight test (0 skips it)")
    ap.add_argument("--idle", type=int, default=4000, metavar="N",
                    help="idle client connections held while a new request is timed (default 4000; 0 skips)")
    ap.add_argument("--no-small", action="store_true", help="skip the wrk small-request runs")
    ap.add_argument("--no-streaming", action="store_true", help="skip the download/upload runs")
    ap.add_argument("--profile", type=int, default=0, metavar="SECONDS",
                    help="after the run, profile authproxy with py-spy under wrk load (32 connections)")
    ap.add_argument("--profile-python-only", action="store_true",
                    help="py-spy without --native (Python frames only, process not paused per sample)")
    ap.add_argument("--out", help="also write the markdown here (default: bench/results/<time>.md)")
    ap.add_argument("--json", help="also write raw results as JSON here")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, configs)")
    ap.add_argument("--scale-out", action="store_true",
                    help="only the scale-out section (bench/workers.py, ~3 minutes): workers: 1 vs 2, with and "
                         "without a Redis store, and the latency of a Redis-backed first request "
                         "(defaults there: --duration 5, --rounds 2, --connections 32)")
    sys.path.insert(0, HERE)
    import workers as scale_out
    scale_out.add_arguments(ap)
    a = ap.parse_args(argv)
    if a.scale_out:
        return scale_out.main(a=a)
    a.duration = a.duration or (3 if a.quick else 10)
    a.rounds = a.rounds or (1 if a.quick else 3)
    a.size = a.size or (256 * MIB if a.quick else 1024 * MIB)
    a.stream_rounds = a.stream_rounds or (1 if a.quick else 5)
    conns_list = [int(c) for c in (a.connections or "32,128").split(",") if c.strip()]
    targets = [t for t in a.targets.split(",") if t]
    for t in targets:
        if t not in TARGETS:
            ap.error("unknown target %r" % t)

    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    wrk = shutil.which("wrk")
    if not nginx or not wrk or not shutil.which("curl"):
        ap.error("needs nginx, wrk and curl (bench/run installs them)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # inherited by every target
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if a.idle and soft != resource.RLIM_INFINITY and soft < a.idle + 1024:
        log("RLIMIT_NOFILE is %d: idle connections lowered from %d to %d" % (soft, a.idle, max(0, soft - 1024)))
        a.idle = max(0, soft - 1024)

    def on_term(signum, frame):
        raise KeyboardInterrupt("signal %d" % signum)
    signal.signal(signal.SIGTERM, on_term)

    tmp = tempfile.mkdtemp(prefix="authproxy-bench-")
    os.chmod(tmp, 0o755)
    procs = Procs()
    res = {"targets": [], "conns": conns_list, "small": {}, "stream": {}, "idle": {}, "checks": []}
    try:
        res = run(a, tmp, procs, nginx, wrk, targets, conns_list, res)
    except KeyboardInterrupt:
        log("interrupted; stopping processes")
        raise
    finally:
        procs.stop_all()
        if a.keep_tmp:
            log("temp dir kept:", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    checks(res)
    md = render(res)
    print(md)
    out = a.out
    if not out:
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        out = os.path.join(HERE, "results", time.strftime("%Y%m%d-%H%M%S") + ".md")
    with open(out, "w") as f:
        f.write(md)
        if res.get("profile"):
            f.write("\n" + res["profile"])
    if res.get("profile"):
        print(res["profile"])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    log("markdown written to", os.path.relpath(out))
    return 0


def run(a, tmp, procs, nginx, wrk, targets, conns_list, res):
    t_start = time.monotonic()
    os.makedirs(os.path.join(tmp, "www"))
    with open(os.path.join(tmp, "www", "small.json"), "wb") as f:
        f.write(SMALL_JSON)
    large = os.path.join(tmp, "www", "large.bin")
    log("generating %d MiB test file" % (a.size // MIB))
    make_large(large, a.size)

    P = {k: free_port() for k in ("up", "sink", "tok", "ref", "ap")}
    while len(set(P.values())) < len(P):
        P = {k: free_port() for k in P}

    # upstream nginx, sink, token endpoint
    up_conf = write_nginx(tmp, "upstream", UPSTREAM_BODY.format(d=tmp, port=P["up"]))
    ngx = lambda conf, name: [nginx, "-p", tmp, "-c", conf, "-e", os.path.join(tmp, name + ".error.log"),
                              "-g", "daemon off; master_process on;"]
    p_up = procs.start("upstream nginx", ngx(up_conf, "upstream"), os.path.join(tmp, "upstream.out"))
    p_sink = procs.start("upload sink", [sys.executable, os.path.join(HERE, "sink.py"),
                                         "--listen", "127.0.0.1:%d" % P["sink"]], os.path.join(tmp, "sink.out"))
    p_tok = procs.start("token endpoint", [sys.executable, os.path.join(HERE, "mock_token.py"),
                                           "--listen", "127.0.0.1:%d" % P["tok"]], os.path.join(tmp, "token.out"))
    for name, p, port in (("upstream nginx", p_up, P["up"]), ("sink", p_sink, P["sink"]),
                          ("token endpoint", p_tok, P["tok"])):
        if not wait_port(port, p):
            raise SystemExit("%s did not start:\n%s" % (name, tail(os.path.join(tmp, "upstream.error.log"))))
    procs.note_children(p_up)

    T = {}  # target -> dict(small, large, upload, proc)
    T["direct"] = dict(small="http://127.0.0.1:%d/small.json" % P["up"],
                       large="http://127.0.0.1:%d/large.bin" % P["up"],
                       upload="http://127.0.0.1:%d/upload" % P["sink"], proc=p_up, upload_proc=p_sink)
    if "nginx" in targets:
        conf = write_nginx(tmp, "nginx-ref", REFPROXY_BODY.format(
            d=tmp, port=P["ref"], up=P["up"], sink=P["sink"], token=TOKEN))
        p = procs.start("reference nginx proxy", ngx(conf, "nginx-ref"), os.path.join(tmp, "nginx-ref.out"))
        if not wait_port(P["ref"], p):
            raise SystemExit("reference nginx did not start:\n" + tail(os.path.join(tmp, "nginx-ref.error.log")))
        procs.note_children(p)
        base = "http://127.0.0.1:%d" % P["ref"]
        T["nginx"] = dict(small=base + "/static/small.json", large=base + "/static/large.bin",
                          upload=base + "/sink/upload", proc=p)
    for t in ("naive", "naive-uvloop"):
        if t not in targets:
            continue
        port, logf = free_port(), os.path.join(tmp, t + ".out")
        p = procs.start(t + " proxy", [sys.executable, os.path.join(HERE, "naive_proxy.py"),
                                       "--listen", "127.0.0.1:%d" % port,
                                       "--route", "/static=http://127.0.0.1:%d" % P["up"],
                                       "--route", "/sink=http://127.0.0.1:%d" % P["sink"],
                                       "--header", "Authorization: Bearer " + TOKEN]
                        + (["--uvloop"] if t == "naive-uvloop" else []), logf)
        if not wait_port(port, p):
            raise SystemExit("%s proxy did not start:\n%s" % (t, tail(logf)))
        base = "http://127.0.0.1:%d" % port
        T[t] = dict(small=base + "/static/small.json", large=base + "/static/large.bin",
                    upload=base + "/sink/upload", proc=p, log=logf)
        if t == "naive":
            res.setdefault("env_loop", {})["naive"] = event_loop_of(p.pid)
    if "authproxy" in targets or "authproxy-oauth" in targets:
        services = (STATIC_SVC.format(name="static", up=P["up"], token=TOKEN)
                    + OAUTH_SVC.format(name="oauth", up=P["up"], tok=P["tok"])
                    + STATIC_SVC.format(name="static-sink", up=P["sink"], token=TOKEN)
                    + OAUTH_SVC.format(name="oauth-sink", up=P["sink"], tok=P["tok"]))
        p, why = start_authproxy(procs, tmp, "authproxy", P["ap"], services)
        if p is None and "authproxy" in targets:
            log("authproxy did not start with the oauth2 services; trying the static ones alone")
            p, why2 = start_authproxy(procs, tmp, "authproxy", P["ap"], services.split("  oauth:")[0]
                                      + STATIC_SVC.format(name="static-sink", up=P["sink"], token=TOKEN))
            if p is not None:
                res["skipped"] = "authproxy-oauth (e) and the single-flight test: " + why
                log("SKIP authproxy-oauth:", why)
                targets = [t for t in targets if t != "authproxy-oauth"]
        if p is None:
            res["skipped"] = "authproxy targets (d), (e) and the single-flight test: " + why
            log("SKIP authproxy:", why)
            targets = [t for t in targets if not t.startswith("authproxy")]
        else:
            base = "http://127.0.0.1:%d" % P["ap"]
            if "authproxy" in targets:
                T["authproxy"] = dict(small=base + "/static/small.json", large=base + "/static/large.bin",
                                      upload=base + "/static-sink/upload", proc=p,
                                      log=os.path.join(tmp, "authproxy.log"))
            if "authproxy-oauth" in targets:
                T["authproxy-oauth"] = dict(small=base + "/oauth/small.json", large=base + "/oauth/large.bin",
                                            upload=base + "/oauth-sink/upload", proc=p,
                                            log=os.path.join(tmp, "authproxy.log"))
            res.setdefault("env_loop", {})["authproxy"] = event_loop_of(p.pid)
    targets = [t for t in TARGETS if t in targets and t in T]
    res["targets"] = targets

    # sanity: every target serves the small JSON
    for t in list(targets):
        st, body = http(T[t]["small"])
        if st != 200 or body != SMALL_JSON:
            log("target %s answered %s %r; dropping it" % (t, st, body[:200]))
            targets.remove(t)
            res["skipped"] = (res.get("skipped", "") + " %s: answered %s." % (t, st)).strip()

    res["env"] = env_info(a, nginx, wrk, res)

    # small requests: warm up, then round-robin rounds, target order rotated each round
    warm = 1 if a.quick else 2
    for t in targets if not a.no_small else []:
        log("warm-up %s" % t)
        run_wrk(wrk, T[t]["small"], max(conns_list), warm, [])
    for rnd in range(0 if a.no_small else a.rounds):
        order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
        for conns in conns_list:
            for t in order:
                if dead(T, t, res):
                    continue
                pids = tree(T[t]["proc"].pid)
                r = run_wrk(wrk, T[t]["small"], conns, a.duration, pids)
                res["small"].setdefault("%s@%d" % (t, conns), []).append(r)
                log("round %d %-16s c=%-3d %8.0f req/s p50 %.2f ms p99 %.2f ms %5.0f us/req errors %d"
                    % (rnd + 1, t, conns, r["rps"], r["p50"], r["p99"], r["cpu_us"], r["errors"]))

    # streaming
    if not a.no_streaming:
        timeout = max(120, int(a.size / MIB))  # at least 1 MiB/s
        hwm_ok = True
        log("streaming warm-up (direct download)")
        transfer("download", T["direct"]["large"], a.size, large, [], tmp, timeout)
        for rnd in range(a.stream_rounds):
            order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
            for kind in ("download", "upload"):
                for t in order:
                    if dead(T, t, res):
                        continue
                    proc = T[t].get("upload_proc", T[t]["proc"]) if kind == "upload" else T[t]["proc"]
                    url = T[t]["large"] if kind == "download" else T[t]["upload"]
                    r = transfer(kind, url, a.size, large, tree(proc.pid), tmp, timeout)
                    hwm_ok = hwm_ok and r["reset"]
                    res["stream"].setdefault("%s:%s" % (t, kind), []).append(r)
                    log("round %d %-16s %-8s %7.1f MB/s rss %.1f -> peak %.1f MiB %s"
                        % (rnd + 1, t, kind, r["mbps"], r["rss0"], r["peak"], r.get("note", "")))
        res["hwm_reset"] = hwm_ok

    # idle client connections: held, the memory they cost, and a new request meanwhile
    if a.idle:
        for t in targets:
            if t in ("direct", "authproxy-oauth") or dead(T, t, res):
                continue  # authproxy-oauth is the same process as authproxy
            log("idle: %d connections to %s" % (a.idle, t))
            r = idle_connections(T[t]["small"], tree(T[t]["proc"].pid), a.idle)
            res["idle"][t] = r
            log("idle %-16s opened %d held %d alive %d rss %.1f -> %.1f MiB, new request median %.1f ms max %.1f ms %s"
                % (t, r["opened"], r["held"], r["alive"], r["rss0"], r["rss1"], r["lat_med"], r["lat_max"], r["codes"]))

    # token single-flight against a fresh authproxy and a fresh token endpoint
    if a.single_flight and "authproxy-oauth" in targets:
        res["single_flight"] = single_flight(a, tmp, procs, P)

    if a.profile and any(t.startswith("authproxy") for t in targets):
        res["profile"] = profile(a, tmp, wrk, [t for t in targets if t.startswith("authproxy")], T)

    res["env"]["wall_s"] = round(time.monotonic() - t_start)
    if os.path.exists("/proc/loadavg"):
        res["env"]["loadavg_end"] = " ".join(open("/proc/loadavg").read().split()[:3])
    return res


def dead(T, t, res):
    """True (and noted once in the results) if target t's process has exited."""
    p = T[t]["proc"]
    if p.poll() is None:
        return False
    if not T[t].get("dead"):
        T[t]["dead"] = True
        why = "%s: process exited with %s mid-run; later runs skipped (log tail: %s)" % (
            t, p.returncode, tail(T[t]["log"], 200, skip="status=2").replace("\n", " | ")[-400:] if T[t].get("log") else "")
        log(why)
        res["skipped"] = (res.get("skipped", "") + " " + why).strip()
    return True


def start_authproxy(procs, tmp, name, port, services):
    state = os.path.join(tmp, name + "-state")
    os.makedirs(state, mode=0o700, exist_ok=True)
    conf = os.path.join(tmp, name + ".yaml")
    with open(conf, "w") as f:
        f.write(AUTHPROXY_CONFIG.format(port=port, state=state, services=services))
    logf = os.path.join(tmp, name + ".log")  # access log + errors (stderr): a real file, so logging costs
    open(logf, "w").close()
    p = procs.start(name, [sys.executable, "-m", "authproxy", "run", "-c", conf], logf, cwd=tmp)
    if not wait_port(port, p, timeout=30):
        why = "did not start (exit %s): %s" % (
            p.poll(), tail(logf, 8).replace(tmp, "$TMP").replace("\n", " | ")[-600:])
        procs.stop(p)
        return None, why
    return p, ""


def wait_ready(port, timeout=20):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st, _ = http("http://127.0.0.1:%d/-/readyz" % port, timeout=2)
        if st == 200:
            return True
        time.sleep(0.1)
    return False


def single_flight(a, tmp, procs, P):
    delay = 1.0
    tok = free_port()
    ap_port = free_port()
    p_tok = procs.start("token endpoint (single-flight)",
                        [sys.executable, os.path.join(HERE, "mock_token.py"),
                         "--listen", "127.0.0.1:%d" % tok, "--delay", str(delay)],
                        os.path.join(tmp, "token-sf.out"))
    try:
        if not wait_port(tok, p_tok):
            return {"n": a.single_flight, "results": {"token endpoint failed": 1}, "count": -1,
                    "elapsed": 0, "delay": delay}
        services = OAUTH_SVC.format(name="oauth", up=P["up"], tok=tok)
        log("single-flight: fresh authproxy, %d concurrent first requests" % a.single_flight)
        p, why = start_authproxy(procs, tmp, "authproxy-sf", ap_port, services)
        if p is None:
            return {"n": a.single_flight, "results": {"authproxy failed": 1}, "count": -1,
                    "elapsed": 0, "delay": delay}
        try:
            results, elapsed = asyncio.run(_single_flight(
                "http://127.0.0.1:%d/oauth/small.json" % ap_port, a.single_flight))
            _, body = http("http://127.0.0.1:%d/count" % tok)
            count = json.loads(body)["count"]
        finally:
            procs.stop(p)
        log("single-flight: %s, token requests %d, %.2f s" % (results, count, elapsed))
        return {"n": a.single_flight, "results": results, "count": count, "elapsed": elapsed, "delay": delay}
    finally:
        procs.stop(p_tok)


def profile(a, tmp, wrk, aps, T):
    pyspy = shutil.which("py-spy")
    if not pyspy:
        return "py-spy not found (pip install py-spy) — profile skipped\n"
    out = []
    for t in aps:
        raw = os.path.join(tmp, "profile-%s.txt" % t)
        pid = T[t]["proc"].pid
        log("profiling %s (pid %d) for %d s under wrk -c32" % (t, pid, a.profile))
        spy = subprocess.Popen([pyspy, "record", "--pid", str(pid), "--duration", str(a.profile),
                                "--rate", "250", "--format", "raw", "--output", raw]
                               + (["--nonblocking"] if a.profile_python_only else ["--native"]),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=clean_env())
        time.sleep(0.5)
        try:
            run_wrk(wrk, T[t]["small"], 32, a.profile, [])
            try:
                _, err = spy.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                spy.kill()
                _, err = spy.communicate()
        finally:
            if spy.poll() is None:
                spy.kill()
                spy.wait()
        if os.path.exists(raw):
            os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
            shutil.copy(raw, os.path.join(HERE, "results", "profile-%s.folded" % t))
        out.append(summarise_profile(raw, t, err))
    return "\n".join(out)


def _short(frame):
    # "func (path/to/module.py:123)" -> "func (module.py)"
    m = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    fn, path = m.groups()
    path = path.replace(os.sep, "/")
    for marker in ("site-packages/", "/lib/python3", "authproxy/"):
        if marker in path:
            path = path[path.index(marker) + (0 if marker == "authproxy/" else len(marker)):]
            break
    return "%s (%s)" % (fn, path.split("/", 1)[-1] if path.startswith("3.") else path)


BOOT_FRAMES = ("<frozen runpy>", "asyncio/runners.py", "uvloop/__init__.py", "asyncio/base_events.py",
               "authproxy/__main__.py", "authproxy/cli.py")
SYSCALLS = {"write", "writev", "read", "readv", "send", "sendto", "sendmsg", "recv", "recvfrom", "recvmsg",
            "epoll_wait", "epoll_pwait", "epoll_ctl", "accept4", "close", "getrandom", "__libc_write",
            "__libc_read", "__write", "__read", "clock_gettime", "setsockopt", "getsockopt", "connect"}


def summarise_profile(raw, name, err):
    """A markdown summary of py-spy's raw (folded) output.

    Each sample is put in one bucket: a system call (libc leaf frame, with
    --native only; py-spy samples wall-clock time, so this includes time the
    process sat descheduled inside the call -- process accounting gives the
    true kernel share), garbage collection, or code.  Code samples are charged
    to the deepest Python frame, C callees included (so `self` here means
    "this Python function and the C it calls directly").  Interpreter and
    event-loop bootstrap frames are left out of the inclusive ranking."""
    try:
        with open(raw) as f:
            lines = f.read().splitlines()
    except OSError:
        return "#### py-spy profile of %s: failed (%s)\n" % (name, (err or "").strip()[-300:])
    total, bucket = 0, {"system calls": 0, "garbage collection": 0, "code": 0}
    self_t, incl, files, sysc = {}, {}, {}, {}
    for line in lines:
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        total += n
        frames = [_short(f) for f in stack.split(";") if f.strip() and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        py = [f for f in frames if ".py)" in f or "<frozen" in f]
        deepest = py[-1] if py else frames[-1]
        leaf = frames[-1]
        m = re.match(r"(\S+) \((libc[^)]*)\)$", leaf)
        if m and m.group(1) in SYSCALLS:
            bucket["system calls"] += n
            key = "%s() under %s" % (m.group(1), deepest)
            sysc[key] = sysc.get(key, 0) + n
            continue
        bucket["garbage collection" if any("gc_collect" in f for f in frames) else "code"] += n
        self_t[deepest] = self_t.get(deepest, 0) + n
        fm = re.search(r"\(([^()]*)\)$", deepest)
        src = fm.group(1) if fm else deepest
        files[src] = files.get(src, 0) + n
        for f in set(py):
            if not any(b in f for b in BOOT_FRAMES):
                incl[f] = incl.get(f, 0) + n
    pct = lambda v: "%.1f" % (100.0 * v / total) if total else ""
    L = ["#### py-spy profile of %s under wrk -c32 (%d samples, idle excluded; %% of all samples)" % (name, total),
         "", " · ".join("%s %s%%" % (k, pct(v)) for k, v in bucket.items()), ""]
    if sysc:
        L += ["| system call % | call, under |", "|---:|---|"]
        for k, v in sorted(sysc.items(), key=lambda kv: -kv[1])[:6]:
            L.append("| %s | `%s` |" % (pct(v), k))
        L.append("")
    L += ["| self % | source file (deepest Python frame) |", "|---:|---|"]
    for f, v in sorted(files.items(), key=lambda kv: -kv[1])[:15]:
        L.append("| %s | `%s` |" % (pct(v), f))
    L += ["", "| self % | function | inclusive % | function |", "|---:|---|---:|---|"]
    top_self = sorted(self_t.items(), key=lambda kv: -kv[1])[:25]
    top_incl = sorted(incl.items(), key=lambda kv: -kv[1])[:25]
    for i in range(max(len(top_self), len(top_incl))):
        sv = top_self[i] if i < len(top_self) else ("", 0)
        cv = top_incl[i] if i < len(top_incl) else ("", 0)
        L.append("| %s | `%s` | %s | `%s` |" % (pct(sv[1]), sv[0], pct(cv[1]), cv[0]))
    return "\n".join(L) + "\n"


def env_info(a, nginx, wrk, res):
    try:
        import aiohttp
        aio = aiohttp.__version__
    except ImportError:
        aio = "?"
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ngv = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip().replace("nginx version: ", "")
    loops = res.get("env_loop", {})
    return {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(), "cpu": cpu,
            "loadavg": " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else "?",
            "wrk_threads": 2, "nginx": ngv, "python": platform.python_version(), "aiohttp": aio,
            "loop_naive": loops.get("naive", "—"), "loop_authproxy": loops.get("authproxy", "—"),
            "rounds": a.rounds, "duration": a.duration, "size_mib": a.size // MIB,
            "stream_rounds": a.stream_rounds}


if __name__ == "__main__":
    sys.exit(main())
