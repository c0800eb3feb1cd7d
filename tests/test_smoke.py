"""The shortest end-to-end proof: curl fetches through proxygate under twistd."""

import subprocess

from tests.support import payloadDigest


def test_curlFetchesThroughProxy(proxy, origin):
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-x", proxy.url, origin.url("/bytes/100000")],
        capture_output=True,
        check=True,
    ).stdout
    import hashlib

    assert hashlib.sha256(out).hexdigest() == payloadDigest(100000)
