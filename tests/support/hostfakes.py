"""Recording stand-ins for the host side of the VIP manager: netlink, ARP, iptables.

Each appends what it was asked to do to a shared journal, so a test can
check the order of host and etcd changes without touching the machine.
"""

from __future__ import annotations

from twisted.internet import defer

from networkd.vips import firewall as fw
from networkd.vips.rtnl import Address


class FakeNetlink:
    mac = b"\x02\x00\x00\x00\x00\x01"
    last_exchange = last_span = 0.0  # exchanges take no time here
    sees_others_adds = False  # no events here: the read-back finds what others add

    def __init__(self, journal):
        self.journal = journal
        self.present = {}
        self.on_address_removed = self.on_link_up = self.on_events_lost = self.on_address_added = None

    def start(self):
        return defer.succeed(None)

    def stop(self):
        return defer.succeed(None)

    def addresses(self):
        """What is "on the interface"; with no clock of its own, every lifetime reads as ending now."""
        return [Address(ip, 32, 1, 0, 0, 0) for ip in self.present]

    def apply(self, removals, puts):
        results = {}
        for ip in removals:
            self.journal.append(("unaddr", ip))
            results[ip] = 0 if self.present.pop(ip, None) is not None else 99  # EADDRNOTAVAIL
        for ip, lifetime in puts:
            self.journal.append(("addr", ip, lifetime) if ip not in self.present else ("renew", ip, lifetime))
            self.present[ip] = lifetime
            results[ip] = 0
        return results


class FakeArp:
    def __init__(self, journal):
        self.journal = journal

    def announce(self, ip):
        self.journal.append(("arp", ip))

    def announce_round(self, ips, window):
        self.journal.append(("arp round", sorted(ips)))

    def cancel(self, ip):
        pass

    def cancel_all(self):
        pass


class FakeBackend:
    name = "fake"

    def __init__(self, journal):
        self.journal = journal
        self.rules = []

    def read(self):
        return fw.ChainState(list(self.rules), [], [], 0)

    def write(self, rules, jumps):
        self.rules = list(rules)
        self.journal.append(("iptables", len(rules)))
