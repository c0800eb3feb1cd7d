"""
What an idle proxygate process weighs (issue 8: idle RSS under 40 MB per process).

Run as a README install runs it (no pyOpenSSL, see tests.support.TWISTD_WITHOUT_PYOPENSSL), on
the defaults plus loopback destinations, after it has served a request and a scrape. The
budget is what the process must not load to stay under it: pyOpenSSL and cryptography's
OpenSSL (13 MB; cryptography only with [mitm] on) and twisted.web (5 MB).

Twisted's plugin cache is built first (as the README asks after an install): a twistd that
finds none imports every Twisted plugin to write it and stays about 10 MB heavier.
"""

from __future__ import annotations

import os
import subprocess
import urllib.request

from tests.support import LOOPBACK_INI, REPO, TWISTD, TWISTD_WITHOUT_PYOPENSSL, ProxyProcess, rss

MB = 1024 * 1024


def _mapped(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps") as f:
        return {line.split()[-1] for line in f if "/" in line}


def test_idleProcessStaysUnder40MB(tmp_path, origin) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # as ProxyProcess runs it: the same caches
    subprocess.run([*TWISTD, "--help"], cwd=REPO, env=env, capture_output=True, timeout=60)
    p = ProxyProcess(tmp_path, LOOPBACK_INI, twistd=TWISTD_WITHOUT_PYOPENSSL).start()
    try:
        proxy = urllib.request.ProxyHandler({"http": p.url})
        with urllib.request.build_opener(proxy).open(origin.url("/echo"), timeout=10) as r:
            assert r.status == 200
        assert "proxygate_requests_total" in p.metrics()
        libraries = _mapped(p.pid)
        assert not [path for path in libraries if "cryptography" in path], libraries
        resident = rss(p.pid)
        print(f"idle RSS {resident / MB:.1f} MB")
        assert resident < 40 * MB, f"idle RSS {resident / MB:.1f} MB"
    finally:
        p.stop()
