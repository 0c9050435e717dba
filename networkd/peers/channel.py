"""The peer channel: signed UDP datagrams between networkd daemons (networkd.peers.wire), and peer addresses.

``handler(message, address)`` gets every verified message; what it returns
(a ``(kind, fields)`` pair, or None) is signed and sent back to the source.
Refusals are logged at most once per source and reason per ``LOG_EVERY``
seconds, naming the source address and why, and counted.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import protocol
from twisted.logger import Logger

from networkd.peers.wire import Refused, Wire
from networkd.vips.planner import member_field

log = Logger()

LOG_EVERY = 10.0  # seconds between two log lines for the same source and reason


class PeerChannel(protocol.DatagramProtocol):
    def __init__(self, wire: Wire, reactor, handler: Callable[[dict, tuple], tuple | None]):
        self.wire, self._reactor, self._handler = wire, reactor, handler
        self.refused = 0  # messages refused (unsigned, bad MAC, stale, replayed, malformed)
        self.received = 0
        self._logged: dict[tuple[str, str], float] = {}
        self._port = None

    def listen(self, host: str, port: int):
        self._port = self._reactor.listenUDP(port, self, interface=host)
        return self._port

    @property
    def address(self) -> str | None:
        if self._port is None:
            return None
        host = self._port.getHost()
        return f"{host.host}:{host.port}"

    def close(self):
        port, self._port = self._port, None
        return port.stopListening() if port is not None else None

    def send(self, address: tuple[str, int], kind: str, **fields) -> str:
        """Sign and send one message; returns its nonce (replies name it in ``re``)."""
        data, nonce = self.wire.encode(kind, **fields)
        if self.transport is not None:
            try:
                self.transport.write(data, address)
            except OSError as e:  # unreachable network, full buffer: as if lost
                log.debug("peer message to {a} not sent: {e}", a=address, e=e)
        return nonce

    def datagramReceived(self, data: bytes, address) -> None:
        try:
            message = self.wire.decode(data)
        except Refused as e:
            self.refuse(address, str(e))
            return
        self.received += 1
        try:
            reply = self._handler(message, address)
        except Refused as e:
            self.refuse(address, str(e))
            return
        except Exception:
            log.failure("peer message from {a} failed", a=f"{address[0]}:{address[1]}")
            return
        if reply is not None:
            kind, fields = reply
            self.send(address, kind, **fields)

    def refuse(self, address, why: str) -> None:
        self.refused += 1
        source = f"{address[0]}:{address[1]}"
        now = self._reactor.seconds()
        key = (address[0], why.split(" ")[0])
        if now - self._logged.get(key, -1e9) >= LOG_EVERY:
            self._logged[key] = now
            if len(self._logged) > 1024:
                self._logged = {k: t for k, t in self._logged.items() if now - t < LOG_EVERY}
            log.warn("peer message from {source} refused: {why}", source=source, why=why)


def member_peer(value: str) -> tuple[str, int] | None:
    """The peer address a members value publishes (``"peer": "ip:port"``); None: an older daemon's value."""
    peer = member_field(value, "peer")
    if not isinstance(peer, str):
        return None
    try:
        host, _, port = peer.rpartition(":")
        return (host.strip("[]"), int(port)) if host else None
    except (ValueError, AttributeError, TypeError):
        return None
