"""The watchdog's question to our own DNS server: does the hot path answer?

Every watchdog tick sends one tiny query (``id.server`` CH TXT, which the
server answers REFUSED at once from its UDP reader, never forwarding it)
from a socket of its own to the DNS listen address.  The next tick looks
whether the answer came: only then is ``WATCHDOG=1`` sent.  So the ping
says the reactor turns *and* the DNS reader on it reads and answers.
The probes are counted as ``networkd_dns_queries_total{rcode="REFUSED",source="local"}``.
"""

from __future__ import annotations

import random
import struct

from twisted.internet import protocol
from twisted.logger import Logger

log = Logger()

TYPE_TXT, CLASS_CH = 16, 3
QNAME = b"\x02id\x06server\x00"


def probe_query(query_id: int) -> bytes:
    return struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + QNAME + struct.pack("!HH", TYPE_TXT, CLASS_CH)


def probe_target(listen) -> tuple[str, str]:
    """(address to ask, address to bind the probe socket to) for a ListenAddress."""
    host = listen.host
    if host == "0.0.0.0":
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if host.startswith("127."):
        return host, "127.0.0.1"
    return host, "::" if ":" in host else "0.0.0.0"


class DnsProbe(protocol.DatagramProtocol):
    """One UDP socket; ``send()`` asks, ``answered`` says whether the last one was answered."""

    def __init__(self, reactor, listen, rng=random.SystemRandom()):
        self._reactor = reactor
        self._target, self._bind = probe_target(listen)
        self._port_number = listen.port
        self._rng = rng
        self._port = None
        self._pending: int | None = None
        self.answered = False
        self.sent = 0
        self.answers = 0

    def open(self) -> None:
        if self._port is None:
            self._port = self._reactor.listenUDP(0, self, interface=self._bind)

    def close(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            port.stopListening()

    def send(self) -> None:
        """Ask once more; ``answered`` is False until this question's answer comes."""
        self.open()
        self._pending = self._rng.randrange(1, 65536)
        self.answered = False
        self.sent += 1
        try:
            self.transport.write(probe_query(self._pending), (self._target, self._port_number))
        except OSError as e:
            log.debug("watchdog DNS probe not sent: {error}", error=e)

    def datagramReceived(self, data: bytes, addr) -> None:
        if addr[1] != self._port_number or len(data) < 12 or self._pending is None:
            return
        if struct.unpack("!H", data[:2])[0] == self._pending and data[2] & 0x80:
            self._pending = None
            self.answered = True
            self.answers += 1
