"""Recording stand-ins for the host side of the VIP manager: netlink, ARP, iptables.

Each appends what it was asked to do to a shared journal, so a test can
check the order of host and etcd changes without touching the machine.
"""

from __future__ import annotations

from twisted.internet import defer

from networkd.vips import firewall as fw


class FakeNetlink:
    mac = b"\x02\x00\x00\x00\x00\x01"

    def __init__(self, journal):
        self.journal = journal
        self.present = {}
        self.on_address_removed = self.on_link_up = None

    def start(self):
        return defer.succeed(None)

    def stop(self):
        return defer.succeed(None)

    def addresses(self):
        return defer.succeed(set(self.present))

    def put(self, ip, lifetime, then=None):
        self.journal.append(("addr", ip, lifetime) if ip not in self.present else ("renew", ip, lifetime))
        self.present[ip] = lifetime
        if then:
            then()
        return defer.succeed(None)

    def remove(self, ip):
        self.journal.append(("unaddr", ip))
        return defer.succeed(self.present.pop(ip, None) is not None)


class FakeArp:
    def __init__(self, journal):
        self.journal = journal

    def announce(self, ip):
        self.journal.append(("arp", ip))

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
