"""Command-line options: parsing, validation and the Go daemon's flag aliases.

Everything is checked here, before any service starts, so that a bad value
is one clear line and exit status 2 instead of a half-started daemon.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from dataclasses import dataclass
from urllib.parse import urlsplit

from twisted.python import usage

from networkd import __version__

# Go flag name -> our option name.  The Go daemon spelled them with dots.
GO_ALIASES = {
    "etcd.endpoint": "etcd",
    "godns.addr": "dns-listen",
    "api.addr": "api-listen",
    "net.interface": "interface",
    "net.address": "node-ip",
}

FIREWALL_BACKENDS = ("auto", "legacy", "nft")
LOG_FORMATS = ("text", "json")
KEEPALIVE_TRANSPORTS = ("gateway", "grpc")


@dataclass(frozen=True)
class Endpoint:
    """One etcd endpoint as gRPC wants it."""

    host: str
    port: int
    secure: bool

    def __str__(self) -> str:
        scheme = "https" if self.secure else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_port(text: str, what: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise usage.UsageError(f"{what}: port {text!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise usage.UsageError(f"{what}: port {port} is out of range 1-65535")
    return port


def parse_listen(text: str, what: str) -> ListenAddress:
    """Parse ``IP:PORT`` or ``[IPv6]:PORT``; a bare ``:PORT`` means 127.0.0.1."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise usage.UsageError(f"{what}: {text!r} is not [IPv6]:PORT")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise usage.UsageError(f"{what}: {text!r} is not IP:PORT")
    host = host or "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise usage.UsageError(f"{what}: {host!r} in {text!r} is not an IP address") from None
    return ListenAddress(str(ip), parse_port(port, what))


def parse_endpoints(text: str) -> tuple[Endpoint, ...]:
    """Parse a comma-separated list of ``[http[s]://]host:port`` endpoints."""
    endpoints = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if "://" not in item:
            item = "http://" + item
        parts = urlsplit(item)
        if parts.scheme not in ("http", "https"):
            raise usage.UsageError(f"--etcd: {item!r}: scheme must be http or https")
        if not parts.hostname:
            raise usage.UsageError(f"--etcd: {item!r} has no host")
        try:
            port = parts.port or 2379
        except ValueError:
            raise usage.UsageError(f"--etcd: {item!r} has a bad port") from None
        if parts.path not in ("", "/"):
            raise usage.UsageError(f"--etcd: {item!r}: endpoints take no path")
        endpoints.append(Endpoint(parts.hostname, port, parts.scheme == "https"))
    if not endpoints:
        raise usage.UsageError("--etcd: no endpoint given")
    return tuple(endpoints)


def parse_cidrs(text: str, what: str) -> tuple:
    nets = []
    for item in (part.strip() for part in text.split(",")):
        if item:
            try:
                nets.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise usage.UsageError(f"{what}: {item!r} is not a CIDR") from None
    return tuple(nets)


def readable_file(path: str, what: str) -> str:
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise usage.UsageError(f"{what}: cannot read {path!r}: {e.strerror}") from None
    return path


def first_ipv4_of(interface: str) -> str | None:
    """The primary IPv4 address of ``interface``, or None.

    SIOCGIFADDR returns the interface's primary address, never a secondary
    /32 such as a VIP this node holds (the Go daemon could pick one).
    """
    import fcntl
    import struct

    SIOCGIFADDR = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            result = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", interface.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(result[20:24])


# The etcd options: the daemon's, and those of `networkd check` (networkd/tools/).
PEER_PORT = 3010

ETCD_PARAMETERS = [
    ["etcd", None, "http://127.0.0.1:2379", "Comma-separated etcd v3 endpoints (http:// or https://)."],
    ["etcd-root", None, "/lain", "Root of the LAIN keys in etcd."],
    ["etcd-ca", None, None, "CA certificate (PEM) to verify etcd's TLS certificate."],
    ["etcd-cert", None, None, "Client certificate (PEM) for etcd TLS."],
    ["etcd-key", None, None, "Client private key (PEM) for etcd TLS."],
    ["etcd-user", None, None, "etcd user name (needs --etcd-password)."],
    ["etcd-password", None, None, "etcd password (needs --etcd-user)."],
]


def validate_etcd(opts) -> None:
    """Check and normalise the ETCD_PARAMETERS of ``opts`` (sets ``etcd-endpoints``)."""
    opts["etcd-endpoints"] = parse_endpoints(opts["etcd"])
    root = "/" + opts["etcd-root"].strip("/")
    if root == "/":
        raise usage.UsageError("--etcd-root: must not be empty")
    opts["etcd-root"] = root
    for name in ("etcd-ca", "etcd-cert", "etcd-key"):
        if opts[name]:
            readable_file(opts[name], f"--{name}")
    if bool(opts["etcd-cert"]) != bool(opts["etcd-key"]):
        raise usage.UsageError("--etcd-cert and --etcd-key go together")
    if bool(opts["etcd-user"]) != bool(opts["etcd-password"]):
        raise usage.UsageError("--etcd-user and --etcd-password go together")


class Options(usage.Options):
    """networkd options (``twistd -n networkd --help``)."""

    synopsis = "[options]"
    longdesc = (
        "networkd floats VIPs between nodes with etcd locks, serves DNS for "
        "the node, guards resolv.conf and answers an HTTP API.  Go flag names "
        "(--etcd.endpoint, --godns.addr, --api.addr, --net.interface, "
        "--net.address) are accepted as aliases."
    )

    optFlags = [
        ["no-vips", None, "Do not manage floating VIPs."],
        ["no-dns", None, "Do not run the DNS server."],
        ["no-resolv-conf", None, "Do not touch the resolv.conf file."],
        ["keep-resolv-conf", None, "On stop, leave our nameserver line in resolv.conf."],
        ["deployd", None, "Leader task: publish deployd.lain from deployd's leader key."],
        ["swarm", None, "Leader task: publish swarm.lain from swarm's leader key."],
        ["tinydns", None, "Leader task: forward the lain zone (and --domain) to the registered tinydns workers."],
        ["webrouter", None, "Leader task: publish tinydns records (tinydns_fqdns) of the apps and the webrouter."],
        ["verbose", "v", "Log at debug level."],
    ]

    optParameters = [
        *ETCD_PARAMETERS,
        ["hostname", None, None, "This node's name in etcd (default: the system host name)."],
        ["interface", None, "eth0", "Interface that carries VIPs; its first IPv4 is the default node IP."],
        ["node-ip", None, None, "This node's IP (default: first IPv4 of --interface)."],
        ["dns-listen", None, "127.0.0.1:53", "DNS listen address, UDP and TCP."],
        ["api-listen", None, "127.0.0.1:3000", "HTTP API listen address."],
        ["resolv-conf", None, "/etc/resolv.conf", "The resolv.conf file to guard and read upstreams from."],
        ["systemd-resolv-conf", None, "/run/systemd/resolve/resolv.conf",
         "Upstream list used when --resolv-conf is systemd-resolved's stub."],
        ["hosts-file", None, "/etc/hosts", "Hosts file served as local DNS data."],
        ["lock-ttl", None, "3", "VIP lock lease TTL in seconds (>= 2)."],
        ["dns-ttl", None, "60", "TTL of local DNS answers, seconds."],
        ["dns-cache-size", None, "10000", "Entries in the DNS cache."],
        ["dns-allow", None, "", "Comma-separated CIDRs allowed to query besides loopback."],
        ["dns-forward-reverse", None, (), "A CIDR whose reverse names go to the upstreams instead of being "
         "answered here (RFC 6303 private reverse zones); repeatable."],
        ["dns-forward-max", None, "150", "Questions in flight to upstreams at once; past it, SERVFAIL at once "
         "(what a flood of uncached names may hold)."],
        ["dns-stale-max", None, "86400", "Seconds past its TTL an upstream answer may still be served (stale, "
         "TTL 30) while no upstream answers; 0: never (RFC 8767)."],
        ["domain", None, None, "The cluster's own domain, forwarded to tinydns besides lain (with --tinydns)."],
        ["log-format", None, "text", "Log lines as text, or json (one JSON object per line, to standard output)."],
        ["etcd-keepalives", None, "gateway",
         "How lease keep-alives reach etcd: gateway (etcd's JSON gateway, one HTTP/1.1 connection; grpc where "
         "there is none, or with TLS or a user) or grpc (one grpc stream)."],
        ["firewall-backend", None, "auto", "iptables back end: auto, legacy (python-iptables) or nft (iptables-restore)."],
        ["vip-probe", None, "on", "Probe each VIP's local container (TCP connect or its health object): on or off."],
        ["vip-probe-interval", None, "1", "Seconds between two probes of one target."],
        ["vip-probe-timeout", None, "1", "Seconds a probe may take before it counts as failed."],
        ["vip-probe-rise", None, "2", "Successful probes in a row that make a target healthy."],
        ["vip-probe-fall", None, "3", "Failed probes in a row that make a target unhealthy."],
        ["notify-script", None, None, "Executable run on every VIP transition here: EVENT VIP REASON."],
        ["garp-interval", None, "60", "Seconds between gratuitous ARP re-announcements of held VIPs (0: off)."],
        ["peer-secret-file", None, None, "Shared secret (a non-empty file, the same on every node) signing the "
         "peer channel; turns the failsafe on (VIPs kept through an etcd outage while every peer promises)."],
        ["peer-listen", None, None, f"UDP address of the peer channel (default: the node IP, port {PEER_PORT})."],
    ] + [[alias, None, None, f"Alias of --{name} (Go flag name)."] for alias, name in GO_ALIASES.items()]

    def opt_dns_forward_reverse(self, cidr):
        """A CIDR whose reverse names go to the upstreams instead of being answered here (RFC 6303 zones); repeatable."""
        self["dns-forward-reverse"] = tuple(self["dns-forward-reverse"]) + parse_cidrs(cidr, "--dns-forward-reverse")

    def opt_version(self):
        """Print the version and exit."""
        print(f"networkd {__version__}")
        print(f"Python {sys.version.split()[0]}")
        sys.exit(0)

    def postOptions(self):
        for alias, name in GO_ALIASES.items():
            if self[alias] is not None:
                self[name] = self[alias]

        validate_etcd(self)

        self["hostname"] = self["hostname"] or socket.gethostname()
        self["dns-listen"] = parse_listen(self["dns-listen"], "--dns-listen")
        self["api-listen"] = parse_listen(self["api-listen"], "--api-listen")
        self["lock-ttl"] = self._integer("lock-ttl", 2, 3600)
        self["dns-ttl"] = self._integer("dns-ttl", 0, 86400)
        self["dns-cache-size"] = self._integer("dns-cache-size", 0, 10_000_000)
        self["dns-stale-max"] = self._integer("dns-stale-max", 0, 30 * 86400)
        self["dns-forward-max"] = self._integer("dns-forward-max", 1, 100_000)
        self["dns-allow"] = parse_cidrs(self["dns-allow"], "--dns-allow")
        for name, choices in (("log-format", LOG_FORMATS), ("etcd-keepalives", KEEPALIVE_TRANSPORTS),
                              ("firewall-backend", FIREWALL_BACKENDS)):
            if self[name] not in choices:
                raise usage.UsageError(f"--{name}: {self[name]!r} is not one of {', '.join(choices)}")
        if len(self["interface"]) > 15 or not self["interface"] or "/" in self["interface"]:
            raise usage.UsageError(f"--interface: {self['interface']!r} is not an interface name")
        self["node-ip"] = self._node_ip()
        if self["domain"] is not None:
            self["domain"] = self._domain(self["domain"])
        self["leader-tasks"] = tuple(t for t in ("deployd", "swarm", "tinydns", "webrouter") if self[t])
        self._vip_probe_options()
        self._peer_options()

    def _peer_options(self) -> None:
        """--peer-secret-file (read now: a missing or empty file is a usage error) and --peer-listen."""
        from networkd.peers.wire import read_secret

        self["peer-secret"] = None
        if self["peer-secret-file"] is not None:
            try:
                self["peer-secret"] = read_secret(self["peer-secret-file"])
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
        listen = self["peer-listen"] or (f"{self['node-ip']}:{PEER_PORT}" if self["node-ip"] else None)
        self["peer-listen"] = None if listen is None else parse_listen(listen, "--peer-listen")

    def _vip_probe_options(self) -> None:
        """--vip-probe on|off, its interval and timeout (seconds, fractions allowed), rise and fall."""
        if self["vip-probe"] not in ("on", "off"):
            raise usage.UsageError(f"--vip-probe: {self['vip-probe']!r} is not on or off")
        for name in ("vip-probe-interval", "vip-probe-timeout"):
            try:
                value = float(self[name])
            except (TypeError, ValueError):
                raise usage.UsageError(f"--{name}: {self[name]!r} is not a number of seconds") from None
            if not 0.05 <= value <= 3600:
                raise usage.UsageError(f"--{name}: {value} is out of range 0.05-3600")
            self[name] = value
        self["vip-probe-rise"] = self._integer("vip-probe-rise", 1, 100)
        self["vip-probe-fall"] = self._integer("vip-probe-fall", 1, 100)
        self["garp-interval"] = self._integer("garp-interval", 0, 86400)
        script = self["notify-script"]
        if script is not None and not (os.path.isfile(script) and os.access(script, os.X_OK)):
            raise usage.UsageError(f"--notify-script: {script!r} is not an executable file")

    def _domain(self, text: str) -> str:
        from networkd.dns.names import BadName, check_name

        try:
            return check_name(text.strip().rstrip("."))
        except BadName as e:
            raise usage.UsageError(f"--domain: {text!r} is not a domain name: {e}") from None

    def _integer(self, name: str, low: int, high: int) -> int:
        try:
            value = int(self[name])
        except (TypeError, ValueError):
            raise usage.UsageError(f"--{name}: {self[name]!r} is not a whole number") from None
        if not low <= value <= high:
            raise usage.UsageError(f"--{name}: {value} is out of range {low}-{high}")
        return value

    def _node_ip(self) -> str | None:
        if self["node-ip"]:
            try:
                return str(ipaddress.IPv4Address(self["node-ip"]))
            except ValueError:
                raise usage.UsageError(f"--node-ip: {self['node-ip']!r} is not an IPv4 address") from None
        found = first_ipv4_of(self["interface"])
        if found is None and not (self["no-vips"] and self["no-dns"]):
            raise usage.UsageError(
                f"--node-ip: interface {self['interface']!r} has no IPv4 address; pass --node-ip"
            )
        return found


class CommandLineOptions(Options):
    """Options as the command line sees them: a usage error is one line and exit 2."""

    def parseOptions(self, options=None):
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            sys.stderr.write(f"networkd: error: {e}\n")
            sys.stderr.flush()
            sys.exit(2)
