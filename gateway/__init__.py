"""
proxygate: a Twisted forward proxy gateway.

The public API is small: L{loadConfig} reads an INI file into a frozen configuration, and
L{makeService} turns one into an C{IService} to run under twistd or inside any Twisted
application. The twistd plugin (``twistd proxygate``) is a thin wrapper over both.
"""

from ._version import __version__
from .config import Config, ConfigError, loadConfig
from .service import GatewayService, makeService

__all__ = ["Config", "ConfigError", "GatewayService", "__version__", "loadConfig", "makeService"]
