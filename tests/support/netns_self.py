"""
Run inside a network namespace of its own (``unshare -n python tests/support/netns_self.py``) by
tests/test_selfaddresses.py: this machine's interfaces play no part.

It gives the namespace a veth pair with 10.213.7.1/24 and fd19:19::1/64 on one end (not
loopback), serves an HTTP origin on those addresses, and asks proxygate (under twistd,
as users run it) for them through its loopback listener: once with ``deny_destinations
= self`` and once without. It prints one JSON object with what it saw.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from tempfile import TemporaryDirectory

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))  # the repository

from gateway.interfaces import localNetworks
from tests.support import ProxyProcess

V4, V6 = "10.213.7.1", "fd19:19::1"


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=10)


def network() -> None:
    sh("ip", "link", "set", "lo", "up")
    sh("ip", "link", "add", "pg-veth0", "type", "veth", "peer", "name", "pg-veth1")
    sh("ip", "addr", "add", f"{V4}/24", "dev", "pg-veth0")
    sh("ip", "addr", "add", f"{V6}/64", "dev", "pg-veth0", "nodad")
    sh("ip", "link", "set", "pg-veth0", "up")
    sh("ip", "link", "set", "pg-veth1", "up")


class Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello from the veth address\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class V6Server(ThreadingHTTPServer):
    import socket

    address_family = socket.AF_INET6


def serve(server: ThreadingHTTPServer) -> int:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


def fetch(proxy: ProxyProcess, url: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy.url}))
    try:
        with opener.open(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.request.HTTPError as e:
        return e.code, e.read().decode()


def main() -> None:
    network()
    port4 = serve(ThreadingHTTPServer((V4, 0), Hello))
    port6 = serve(V6Server((V6, 0), Hello))
    portLo = serve(ThreadingHTTPServer(("127.0.0.1", 0), Hello))
    urls = {
        "v4": f"http://{V4}:{port4}/",
        "v6": f"http://[{V6}]:{port6}/",
        "loopback": f"http://127.0.0.1:{portLo}/",
    }
    seen: dict = {"networks": [str(n) for n in localNetworks()]}
    with TemporaryDirectory() as folder:
        for name, deny in (("self", "self 169.254.0.0/16"), ("open", "169.254.0.0/16")):
            proxy = ProxyProcess(Path(folder), f"[proxy]\ndeny_destinations = {deny}\n").start()
            try:
                seen[name] = {key: fetch(proxy, url) for key, url in urls.items()}
                seen[name]["log"] = proxy.log()
            finally:
                proxy.stop()
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
