"""
Daemon hygiene: twistd without -n forks, and its launching process must report a start-up
that failed (port in use, an unusable CA, a bad configuration) at once, non-zero, with the
reason on stderr and no pidfile left; a good start leaves a pidfile that goes away at the
stop. Also: twistd proxygate --version, and one version everywhere.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import os
import signal
import socket
import subprocess
import time

import pytest

import gateway
from tests.support import REPO, TWISTD, freePort, waitFor, waitForPort


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def daemonize(tmp_path, ini: str) -> tuple[subprocess.CompletedProcess, float]:
    config = tmp_path / "p.ini"
    config.write_text(ini)
    started = time.monotonic()
    out = subprocess.run(
        [
            *TWISTD,
            "--pidfile",
            str(tmp_path / "pg.pid"),
            "--logfile",
            str(tmp_path / "pg.log"),
            "proxygate",
            "--config",
            str(config),
        ],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        timeout=60,
    )
    return out, time.monotonic() - started


def test_busyPortExitsQuicklyWithTheReasonAndNoPidfile(tmp_path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        out, elapsed = daemonize(
            tmp_path, f"[proxy]\nlisten = tcp:{port}:interface=127.0.0.1\n[metrics]\nlisten =\n"
        )
    stderr = out.stderr.decode()
    assert out.returncode != 0, stderr
    assert elapsed < 10, elapsed
    assert "Address already in use" in stderr and f"tcp:{port}" in stderr, stderr
    assert not (tmp_path / "pg.pid").exists()
    assert f"cannot listen on 'tcp:{port}:interface=127.0.0.1'" in (tmp_path / "pg.log").read_text()


@pytest.mark.parametrize(
    ("ini", "fragment"),
    [
        ("[proxy]\nconect_timeout = 3\n", "conect_timeout"),
        ("[mitm]\nenabled = on\nca_cert = ca.pem\nca_key = ca.key\n", "[mitm]"),
    ],
    ids=["bad-config", "unusable-ca"],
)
def test_badConfigurationOrCAExitsBeforeDaemonizing(tmp_path, ini: str, fragment: str) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    (tmp_path / "ca.key").mkdir()  # a key that cannot be read
    out, elapsed = daemonize(tmp_path, ini + "[metrics]\nlisten =\n")
    stderr = out.stderr.decode()
    assert out.returncode == 1 and elapsed < 10, stderr
    assert fragment in stderr and "Traceback" not in stderr, stderr
    assert not (tmp_path / "pg.pid").exists()


def test_goodStartLeavesAPidfileUntilStopped(tmp_path, origin) -> None:
    port = freePort()
    out, elapsed = daemonize(
        tmp_path,
        f"[proxy]\nlisten = tcp:{port}:interface=127.0.0.1\n"
        "deny_destinations = 169.254.0.0/16\n[metrics]\nlisten =\n",
    )
    assert out.returncode == 0 and elapsed < 10, out.stderr
    pid = int((tmp_path / "pg.pid").read_text())
    try:
        waitForPort("127.0.0.1", port)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(f"GET {origin.url('/')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert s.recv(12) == b"HTTP/1.1 200"
    finally:
        os.kill(pid, signal.SIGTERM)
    assert waitFor(lambda: not (tmp_path / "pg.pid").exists(), 15)
    assert "proxygate draining" in (tmp_path / "pg.log").read_text()


def test_versionOption() -> None:
    out = subprocess.run(
        [*TWISTD, "proxygate", "--version"], env=env(), capture_output=True, timeout=30
    )
    assert out.returncode == 0
    assert out.stdout.decode().strip() == f"proxygate {gateway.__version__}"


def test_oneVersionEverywhere() -> None:
    """setup.cfg reads the version from gateway/_version.py; the installed package agrees."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    assert cfg["metadata"]["version"] == "attr: gateway._version.__version__"
    assert importlib.metadata.version("proxygate") == gateway.__version__
    from gateway.metrics import Metrics

    registry = Metrics().registry
    assert registry.get_sample_value("proxygate_build_info", {"version": gateway.__version__}) == 1
