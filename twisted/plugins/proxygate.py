"""
The twistd drop-in: ``twistd -n proxygate [--config proxygate.ini]``.

Options become a configuration, the configuration becomes the service; nothing else lives
here. A bad configuration ends start-up with one line on stderr and exit status 1, before
anything listens (and before twistd daemonizes or writes its pidfile). A listener that
cannot open fails later, once twistd has daemonized: the service then raises, so that
twistd reports it to the launching process (which exits 1 with the reason on its stderr)
and removes the pidfile; with -n it ends the process with one line.
"""

from __future__ import annotations

import sys

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    synopsis = "[--config FILE] [--listen ENDPOINT] [--set SECTION.KEY=VALUE ...]"
    longdesc = (
        "Run the proxygate forward proxy. Without --config it runs on its built-in defaults: "
        "a loopback proxy on 127.0.0.1:3128 with metrics on 127.0.0.1:9530."
    )
    optParameters = [
        ["config", "c", None, "INI configuration file (see etc/proxygate.ini)."],
        [
            "listen",
            "l",
            None,
            "Proxy listener endpoint, overriding [proxy] listen "
            "(e.g. tcp:3128:interface=127.0.0.1).",
        ],
        [
            "metrics-listen",
            None,
            None,
            "Metrics listener endpoint, overriding [metrics] listen ('' disables it).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["set"] = []

    def opt_version(self) -> None:
        """Print proxygate's version and exit."""
        from gateway import __version__

        print(f"proxygate {__version__}")
        sys.exit(0)

    def opt_set(self, assignment: str) -> None:
        """Override one INI key, validated like the file's (repeatable): mitm.enabled=on"""
        name, sep, value = assignment.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or not section or not key:
            raise usage.UsageError(f"--set expects SECTION.KEY=VALUE, not {assignment!r}")
        self["set"].append(((section, key.strip()), value.strip()))

    def postOptions(self) -> None:
        from gateway.config import ConfigError, loadConfig

        overrides = dict(self["set"])
        if self["listen"] is not None:
            overrides[("proxy", "listen")] = self["listen"]
        if self["metrics-listen"] is not None:
            overrides[("metrics", "listen")] = self["metrics-listen"]
        try:
            self["loaded"] = loadConfig(self["config"], overrides=overrides)
        except ConfigError as e:
            sys.exit(f"proxygate: {e}")


@implementer(IServiceMaker, IPlugin)
class ProxygateServiceMaker:
    tapname = "proxygate"
    description = "Forward proxy gateway: HTTP, CONNECT, WebSocket, TLS interception, metrics."
    options = Options

    def makeService(self, options):
        from gateway.config import ConfigError
        from gateway.service import GatewayService

        # twistd's own options: a daemon reports a failed start through twistd's status
        # pipe (an exception), a foreground process with one line of its own.
        twistd = getattr(options, "parent", None)
        nodaemon = twistd is None or bool(twistd.get("nodaemon"))
        if options["loaded"].usesTLS():
            # TLS key exchange groups: X25519, P-256, P-384 only. Python's ssl cannot set
            # them on a context, OpenSSL's configuration can, read at process start: this
            # re-executes the process once with OPENSSL_CONF set (gateway/tls/groups.py).
            from gateway.tls.groups import ensureLimited

            ensureLimited()
        try:
            service = GatewayService(
                options["loaded"],
                exitOnListenFailure=nodaemon,
                ownsProcess=True,
                pidfile=None if nodaemon else twistd.get("pidfile"),
            )
        except ConfigError as e:
            sys.exit(f"proxygate: {e}")
        from twisted.internet import reactor

        from gateway.seam import dispatchDirectly

        dispatchDirectly(reactor)
        return service


serviceMaker = ProxygateServiceMaker()
