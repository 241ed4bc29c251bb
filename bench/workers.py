#!/usr/bin/env python3
"""Scale-out bench: ``workers: 1`` vs ``workers: 2``, with and without a Redis store,
and the added latency of a Redis-backed first request.  Run it as
``bench/run --scale-out`` (or ``python bench/workers.py``); ~3 minutes on 2 cores.

1. **Small-request throughput.**  One upstream nginx (the 509-byte JSON of
   ``bench.py``), and as targets: the nginx reference proxy, the naive aiohttp
   proxy, and authproxy with a static ``bearer`` service at ``workers: 1`` and
   ``workers: 2``, each again with a Redis ``store`` configured.  All run at
   once, idle but for the one under load; wrk (``bench.py``'s settings: 2
   threads, ``--latency``) takes them in turns, order rotated each round,
   median of the rounds.  CPU pinning with ``taskset`` when there are at least
   2 CPUs: wrk and the upstream nginx on the last CPU; a target of one process
   on CPU 0; a target of N processes on CPUs 0..N-1 of the others if there are
   that many, else on every CPU (on 2 cores ``workers: 2`` shares CPU 1 with
   wrk and the upstream).  CPU µs/request = utime+stime of the target's process
   tree over the run / requests.  For the store rows the Redis commands
   processed during the run are counted (INFO stats): the hot path reads the
   credential from memory, so it should be 0.
2. **First-request latency.**  A fresh ``authproxy run`` (``workers: 1``) per
   repetition, modes interleaved: a static ``bearer`` service (the baseline: a
   fresh process's first request with no credential to obtain), then an
   ``oauth2`` client_credentials service against ``bench/mock_token.py`` with
   (a) no store (state dir), (b) an empty Redis store (a fresh key prefix per
   repetition: lock, token request, encrypted write, release), (c) a Redis store
   already holding the credential (adopted: no token request).  authproxy starts
   the service's credential fetch right after its listener opens, so the bench
   connects in a 1 ms loop; the clock starts when a connect succeeds (the
   listener exists, the fetch has just been started) and stops when the first
   proxied response has been read whole: the fetch the request waits for plus one
   proxied request, process start excluded.  The fetch's own ``duration_ms``
   from the ``token_fetched``/``token_adopted`` log line is reported beside it.
"""
import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench as B  # noqa: E402  (the helpers of bench.py: processes, configs, wrk parsing)

LABELS = {
    "nginx": "nginx proxy (1 worker)",
    "naive": "naive aiohttp proxy",
    "w1": "authproxy workers: 1",
    "w2": "authproxy workers: 2",
    "w1-redis": "authproxy workers: 1 + Redis store",
    "w2-redis": "authproxy workers: 2 + Redis store",
}
ORDER = ["nginx", "naive", "w1", "w2", "w1-redis", "w2-redis"]
MODES = ["static", "none", "empty", "held"]
MODE_LABEL = {
    "static": "baseline: static bearer, no credential to obtain",
    "none": "(a) oauth2, no store (state dir)",
    "empty": "(b) oauth2, Redis store empty: lock, token request, write",
    "held": "(c) oauth2, Redis store holding the credential: adopt",
}

AP_CONFIG = """\
listen: 127.0.0.1:{port}
state_dir: {state}
workers: {workers}
log: {{level: info, format: json}}
shutdown_timeout: 2
{store}services:
{services}"""

STORE = """\
store:
  url: redis://127.0.0.1:{port}/0
  key_file: {key}
  prefix: "{prefix}"
"""


def pct(values, q):
    values = sorted(v for v in values if v == v)
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


# ------------------------------------------------------------------ redis

def resp(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def redis_cmd(port, *args, timeout=2.0):
    """One command; the reply (a bulk string's payload, or the status line)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(resp(*args))
        f = s.makefile("rb")
        line = f.readline()
        if line.startswith(b"$"):
            n = int(line[1:])
            return f.read(n + 2)[:-2] if n >= 0 else b""
        return line.strip()


def redis_stat(port, field):
    try:
        m = re.search(rb"^%s:(\d+)" % field.encode(), redis_cmd(port, "INFO", "stats"), re.M)
        return int(m.group(1)) if m else -1
    except OSError:
        return -1


def start_redis(procs, tmp):
    binary = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
    if not binary:
        return None, None, "redis-server not found (bench/run installs the Debian package redis-server)"
    d = os.path.join(tmp, "redis")
    os.makedirs(d, mode=0o700)
    port = B.free_port()
    p = procs.start("redis-server", [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                     "--appendonly", "no", "--dir", d, "--daemonize", "no",
                                     "--protected-mode", "yes", "--logfile", os.path.join(d, "redis.log")],
                    os.path.join(tmp, "redis.out"))
    end = time.monotonic() + 15
    while time.monotonic() < end and p.poll() is None:
        try:
            if redis_cmd(port, "PING") == b"+PONG":
                return p, port, ""
        except OSError:
            pass
        time.sleep(0.01)
    procs.stop(p)
    return None, None, "redis-server did not answer PING: " + B.tail(os.path.join(d, "redis.log"), 5)


# ------------------------------------------------------------------ cpus

def cpu_plan():
    """{'wrk': cpus for wrk and the upstream, 1: cpus for a one-process target, 2: ...}
    as taskset lists (None: no pinning), and a sentence saying what was possible."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        cpus = list(range(os.cpu_count() or 1))
    if len(cpus) < 2 or not shutil.which("taskset"):
        return {"wrk": None, 1: None, 2: None}, (
            "no pinning (%s): wrk, the upstream and every target share the CPUs"
            % ("taskset not found" if len(cpus) >= 2 else "1 CPU"))
    wrk, rest = cpus[-1], cpus[:-1]
    lst = lambda c: ",".join(str(x) for x in c)  # noqa: E731
    plan = {"wrk": lst([wrk]), 1: lst(rest[:1])}
    plan[2] = lst(rest[:2]) if len(rest) >= 2 else None
    text = ("wrk (2 threads) and the upstream nginx pinned to CPU %d; nginx proxy, naive proxy and authproxy "
            "workers: 1 pinned to CPU %d; authproxy workers: 2 %s" % (
                wrk, rest[0], "pinned to CPUs %s" % plan[2] if plan[2] else
                "not pinned (both its workers share the %d CPUs with wrk and the upstream)" % len(cpus)))
    return plan, text


def pinned(cpus, argv):
    return (["taskset", "-c", cpus] + argv) if cpus else argv


# ------------------------------------------------------------------ throughput

def run_wrk(wrk, cpus, url, conns, duration, pids, redis_port=None, redis_pid=None):
    argv = pinned(cpus, [wrk, "-t2", "-c%d" % conns, "-d%ds" % duration, "--latency", "--timeout", "10s", url])
    before, sys0 = B.cpu_ticks(pids), B.sys_ticks(pids)
    cmds0 = redis_stat(redis_port, "total_commands_processed") if redis_port else None
    rcpu0 = B.cpu_ticks([redis_pid]) if redis_pid else 0
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, env=B.clean_env()).stdout
    except subprocess.TimeoutExpired:
        out = ""
    after, sys1 = B.cpu_ticks(pids), B.sys_ticks(pids)
    r = B.parse_wrk(out)
    n = r["requests"]
    r["cpu_s"] = (after - before) / B.CLK
    r["cpu_us"] = r["cpu_s"] * 1e6 / n if n else float("nan")
    r["cpu_util"] = r["cpu_s"] / r["elapsed"] if n else float("nan")
    r["sys_pct"] = 100.0 * (sys1 - sys0) / (after - before) if after > before else float("nan")
    if redis_port:
        # minus 1: the INFO that read the count before is counted in the one after
        r["redis_cmds"] = redis_stat(redis_port, "total_commands_processed") - cmds0 - 1
        r["redis_cpu_s"] = (B.cpu_ticks([redis_pid]) - rcpu0) / B.CLK
    return r


def throughput(a, tmp, procs, wrk, nginx, plan, P, redis_port, redis_pid, key, res):
    T = {}
    ngx = lambda conf, name: [nginx, "-p", tmp, "-c", conf, "-e", os.path.join(tmp, name + ".error.log"),  # noqa: E731
                              "-g", "daemon off; master_process on;"]
    conf = B.write_nginx(tmp, "nginx-ref", B.REFPROXY_BODY.format(
        d=tmp, port=P["ref"], up=P["up"], sink=P["up"], token=B.TOKEN))
    p = procs.start("reference nginx proxy", pinned(plan[1], ngx(conf, "nginx-ref")), os.path.join(tmp, "nginx-ref.out"))
    if not B.wait_port(P["ref"], p):
        raise SystemExit("reference nginx did not start:\n" + B.tail(os.path.join(tmp, "nginx-ref.error.log")))
    procs.note_children(p)
    T["nginx"] = dict(url="http://127.0.0.1:%d/static/small.json" % P["ref"], proc=p)

    port, logf = B.free_port(), os.path.join(tmp, "naive.out")
    p = procs.start("naive proxy", pinned(plan[1], [
        sys.executable, os.path.join(HERE, "naive_proxy.py"), "--listen", "127.0.0.1:%d" % port,
        "--route", "/static=http://127.0.0.1:%d" % P["up"], "--header", "Authorization: Bearer " + B.TOKEN]), logf)
    if not B.wait_port(port, p):
        raise SystemExit("naive proxy did not start:\n" + B.tail(logf))
    T["naive"] = dict(url="http://127.0.0.1:%d/static/small.json" % port, proc=p)

    services = B.STATIC_SVC.format(name="static", up=P["up"], token=B.TOKEN)
    for t in ("w1", "w2", "w1-redis", "w2-redis"):
        if t.endswith("redis") and not redis_port:
            continue
        workers = int(t[1])
        store = STORE.format(port=redis_port, key=key, prefix="bench-%s:" % t) if t.endswith("redis") else ""
        port = B.free_port()
        p, why = start_ap(procs, tmp, "ap-" + t, port, workers, store, services, plan[workers])
        if p is None:
            res["notes"].append("%s did not start: %s" % (t, why))
            continue
        T[t] = dict(url="http://127.0.0.1:%d/static/small.json" % port, proc=p, redis=t.endswith("redis"))
        procs.note_children(p)
    targets = [t for t in ORDER if t in T]
    for t in list(targets):
        st, body = B.http(T[t]["url"])
        if st != 200 or body != B.SMALL_JSON:
            res["notes"].append("%s answered %s; dropped" % (t, st))
            targets.remove(t)
    for t in targets:
        if T[t]["proc"].pid and t.startswith("w"):
            T[t]["nproc"] = len(B.tree(T[t]["proc"].pid))
    for t in targets:
        B.log("warm-up %s" % t)
        run_wrk(wrk, plan["wrk"], T[t]["url"], max(a.conns), 1, [])
    for rnd in range(a.rounds):
        order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
        for conns in a.conns:
            for t in order:
                if T[t]["proc"].poll() is not None:
                    res["notes"].append("%s exited mid-run" % t)
                    continue
                r = run_wrk(wrk, plan["wrk"], T[t]["url"], conns, a.duration, B.tree(T[t]["proc"].pid),
                            redis_port if T[t].get("redis") else None, redis_pid if T[t].get("redis") else None)
                res["small"].setdefault("%s@%d" % (t, conns), []).append(r)
                B.log("round %d %-9s c=%-3d %7.0f req/s p50 %.2f ms p99 %.2f ms %4.0f us/req%s errors %d" % (
                    rnd + 1, t, conns, r["rps"], r["p50"], r["p99"], r["cpu_us"],
                    " redis cmds %d" % r["redis_cmds"] if "redis_cmds" in r else "", r["errors"]))
    res["targets"] = targets
    res["nproc"] = {t: T[t].get("nproc") for t in targets}
    for t in targets:
        procs.stop(T[t]["proc"])


def start_ap(procs, tmp, name, port, workers, store, services, cpus=None):
    state = os.path.join(tmp, name + "-state")
    os.makedirs(state, mode=0o700, exist_ok=True)
    conf = os.path.join(tmp, name + ".yaml")
    with open(conf, "w") as f:
        f.write(AP_CONFIG.format(port=port, state=state, workers=workers, store=store, services=services))
    logf = os.path.join(tmp, name + ".log")
    p = procs.start(name, pinned(cpus, [sys.executable, "-m", "authproxy", "run", "-c", conf]), logf, cwd=tmp)
    if not B.wait_port(port, p, timeout=30) or not B.wait_ready(port, 30):
        why = "exit %s: %s" % (p.poll(), B.tail(logf, 6).replace(tmp, "$TMP").replace("\n", " | ")[-500:])
        procs.stop(p)
        return None, why
    return p, ""


# ------------------------------------------------------------------ first request

def first_request(port, path, proc, timeout=30.0):
    """Connect in a 1 ms loop until the listener exists, then GET on that connection:
    (status, ms from the successful connect to the response read whole)."""
    end = time.monotonic() + timeout
    while True:
        if proc.poll() is not None or time.monotonic() > end:
            return None, float("nan")
        s = socket.socket()
        try:
            s.connect(("127.0.0.1", port))
            break
        except OSError:
            s.close()
            time.sleep(0.001)
    t0 = time.perf_counter()
    with s:
        s.settimeout(timeout)
        s.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n" % (path, port)).encode())
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    ms = (time.perf_counter() - t0) * 1e3
    m = re.match(rb"HTTP/1\.[01] (\d{3})", buf)
    if not m:
        return 0, ms
    status = int(m.group(1))
    return (status if buf.endswith(B.SMALL_JSON) else -status), ms  # negative: not the expected body


def fetch_event(logf):
    """(event, duration_ms) of the oauth service's token_* log line, if any."""
    try:
        with open(logf) as f:
            for line in f:
                if '"token_' not in line:
                    continue
                try:
                    d = json.loads(line)
                except ValueError:
                    continue
                if d.get("service") == "oauth" and d.get("event", "").startswith("token_"):
                    return d["event"], d.get("duration_ms", float("nan"))
    except OSError:
        pass
    return None, float("nan")


def first_requests(a, tmp, procs, P, redis_port, key, res):
    tok_port = B.free_port()
    p_tok = procs.start("token endpoint", [sys.executable, os.path.join(HERE, "mock_token.py"),
                                           "--listen", "127.0.0.1:%d" % tok_port], os.path.join(tmp, "token.out"))
    if not B.wait_port(tok_port, p_tok):
        res["notes"].append("token endpoint did not start")
        return
    count = lambda: json.loads(B.http("http://127.0.0.1:%d/count" % tok_port)[1])["count"]  # noqa: E731
    oauth = B.OAUTH_SVC.format(name="oauth", up=P["up"], tok=tok_port)
    static = B.STATIC_SVC.format(name="oauth", up=P["up"], token=B.TOKEN)  # same route, nothing to obtain
    modes = [m for m in MODES if redis_port or m in ("static", "none")]

    def once(mode, rep, prefix=None):
        name = "first-%s-%d" % (mode, rep)
        store = STORE.format(port=redis_port, key=key, prefix=prefix) if prefix else ""
        state = os.path.join(tmp, name + "-state")
        os.makedirs(state, mode=0o700)
        conf = os.path.join(tmp, name + ".yaml")
        port = B.free_port()
        with open(conf, "w") as f:
            f.write(AP_CONFIG.format(port=port, state=state, workers=1, store=store,
                                     services=static if mode == "static" else oauth))
        logf = os.path.join(tmp, name + ".log")
        c0 = count()
        p = procs.start(name, [sys.executable, "-m", "authproxy", "run", "-c", conf], logf, cwd=tmp)
        try:
            status, ms = first_request(port, "/oauth/small.json", p)
        finally:
            procs.stop(p)
        ev, fetch_ms = fetch_event(logf)
        r = {"status": status, "ms": ms, "event": ev, "fetch_ms": fetch_ms, "token_requests": count() - c0}
        if status != 200:
            r["log"] = B.tail(logf, 5).replace(tmp, "$TMP")
        shutil.rmtree(state, ignore_errors=True)
        return r

    if "held" in modes:  # seed the credential the (c) runs adopt
        r = once("seed", 0, "bench-held:")
        res["seed"] = r
        if r["status"] != 200 or r["event"] != "token_fetched":
            res["notes"].append("seeding the Redis store failed: %s" % r)
    for rep in range(a.reps):
        for mode in modes[rep % len(modes):] + modes[:rep % len(modes)]:
            prefix = {"empty": "bench-empty-%d:" % rep, "held": "bench-held:"}.get(mode)
            r = once(mode, rep, prefix)
            res["first"].setdefault(mode, []).append(r)
            B.log("first request %-6s rep %2d: %s in %.1f ms (%s %s ms, %d token request(s))" % (
                mode, rep + 1, r["status"], r["ms"], r["event"], r["fetch_ms"], r["token_requests"]))
            if r.get("log"):
                B.log("  log tail: " + r["log"].replace("\n", " | ")[-400:])
    procs.stop(p_tok)


# ------------------------------------------------------------------ report

def render(res):
    e = res["env"]
    L = ["### Scale out — %s" % e["date"], ""]
    L.append("%s cores (%s); %s; Python %s; %s; wrk 2 threads, %s connections, %d s per run, %d round(s) "
             "(order rotated, median); first-request latency: %d repetition(s) per mode; load average at start %s, "
             "at the end %s (over %s means something else competed for the cores); %s s in all." % (
                 e["cores"], e["cpu"], e["nginx"], e["python"], e["pinning"], ",".join(map(str, e["conns"])),
                 e["duration"], e["rounds"], e["reps"], e["loadavg"], e.get("loadavg_end", "?"), e["cores"],
                 e.get("wall_s", "?")))
    if res["notes"]:
        L += ["", "**Notes:** " + " ".join(res["notes"])]
    for conns in e["conns"]:
        L += ["", "#### Small requests (%d-byte JSON), %d connections" % (len(B.SMALL_JSON), conns), "",
              "| target | processes | req/s | p50 ms | p99 ms | CPU µs/req | CPU cores | Redis commands during the run | errors |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for t in res["targets"]:
            runs = res["small"].get("%s@%d" % (t, conns), [])
            if not runs:
                continue
            m = lambda k, nd: B.fmt(B.med([r.get(k, float("nan")) for r in runs]), nd)  # noqa: E731
            nproc = res["nproc"].get(t)
            procs = {"nginx": "1+1", "naive": "1"}.get(t) or ("%d" % nproc if nproc else "?")
            cmds = ("%d" % sum(r["redis_cmds"] for r in runs)) if "redis_cmds" in runs[0] else "—"
            L.append("| %s | %s | %s | %s | %s | %s | %s | %s | %d |" % (
                LABELS[t], procs, m("rps", 0), m("p50", 2), m("p99", 2), m("cpu_us", 0), m("cpu_util", 2), cmds,
                sum(r["errors"] for r in runs)))
    if res["first"]:
        L += ["", "#### First request on a fresh `authproxy run` (workers: 1), ms from the listener opening to "
              "the first proxied response read whole", "",
              "| mode | n | median ms | p90 ms | min ms | fetch itself (log `duration_ms`), median | log event | "
              "token requests | replies |",
              "|---|---:|---:|---:|---:|---:|---|---:|---|"]
        for mode in MODES:
            runs = res["first"].get(mode)
            if not runs:
                continue
            ok = [r for r in runs if r["status"] == 200]
            ms = [r["ms"] for r in ok]
            evs, codes = {}, {}
            for r in runs:
                evs[r["event"] or "none"] = evs.get(r["event"] or "none", 0) + 1
                codes[str(r["status"])] = codes.get(str(r["status"]), 0) + 1
            L.append("| %s | %d | %s | %s | %s | %s | %s | %d | %s |" % (
                MODE_LABEL[mode], len(runs), B.fmt(B.med(ms), 1), B.fmt(pct(ms, 90), 1),
                B.fmt(min(ms) if ms else float("nan"), 1),
                B.fmt(B.med([r["fetch_ms"] for r in ok]), 1) if mode != "static" else "—",
                ", ".join("%s×%d" % kv for kv in sorted(evs.items())) if mode != "static" else "—",
                sum(r["token_requests"] for r in runs),
                ", ".join("%s×%d" % kv for kv in sorted(codes.items()))))
    return "\n".join(L) + "\n"


# ------------------------------------------------------------------ main

def add_arguments(ap):
    ap.add_argument("--scale-out-reps", type=int, default=20, metavar="N",
                    help="--scale-out: fresh processes per first-request mode (default 20)")


def main(argv=None, a=None):
    if a is None:
        ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        ap.add_argument("--duration", type=int)
        ap.add_argument("--rounds", type=int)
        ap.add_argument("--connections")
        ap.add_argument("--out")
        ap.add_argument("--json")
        ap.add_argument("--keep-tmp", action="store_true")
        add_arguments(ap)
        a = ap.parse_args(argv)
    a.duration = a.duration or 5
    a.rounds = a.rounds or 2
    a.conns = [int(c) for c in (a.connections or "32").split(",") if c.strip()]
    a.reps = a.scale_out_reps
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    wrk = shutil.which("wrk")
    if not nginx or not wrk:
        raise SystemExit("needs nginx and wrk (bench/run installs them)")
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    t_start = time.monotonic()
    plan, pin_text = cpu_plan()
    tmp = tempfile.mkdtemp(prefix="authproxy-bench-scale-")
    os.chmod(tmp, 0o755)
    procs = B.Procs()
    res = {"small": {}, "first": {}, "targets": [], "nproc": {}, "notes": []}
    import platform
    res["env"] = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(), "cpu": cpu_model(),
        "nginx": "nginx/" + subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip().rsplit("/", 1)[-1],
        "python": platform.python_version(), "pinning": pin_text, "conns": a.conns, "duration": a.duration,
        "rounds": a.rounds, "reps": a.reps, "loadavg": loadavg()}
    try:
        os.makedirs(os.path.join(tmp, "www"))
        with open(os.path.join(tmp, "www", "small.json"), "wb") as f:
            f.write(B.SMALL_JSON)
        key = os.path.join(tmp, "store.key")
        with open(key, "wb") as f:
            f.write(os.urandom(32))
        os.chmod(key, 0o600)
        P = {"up": B.free_port(), "ref": B.free_port()}
        up_conf = B.write_nginx(tmp, "upstream", B.UPSTREAM_BODY.format(d=tmp, port=P["up"]))
        p_up = procs.start("upstream nginx", pinned(plan["wrk"], [
            nginx, "-p", tmp, "-c", up_conf, "-e", os.path.join(tmp, "upstream.error.log"),
            "-g", "daemon off; master_process on;"]), os.path.join(tmp, "upstream.out"))
        if not B.wait_port(P["up"], p_up):
            raise SystemExit("upstream nginx did not start:\n" + B.tail(os.path.join(tmp, "upstream.error.log")))
        procs.note_children(p_up)
        p_redis, redis_port, why = start_redis(procs, tmp)
        if p_redis is None:
            res["notes"].append("No Redis rows: " + why + ".")
            B.log("SKIP Redis:", why)
        res["env"]["redis"] = redis_cmd(redis_port, "INFO", "server").split(b"redis_version:")[1].split()[0].decode() \
            if redis_port else "—"
        throughput(a, tmp, procs, wrk, nginx, plan, P, redis_port, p_redis.pid if p_redis else None, key, res)
        first_requests(a, tmp, procs, P, redis_port, key, res)
    finally:
        procs.stop_all()
        if a.keep_tmp:
            B.log("temp dir kept:", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    res["env"]["loadavg_end"] = loadavg()
    res["env"]["wall_s"] = round(time.monotonic() - t_start)
    md = render(res)
    print(md)
    out = a.out
    if not out:
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        out = os.path.join(HERE, "results", time.strftime("%Y%m%d-%H%M%S") + "-scale-out.md")
    with open(out, "w") as f:
        f.write(md)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    B.log("markdown written to", os.path.relpath(out))
    return 0


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


if __name__ == "__main__":
    sys.exit(main())
