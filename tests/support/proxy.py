"""
proxygate under test, started the way users start it: C{twistd -n proxygate --config FILE}
in a subprocess, stopped by PID.

Its listeners are C{tcp:0} (or C{ssl:0}): the kernel picks free ports, and the ports are read
back from the lines proxygate logs once it listens ("proxygate listening on HOST:PORT",
"proxygate metrics on http://HOST:PORT/PATH"), so no port is guessed before start.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
PYTHON = sys.executable
TWISTD = [
    PYTHON,
    "-c",
    "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
]
#: twistd as in an install from the README (C{pip install .}), which has no pyOpenSSL: the
#: test venv has it (test origins use Twisted's TLS), so it is hidden from imports here.
TWISTD_WITHOUT_PYOPENSSL = [
    PYTHON,
    "-c",
    "import sys; sys.modules['OpenSSL'] = None; from twisted.scripts.twistd import run; "
    "sys.argv[0] = 'twistd'; run()",
]

#: INI used by most end-to-end tests: loopback origins must be reachable.
LOOPBACK_INI = """
[proxy]
deny_destinations = 169.254.0.0/16 fe80::/10
connect_ports = 1-65535
"""

#: What proxygate logs for each listener it opened (gateway/service.py), in this order;
#: up to the end of the line, so that a line being written is not read as a shorter port.
_LISTENING = re.compile(r"\] proxygate listening on (\S+):(\d+)\r?\n")
_METRICS = re.compile(r"\] proxygate metrics on http://(\S+):(\d+)/")
_GATEWAY = re.compile(r"\] proxygate gateway listening on (\S+):(\d+) ")

_names = itertools.count(1)


def sslListen(files, port: int = 0) -> str:
    """An ssl: listener on 127.0.0.1 with C{files}' key and certificate (a L{TLSFiles})."""
    return f"ssl:{port}:interface=127.0.0.1:privateKey={files.key}:certKey={files.cert}"


def waitForListeners(
    log: Callable[[], str],
    proc: subprocess.Popen,
    proxies: int = 1,
    metrics: bool = True,
    timeout: float = 15.0,
) -> tuple[list[tuple[str, int]], list[int]]:
    """
    The (host, port) of the first C{proxies} proxy listeners and the ports of the metrics
    listeners, from the start-up lines of a proxygate's log (C{log()} reads it so far).
    proxygate logs them once every listener is open, proxy listeners first, so when the
    last one expected is there the proxy accepts on all of them (with workers too: the
    master binds and serves). Fails when C{proc} exits or C{timeout} passes first.
    """
    deadline = time.monotonic() + timeout
    while True:
        text = log()
        found = [(h, int(p)) for h, p in _LISTENING.findall(text)]
        metricsPorts = [int(p) for _, p in _METRICS.findall(text)]
        if len(found) >= proxies and (metricsPorts or not metrics):
            return found[:proxies], metricsPorts
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"not listening after {timeout} s")
        time.sleep(0.02)


def bracketed(host: str) -> str:
    """C{host} as in a URL's authority: an IPv6 literal in brackets."""
    return f"[{host}]" if ":" in host else host


def rss(pid: int) -> int:
    """Resident set size of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def stopProcess(proc: subprocess.Popen, timeout: float = 15.0) -> int:
    """Stop a process this test run started, by its PID: SIGTERM, then SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    return proc.returncode


class ProxyProcess:
    """
    proxygate under twistd, configured by an INI text, listening on C{listen} (by default
    C{tcp:0} on 127.0.0.1; C{ssl:0} with C{sslFiles}' key and certificate when given: an
    HTTPS proxy). Once started, C{ports} holds every proxy listener's (host, port) in the
    order configured, C{host} and C{port} the first one's, C{metricsPort} the metrics
    listener's.
    """

    def __init__(
        self,
        workdir: Path,
        ini: str,
        *,
        metrics: bool = True,
        listen: str | None = None,
        sslFiles=None,
        twistd: list[str] = TWISTD,
    ):
        self.workdir = workdir
        self.twistd = twistd
        self.hasMetrics = metrics
        if listen is None:
            listen = sslListen(sslFiles) if sslFiles is not None else "tcp:0:interface=127.0.0.1"
        #: How many proxy listeners to expect in the log.
        self.listenerCount = len(listen.split())
        text = ini
        if "[proxy]" in text:
            text = text.replace("[proxy]", f"[proxy]\nlisten = {listen}", 1)
        else:
            text = f"[proxy]\nlisten = {listen}\n" + text
        metricsLine = "tcp:0:interface=127.0.0.1" if metrics else ""
        if "[metrics]" in text:
            text = text.replace("[metrics]", f"[metrics]\nlisten = {metricsLine}", 1)
        else:
            text += f"\n[metrics]\nlisten = {metricsLine}\n"
        name = f"proxygate-{os.getpid()}-{next(_names)}"
        self.configPath = workdir / f"{name}.ini"
        self.configPath.write_text(text)
        self.logPath = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.ports: list[tuple[str, int]] = []
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.metricsPort: int | None = None
        self.gatewayPorts: list[int] = []

    @property
    def url(self) -> str:
        return f"http://{bracketed(self.host)}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout: float = 15.0) -> ProxyProcess:
        """Start twistd and wait (at most C{timeout}) until every listener is open."""
        self._log = open(self.logPath, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*self.twistd, "-n", "--pidfile=", "proxygate", "--config", str(self.configPath)],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        try:
            self._readPorts(timeout)
        except Exception as e:
            self.stop()
            raise RuntimeError(f"proxygate did not start ({e}):\n{self.log()}") from None
        return self

    def _readPorts(self, timeout: float) -> None:
        proxies, metrics = waitForListeners(
            self.log, self.proc, self.listenerCount, self.hasMetrics, timeout
        )
        self.ports = proxies
        self.host, self.port = proxies[0]
        self.metricsPort = metrics[0] if metrics else None
        # [reverse] listeners are logged between the proxy's and the metrics listener's.
        self.gatewayPorts = [int(port) for _, port in _GATEWAY.findall(self.log())]

    def log(self) -> str:
        try:
            return self.logPath.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def accessLines(self) -> list[str]:
        self.settle()
        return [line for line in self.log().splitlines() if "[proxygate.access" in line]

    def settle(self) -> None:
        """
        Wait until the proxy is done with what it was doing: a response leaves before its
        access-log line is written (in the same reactor turn), so a client can read the
        log a moment too early. A metrics scrape is served by the same reactor after that
        turn; without a metrics listener, a short sleep.
        """
        if self.metricsPort is None or self.proc is None or self.proc.poll() is not None:
            time.sleep(0.05)
            return
        try:
            self.metrics()
        except OSError:
            time.sleep(0.05)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metricsPort}/metrics", timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str, **labels) -> float:
        """The value of one sample (0.0 when absent)."""
        for line in self.metrics().splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            sample, _, value = line.rpartition(" ")
            if "{" in sample:
                metricName, _, rest = sample.partition("{")
                got = dict(
                    part.split("=", 1) for part in rest.rstrip("}").split(",") if "=" in part
                )
                got = {k: v.strip('"') for k, v in got.items()}
            else:
                metricName, got = sample, {}
            if metricName == name and all(got.get(k) == str(v) for k, v in labels.items()):
                return float(value)
        return 0.0

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        stopProcess(self.proc)
        self._log.close()
        return self.proc.returncode
