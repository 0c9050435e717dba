"""Upstream health: smoothed RTT and consecutive misses per server.

The RTT sets a server's head start before the next one is tried (its
stagger); a server that keeps missing is asked last for a while, then gets
one more chance at first place.
"""

from __future__ import annotations

from twisted.logger import Logger

from networkd.dns.upstreams import format_server

log = Logger()

DEFAULT_STAGGER = 0.2
MIN_STAGGER = 0.03
MAX_STAGGER = 0.4
DOWN_AFTER = 3  # consecutive unanswered attempts before a server goes last
RETRY_DOWN_AFTER = 30.0  # seconds after which a server that went last gets first place again


class ServerHealth:
    """Smoothed RTT and consecutive misses per server."""

    def __init__(self, clock):
        self.clock = clock
        self.srtt: dict = {}
        self.misses: dict = {}
        self.down_since: dict = {}

    def answered(self, server, rtt: float) -> None:
        old = self.srtt.get(server)
        self.srtt[server] = rtt if old is None else 0.7 * old + 0.3 * rtt
        self.misses[server] = 0
        if self.down_since.pop(server, None) is not None:
            log.info("DNS upstream {server} answers again", server=format_server(server))

    def missed(self, server) -> None:
        self.misses[server] = self.misses.get(server, 0) + 1
        if self.misses[server] >= DOWN_AFTER and server not in self.down_since:
            self.down_since[server] = self.clock.seconds()
            log.warn("DNS upstream {server} does not answer; asking it last for now",
                     server=format_server(server))

    def is_down(self, server) -> bool:
        since = self.down_since.get(server)
        if since is None:
            return False
        if self.clock.seconds() - since > RETRY_DOWN_AFTER:
            self.down_since[server] = self.clock.seconds()  # give it one more chance now
            self.misses[server] = DOWN_AFTER - 1
            return False
        return True

    def stagger(self, server) -> float:
        srtt = self.srtt.get(server)
        if srtt is None:
            return DEFAULT_STAGGER
        return min(MAX_STAGGER, max(MIN_STAGGER, 4 * srtt))

    def order(self, servers) -> list:
        """File order, but servers that keep missing go last."""
        down = [s for s in servers if self.is_down(s)]
        return [s for s in servers if s not in down] + down
