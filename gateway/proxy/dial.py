"""
Reaching an origin: resolve once, check every address against the destination policy,
connect to an allowed address, and report failures in the proxy's own vocabulary.

The address that is checked is the address that is dialled: the name is resolved here, not
inside the endpoint, so DNS rebinding between a check and a connect has no gap to use.
"""

from __future__ import annotations

import socket
import time
from collections import OrderedDict

from twisted.internet import defer, error
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IResolutionReceiver
from twisted.internet.protocol import Factory
from zope.interface import implementer

from ..exchange.problems import Problem
from ..policy import DestinationPolicy, parseIP

__all__ = [
    "DestinationDenied",
    "DialError",
    "Dialer",
    "UpstreamRefused",
    "problemFor",
]


class DialError(Exception):
    """
    The origin could not be reached. C{reason} is the metric label (dns, refused, timeout,
    tls, reset) and C{status} what the client gets (502, or 504 for a timeout).
    """

    def __init__(self, reason: str, status: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status
        self.message = message


class UpstreamRefused(Exception):
    """The upstream proxy answered our CONNECT with something other than 2xx."""

    def __init__(self, label: str, status: int, reason: str) -> None:
        self.status = status
        # A CONNECT is answered by the proxy itself, so a 401 is its own authentication
        # failure too (tinyproxy 1.11 answers 401 where RFC 9110 says 407).
        self.message = (
            f"The upstream proxy {label} refused the tunnel: {status} {reason}".rstrip()
            + (
                " (its credentials in [upstream] proxy are missing or wrong)."
                if status in (401, 407)
                else "."
            )
        )
        super().__init__(self.message)


#: DialError reasons as problem codes (a connection that ended during an upstream CONNECT
#: is an incomplete answer).
_CODES = {"dns": "dns", "refused": "refused", "timeout": "timeout", "tls": "tls"}


def problemFor(error: Exception) -> Problem:
    """
    What the client is told about a failed dial, and how it is counted: one mapping for the
    forward path and CONNECT alike. An error this module does not know (a bug) is a 502
    "internal" problem, which the caller logs with its traceback.
    """
    if isinstance(error, DestinationDenied):
        if error.reason == "port":
            return Problem(403, "port", f"Destination denied: {error.detail}")
        return Problem(403, "destination_ip", f"Destination denied: {error.detail}")
    if isinstance(error, UpstreamRefused):
        return Problem(502, "upstream_refused", error.message)
    if isinstance(error, DialError):
        return Problem(error.status, _CODES.get(error.reason, "incomplete"), error.message)
    return Problem(502, "internal", "Cannot reach the origin.")


class DestinationDenied(Exception):
    """
    The destination policy refused every address of the target, or (C{reason="port"}) the
    port: the denied_total label.
    """

    def __init__(self, detail: str, reason: str = "destination") -> None:
        super().__init__(detail)
        self.detail = detail
        self.reason = reason


class _OneShot(Factory):
    """Hands out one prepared protocol; quiet, since a proxy opens thousands of these."""

    noisy = False

    def __init__(self, protocol) -> None:
        self.protocol = protocol

    def buildProtocol(self, addr):
        return self.protocol


@implementer(IResolutionReceiver)
class _Collect:
    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.done = defer.Deferred()

    def resolutionBegan(self, resolution) -> None:
        pass

    def addressResolved(self, address) -> None:
        if address.host not in self.addresses:
            self.addresses.append(address.host)

    def resolutionComplete(self) -> None:
        self.done.callback(self.addresses)


class Resolver:
    """
    getaddrinfo through the reactor's resolver, with a short positive cache: origins that
    are not pooled (new connection per request) would otherwise cost a thread hop each.
    """

    def __init__(self, reactor, ttl: float = 30.0, size: int = 4096) -> None:
        self._reactor = reactor
        self._ttl = ttl
        self._size = size
        self._cache: OrderedDict[str, tuple[float, list[str]]] = OrderedDict()

    def resolve(self, host: str) -> defer.Deferred:
        hit = self._cache.get(host)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return defer.succeed(hit[1])
        problem = _unresolvable(host)
        if problem is not None:
            return defer.fail(DialError("dns", 502, f"cannot resolve host {host!r}: {problem}"))
        receiver = _Collect()
        try:
            self._reactor.nameResolver.resolveHostName(receiver, host, 0, transportSemantics="TCP")
        except Exception as e:
            return defer.fail(DialError("dns", 502, f"cannot resolve host {host!r}: {e}"))

        def store(addresses: list[str]) -> list[str]:
            if addresses:
                self._cache[host] = (now + self._ttl, addresses)
                self._cache.move_to_end(host)
                while len(self._cache) > self._size:
                    self._cache.popitem(last=False)
            return addresses

        return receiver.done.addCallback(store)


def _unresolvable(host: str) -> str | None:
    """
    Why getaddrinfo would raise for C{host} instead of failing the look-up, or None.

    Twisted's resolver turns only C{gaierror} into "no addresses": anything else raised in
    its thread (IDNA's UnicodeError for an empty or over-long label) is an unhandled error
    in a Deferred, and the look-up never completes (a 504 after connect_timeout instead of
    a 502 now). The request parser refuses such names already (400); this is the second
    line for every other caller (an upstream proxy's host, an FTP server's).
    """
    if not host or "\x00" in host:
        return "empty name or NUL"
    try:
        # What socket.getaddrinfo does with a str host, the one step that raises.
        host.encode("idna")
    except (UnicodeError, ValueError) as e:
        return str(e) or "not a valid host name"
    return None


def _isLocalAddress(ip: str) -> bool:
    """
    Whether C{ip} is assigned to this host: only a local address can be bound. One
    system call, and no packet is sent.
    """
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((ip, 0))
    except OSError:
        return False
    return True


class Dialer:
    """Connects protocols to origins under a destination policy and a connect timeout."""

    def __init__(self, reactor, policy: DestinationPolicy, connectTimeout: float) -> None:
        self.reactor = reactor
        self.policy = policy
        self.connectTimeout = connectTimeout
        self.resolver = Resolver(reactor)

    def addresses(self, host: str, port: int, checked: bool = True) -> defer.Deferred:
        """
        The addresses of C{host} that the policy lets this proxy dial, in order.

        @param checked: False for the upstream proxy, which is trusted configuration.
        """
        literal = parseIP(host)
        d = defer.succeed([str(literal)]) if literal is not None else self.resolver.resolve(host)

        def check(addresses: list[str]) -> list[str]:
            if not addresses:
                raise DialError("dns", 502, f"cannot resolve host {host!r}")
            if not checked:
                return addresses
            allowed = []
            detail = ""
            wildcardSelf = (None, port) in self.policy.selfAddresses
            for ip in addresses:
                decision = self.policy.checkAddress(host, ip, port)
                if decision.allowed and wildcardSelf and _isLocalAddress(ip):
                    # A listener on all interfaces is this proxy on every local address,
                    # not only on loopback (the policy cannot know them: it does no I/O).
                    detail = f"destination {host} ({ip}) port {port} is this proxy itself"
                elif decision.allowed:
                    allowed.append(ip)
                else:
                    detail = decision.detail
            if not allowed:
                raise DestinationDenied(detail)
            return allowed

        return d.addCallback(check)

    @defer.inlineCallbacks
    def connect(self, host: str, port: int, protocol, wrap=None, checked: bool = True):
        """
        Connect C{protocol} to C{host}:C{port}.

        @param wrap: optional function of a TCP endpoint returning the endpoint to use (TLS).
        @return: Deferred firing with the dialled IP once the protocol is connected.
        @raise DialError, DestinationDenied: through the Deferred.
        """
        deadline = self.reactor.seconds() + self.connectTimeout
        try:
            # A look-up that never completes (a resolver error Twisted does not map, a stuck
            # DNS server) must not hold the request: it shares the connect deadline.
            addresses = yield self.addresses(host, port, checked).addTimeout(
                self.connectTimeout, self.reactor
            )
        except (DialError, DestinationDenied):
            raise
        except defer.TimeoutError:
            raise DialError("timeout", 504, f"resolving {host!r} took too long")
        except Exception:
            raise DialError("dns", 502, f"cannot resolve host {host!r}")
        lastError: DialError | None = None
        for ip in addresses:
            remaining = deadline - self.reactor.seconds()
            if remaining <= 0:
                break
            endpointType = TCP6ClientEndpoint if ":" in ip else TCP4ClientEndpoint
            endpoint = endpointType(self.reactor, ip, port, timeout=remaining)
            if wrap is not None:
                endpoint = wrap(endpoint)
            try:
                yield endpoint.connect(_OneShot(protocol))
            except error.ConnectionRefusedError:
                lastError = DialError("refused", 502, f"connection to {host}:{port} refused")
            except (error.TimeoutError, error.UserError):
                lastError = DialError("timeout", 504, f"{host}:{port} did not answer in time")
            except (error.ConnectError, OSError) as e:
                lastError = DialError("refused", 502, f"cannot connect to {host}:{port}: {e}")
            else:
                return ip
        if lastError is None:
            lastError = DialError("timeout", 504, f"{host}:{port} did not answer in time")
        raise lastError
