#!/usr/bin/env python3
"""A big download through a forward-proxy tunnel vs reverse-proxy mode (issue 13).

``python bench/tunnel.py [--size-mib 100] [--rounds 3]``

Everything on loopback, made at run time in a temp folder (nothing committed):
a CA and an upstream certificate (``cryptography``); a TLS upstream answering
``GET /blob`` with N MiB (threads writing one fixed buffer through
``ssl.SSLSocket.sendall``: OpenSSL encrypts without the GIL); ``authproxy run``
(a subprocess) with one bearer service ``svc`` -- ``upstream:
https://127.0.0.1:PORT``, its ``ca_file``, ``hosts: [bench.example.test]`` --
and ``forward_proxy.enabled``. Then ``curl`` downloads to /dev/null, each
round in turn:

* direct:  ``https://127.0.0.1:UP/blob`` (the upstream alone: not the bottleneck?)
* reverse: ``http://127.0.0.1:PROXY/svc/blob`` (client→proxy plain, proxy→upstream TLS;
  the listener speaks plain HTTP, so reverse mode with client-side TLS does not exist)
* tunnel:  ``--proxy http://127.0.0.1:PROXY --cacert <authproxy's CA> https://bench.example.test:UP/blob``
  (CONNECT, client→proxy TLS with a leaf from authproxy's CA, proxy→upstream TLS)

Prints MB/s (10^6 bytes) per mode (median of the rounds, curl's ``speed_download``),
the proxy's CPU seconds per round, the ratio tunnel/reverse with PASS/MISS
against 0.5 (issue 13's "Done when"), and the proxy's peak RSS (``VmHWM``; reset
between modes through ``/proc/PID/clear_refs`` where allowed). Every process it
starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HOST = "bench.example.test"
TARGET = 0.5
CHUNK = 256 * 1024

CONFIG = """\
listen: 127.0.0.1:{port}
state_dir: {state}
log: {{level: warning}}
forward_proxy: {{enabled: true}}
services:
  svc:
    upstream: https://127.0.0.1:{up}
    ca_file: {ca_file}
    hosts: [{host}]
    auth: {{scheme: bearer, token: bench-static-token}}
"""


# --------------------------------------------------------------------------- certificates


def make_certs(d: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a leaf for 127.0.0.1 (and localhost): (ca.pem, leaf.pem, leaf.key)."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "authproxy bench upstream CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    ca_pem, leaf_pem, leaf_key = d / "upstream-ca.pem", d / "upstream.pem", d / "upstream.key"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    leaf_pem.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    leaf_key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    os.chmod(leaf_key, 0o600)
    return ca_pem, leaf_pem, leaf_key


# --------------------------------------------------------------------------- the upstream


class Upstream:
    """``GET /blob`` → ``size`` bytes (Content-Length), keep-alive; anything else 404.
    One thread per connection; the body is one buffer written with ``sendall``."""

    def __init__(self, cert: Path, key: Path, size: int) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.size = size
        self.buf = b"\x5a" * CHUNK  # not text a scrubber would look into (octet-stream anyway)
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.sock.getsockname()[1]
        self._closing = False
        self._conns: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        self._conns.add(raw)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.ctx.wrap_socket(raw, server_side=True) as s:
                pending = b""
                while True:
                    while b"\r\n\r\n" not in pending:
                        data = s.recv(65536)
                        if not data:
                            return
                        pending += data
                    head, _, pending = pending.partition(b"\r\n\r\n")
                    line = head.split(b"\r\n", 1)[0].split()
                    close = b"connection: close" in head.lower()
                    if len(line) < 2 or line[1] != b"/blob":
                        s.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                        continue
                    s.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n%s\r\n"
                              % (self.size, b"Connection: close\r\n" if close else b""))  # fmt: skip
                    if line[0] != b"HEAD":
                        left = self.size
                        view = memoryview(self.buf)
                        while left:
                            n = min(left, CHUNK)
                            s.sendall(view[:n])
                            left -= n
                    if close:
                        return
        except (OSError, ssl.SSLError):
            return
        finally:
            self._conns.discard(raw)

    def close(self) -> None:
        self._closing = True
        self.sock.close()
        for c in list(self._conns):
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# --------------------------------------------------------------------------- helpers


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 30) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            with opener.open(f"http://127.0.0.1:{port}/-/healthz", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0, same user)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def curl(args: list[str], size: int, timeout: float) -> float:
    """One download to /dev/null; bytes per second (curl's speed_download)."""
    argv = ["curl", "-s", "-S", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{speed_download}", *args]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=clean_env())
    parts = out.stdout.split()
    if out.returncode != 0 or len(parts) != 3 or parts[0] != "200" or int(parts[1]) != size:
        raise RuntimeError(f"curl {' '.join(args)}: exit {out.returncode}, got {out.stdout!r} {out.stderr.strip()!r} (want 200 and {size} bytes)")
    return float(parts[2])


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=100, help="download size in MiB (default 100)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each downloads once per mode (default 3)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (config, proxy log)")
    a = ap.parse_args()
    if not shutil.which("curl"):
        print("bench/tunnel.py: needs curl", file=sys.stderr)
        return 2
    size = a.size_mib * 1024 * 1024
    timeout = 60 + size / 5e6  # even at 5 MB/s
    root = Path(__file__).resolve().parent.parent
    tmp = Path(tempfile.mkdtemp(prefix="authproxy-tunnel-bench-"))
    upstream: Upstream | None = None
    proc: subprocess.Popen | None = None
    logf = None
    try:
        ca_file, cert, key = make_certs(tmp)
        upstream = Upstream(cert, key, size)
        port = free_port()
        conf = tmp / "authproxy.yaml"
        state = tmp / "state"
        state.mkdir(mode=0o700)
        conf.write_text(CONFIG.format(port=port, state=state, up=upstream.port, ca_file=ca_file, host=HOST))
        env = clean_env()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH", "")]))
        ca = subprocess.run([sys.executable, "-m", "authproxy", "ca", "-c", str(conf)], capture_output=True, text=True, env=env, timeout=60)
        if ca.returncode != 0:
            print(f"authproxy ca failed: {ca.stderr.strip()}", file=sys.stderr)
            return 1
        proxy_ca = ca.stdout.strip().splitlines()[-1]
        logf = open(tmp / "authproxy.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "authproxy", "run", "-c", str(conf)], stdin=subprocess.DEVNULL,
                                stdout=logf, stderr=subprocess.STDOUT, cwd=tmp, env=env, start_new_session=True)  # fmt: skip
        if not wait_ready(port, proc):
            print(f"authproxy did not start (exit {proc.poll()}): {(tmp / 'authproxy.log').read_text()[-800:]}", file=sys.stderr)
            return 1
        with open(f"/proc/{proc.pid}/maps") as f:
            loop_kind = "uvloop" if "uvloop" in f.read() else "asyncio"

        modes = {
            "direct": ["--noproxy", "*", "--cacert", str(ca_file), f"https://127.0.0.1:{upstream.port}/blob"],
            "reverse": ["--noproxy", "*", f"http://127.0.0.1:{port}/svc/blob"],
            "tunnel": ["--proxy", f"http://127.0.0.1:{port}", "--cacert", proxy_ca, f"https://{HOST}:{upstream.port}/blob"],
        }
        # warm-up: one download each (the leaf for HOST is issued, pools connected)
        for args in modes.values():
            curl(args, size, timeout)
        speeds: dict[str, list[float]] = {m: [] for m in modes}
        cpu: dict[str, list[float]] = {m: [] for m in modes}
        peak: dict[str, int] = {m: 0 for m in modes}
        can_reset = True
        rss_base = status_kib(proc.pid, "VmRSS")
        for r in range(a.rounds):
            for m, args in modes.items():
                if can_reset:
                    can_reset = reset_peak(proc.pid)
                c0 = cpu_seconds(proc.pid)
                speeds[m].append(curl(args, size, timeout))
                cpu[m].append(cpu_seconds(proc.pid) - c0)
                if can_reset:
                    peak[m] = max(peak[m], status_kib(proc.pid, "VmHWM"))
                print(f"  round {r + 1} {m:8s} {speeds[m][-1] / 1e6:8.1f} MB/s  proxy CPU {cpu[m][-1]:.2f} s", flush=True)
        hwm = status_kib(proc.pid, "VmHWM")

        print()
        print(f"{a.size_mib} MiB download, {a.rounds} round(s), median; authproxy on {loop_kind}, {os.cpu_count()} CPUs, curl to /dev/null")
        print(f"{'mode':8s} {'MB/s':>8s} {'proxy CPU s':>12s} {'proxy peak RSS':>15s}")
        for m in modes:
            rss = f"{peak[m] / 1024:.0f} MiB" if can_reset and m != "direct" else "-"
            print(f"{m:8s} {statistics.median(speeds[m]) / 1e6:8.1f} {statistics.median(cpu[m]):12.2f} {rss:>15s}")
        ratio = statistics.median(speeds["tunnel"]) / statistics.median(speeds["reverse"])
        verdict = "PASS" if ratio >= TARGET else "MISS"
        print(f"tunnel/reverse = {ratio:.2f} ({verdict}, target >= {TARGET})")
        print(f"proxy RSS: {rss_base / 1024:.0f} MiB after warm-up, peak (VmHWM) {hwm / 1024:.0f} MiB"
              + ("" if can_reset else " (since start: clear_refs not allowed)"))  # fmt: skip
        return 0 if ratio >= TARGET else 1
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if logf is not None:
            logf.close()
        if upstream is not None:
            upstream.close()
        if a.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
