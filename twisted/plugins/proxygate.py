"""
The twistd drop-in: ``twistd -n proxygate [--config proxygate.ini]``.

Options become a configuration, the configuration becomes the service; nothing else lives
here. A bad configuration ends start-up with one line on stderr and exit status 1, before
anything listens.
"""

from __future__ import annotations

import sys

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    synopsis = "[--config FILE] [--listen ENDPOINT]"
    longdesc = (
        "Run the proxygate forward proxy. Without --config it runs on its built-in defaults: "
        "a loopback proxy on 127.0.0.1:3128 with metrics on 127.0.0.1:9530."
    )
    optParameters = [
        ["config", "c", None, "INI configuration file (see etc/proxygate.ini)."],
        ["listen", "l", None,
         "Proxy listener endpoint, overriding [proxy] listen (e.g. tcp:3128:interface=127.0.0.1)."],
        ["metrics-listen", None, None,
         "Metrics listener endpoint, overriding [metrics] listen ('' disables it)."],
    ]

    def postOptions(self) -> None:
        import attrs

        from gateway.config import ConfigError, loadConfig

        try:
            config = loadConfig(self["config"])
            if self["listen"] is not None:
                config = attrs.evolve(
                    config, proxy=attrs.evolve(config.proxy, listen=tuple(self["listen"].split()))
                )
            if self["metrics-listen"] is not None:
                config = attrs.evolve(
                    config,
                    metrics=attrs.evolve(config.metrics, listen=tuple(self["metrics-listen"].split())),
                )
        except ConfigError as e:
            sys.exit(f"proxygate: {e}")
        self["loaded"] = config


@implementer(IServiceMaker, IPlugin)
class ProxygateServiceMaker:
    tapname = "proxygate"
    description = "Forward proxy gateway: HTTP, CONNECT, WebSocket, TLS interception, metrics."
    options = Options

    def makeService(self, options):
        from gateway.config import ConfigError
        from gateway.service import GatewayService

        try:
            return GatewayService(options["loaded"], exitOnListenFailure=True)
        except ConfigError as e:
            sys.exit(f"proxygate: {e}")


serviceMaker = ProxygateServiceMaker()
