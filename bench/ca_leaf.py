#!/usr/bin/env python3
"""Leaf issuance by authproxy's CA (forward-proxy mode), after the first.

``python bench/ca_leaf.py [N]``: makes a CA in a temp dir, issues one leaf (not
counted), then N more for distinct hosts, and prints wall time (min, median,
p95) and CPU time per leaf. The target is 5 ms; the cost is mostly OpenSSL
decoding the PEM chain and key into a new SSLContext (``load_cert_chain``).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

from authproxy.proxy.ca import CertificateAuthority


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    with tempfile.TemporaryDirectory() as d:
        ca = CertificateAuthority.load_or_create(os.path.join(d, "ca"))
        ca.server_context("first.example.test")
        wall: list[float] = []
        cpu0 = time.process_time()
        for i in range(n):
            t = time.perf_counter()
            ca.server_context(f"h{i}.example.test")
            wall.append((time.perf_counter() - t) * 1000)
        cpu = (time.process_time() - cpu0) / n * 1000
    wall.sort()
    print(
        f"leaf issuance after the first, {n} leaves: min {wall[0]:.2f} ms, median {statistics.median(wall):.2f} ms, "
        f"p95 {wall[int(n * 0.95)]:.2f} ms; CPU {cpu:.2f} ms per leaf (load average {os.getloadavg()[0]:.1f})"
    )


if __name__ == "__main__":
    main()
