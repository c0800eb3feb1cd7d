"""
Destinations that are this host (issue 19, item 13):

- the ``self`` keyword of ``deny_destinations`` covers every address of the host's own
  interfaces, read at start-up from /proc/net (parsers tested on kernel text), not only
  loopback: end to end in a network namespace the test creates (``unshare -n``) with a veth
  address, so the result does not depend on this machine's interfaces;
- IPv4-compatible IPv6 addresses (``[::127.0.0.1]``) are checked as the IPv4 inside.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from gateway.config import ConfigError, parseConfig
from gateway.interfaces import ALWAYS, localNetworks, parseFibTrie, parseIfInet6
from gateway.policy import DestinationPolicy, parseHostPatterns
from tests.support import PYTHON, REPO

FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 192.0.2.0/24 2 0 2
        +-- 192.0.2.0/30 2 0 2
           |-- 192.0.2.0
              /24 link UNICAST
           |-- 192.0.2.2
              /32 host LOCAL
           |-- 192.0.2.9
              /32 host LOCAL
        |-- 192.0.2.255
           /32 link BROADCAST
Local:
  +-- 0.0.0.0/0 3 0 5
           |-- 192.0.2.2
              /32 host LOCAL
"""

IF_INET6 = """\
fd000000000000000000000000000002 04 40 00 82     eth0
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
00000000000000000000000000000001 01 80 10 80       lo
"""


def test_parseFibTrie():
    assert parseFibTrie(FIB_TRIE) == {
        ipaddress.IPv4Network("127.0.0.0/8"),
        ipaddress.IPv4Network("127.0.0.1/32"),
        ipaddress.IPv4Network("192.0.2.2/32"),
        ipaddress.IPv4Network("192.0.2.9/32"),  # a secondary address
    }


def test_parseIfInet6():
    assert parseIfInet6(IF_INET6) == {
        ipaddress.IPv6Network("fd00::2/128"),
        ipaddress.IPv6Network("fe80::fc:ff:fe00:1/128"),
        ipaddress.IPv6Network("::1/128"),
    }


def test_localNetworksFromAProcFolder(tmp_path):
    (tmp_path / "fib_trie").write_text(FIB_TRIE)
    (tmp_path / "if_inet6").write_text(IF_INET6)
    networks = localNetworks(str(tmp_path))
    assert set(ALWAYS) <= set(networks)
    assert ipaddress.IPv4Network("192.0.2.9/32") in networks
    assert ipaddress.IPv6Network("fd00::2/128") in networks


def _policy(deny: str, local=()) -> DestinationPolicy:
    policy = DestinationPolicy((), parseHostPatterns(deny.split()))
    return policy.withLocalNetworks([ipaddress.ip_network(n) for n in local])


@pytest.mark.parametrize(
    ("ip", "allowed"),
    [
        ("192.0.2.9", False),
        ("fd00::2", False),
        ("127.0.0.5", False),
        ("::1", False),
        ("0.0.0.0", False),
        ("::ffff:192.0.2.9", False),
        ("::192.0.2.9", False),  # IPv4-compatible
        ("192.0.2.10", True),
        ("fd00::3", True),
        ("93.184.216.34", True),
    ],
)
def test_selfCoversTheInterfaceAddresses(ip, allowed):
    policy = _policy("self", ["192.0.2.9/32", "fd00::2/128"])
    assert policy.usesSelf()
    decision = policy.checkName(ip, 80)
    assert decision.allowed is allowed, decision
    if not allowed:
        assert "deny_destinations (self)" in decision.detail or "unspecified" in decision.detail


def test_selfMatchesNoName():
    policy = _policy("self", ["192.0.2.9/32"])
    assert policy.checkName("self", 80).allowed
    assert policy.checkAddress("example.com", "93.184.216.34", 80).allowed
    assert not policy.checkAddress("example.com", "192.0.2.9", 80).allowed


def test_selfOnlyInDenyDestinations():
    parseConfig("[proxy]\ndeny_destinations = self 169.254.0.0/16\n")
    for key in ("[proxy]\nallow_destinations", "[mitm]\nintercept", "[mitm]\npassthrough"):
        with pytest.raises(ConfigError, match="keyword of deny_destinations only"):
            parseConfig(f"{key} = self\n")


@pytest.mark.parametrize(
    ("ip", "allowed"),
    [
        ("::127.0.0.1", False),
        ("::7f00:1", False),
        ("::169.254.169.254", False),
        ("::0.0.0.1", False),  # 0.0.0.0/8
        ("::1", False),
        ("::", False),
        ("::8.8.8.8", True),
    ],
)
def test_ipv4CompatibleCheckedAsTheIPv4Inside(ip, allowed):
    policy = _policy("127.0.0.0/8 ::1/128 169.254.0.0/16 fe80::/10 0.0.0.0/8")
    assert policy.checkName(ip, 80).allowed is allowed


def test_ipv4CompatibleSelfListener():
    policy = DestinationPolicy((), ()).withSelfAddresses([("127.0.0.1", 3128)])
    assert not policy.checkName("::127.0.0.1", 3128).allowed
    assert policy.checkName("::127.0.0.1", 3129).allowed


def test_ipv4CompatibleEndToEnd(startProxy, origin):
    proxy = startProxy("[proxy]\ndeny_destinations = 127.0.0.0/8 ::1/128\n")
    status = subprocess.run(
        [
            "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10",
            "-x", proxy.url, f"http://[::127.0.0.1]:{origin.port}/bytes/5",
        ],
        capture_output=True, text=True, timeout=20,
    ).stdout  # fmt: skip
    assert status == "403"


def _canUnshare() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10)
    return probe.returncode == 0


@pytest.mark.skipif(not _canUnshare(), reason="needs unshare -n (root) and iproute2")
def test_selfInANetworkNamespace():
    script = Path(__file__).parent / "support" / "netns_self.py"
    result = subprocess.run(
        ["unshare", "-n", PYTHON, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert "10.213.7.1/32" in seen["networks"] and "fd19:19::1/128" in seen["networks"]
    for key in ("v4", "v6", "loopback"):
        status, body = seen["self"][key]
        assert status == 403, (key, status, body)
    assert "deny_destinations (self)" in seen["self"]["v4"][1]
    # Without the keyword the same addresses are reachable: the 403 was `self`'s doing.
    for key in ("v4", "v6", "loopback"):
        assert seen["open"][key][0] == 200, (key, seen["open"][key])
    assert "Traceback" not in seen["self"]["log"]
