"""Tells systemd (``Type=notify``) how networkd is doing: READY, STATUS, STOPPING, WATCHDOG.

* ``READY=1`` once DNS listens and every watched etcd prefix has its first
  snapshot, or has failed to get one (etcd unreachable: the node serves
  what it has, and says so in ``STATUS=``); at the latest after
  ``ready_timeout`` seconds.
* ``STATUS=`` a line with what it does: DNS, etcd, VIPs, leader; sent when it changes
  (looked at every ``status_every`` seconds once ready: no fast poll at rest).
* ``STOPPING=1`` when the stop begins (this service is the last built, so
  the first stopped).
* ``WATCHDOG=1`` from a reactor timer, every quarter of ``WatchdogSec=``,
  and only if the DNS self-probe sent on the previous tick was answered
  (``probe``): a blocked reactor or a wedged DNS reader sends nothing and
  systemd restarts the daemon.
"""

from __future__ import annotations

from twisted.application import service
from twisted.logger import Logger

from networkd.backoff import every
from networkd.systemd.notify import Notifier
from networkd.systemd.probe import DnsProbe

log = Logger()


class SystemdNotify(service.Service):
    name = "systemd notify"

    def __init__(self, notifier: Notifier, reactor, *, watchers, dns=None, dns_listen=None, vips=None,
                 session=None, leader=None, ready_timeout: float = 20.0, poll: float = 0.05,
                 status_every: float = 5.0, probe: DnsProbe | None = None):
        self.notifier = notifier
        self.reactor = reactor
        self.watchers = watchers  # prefix -> PrefixWatcher (live mapping)
        self.dns = dns
        self.vips = vips
        self.session = session
        self.leader = leader
        self.ready_timeout = ready_timeout
        self.poll = poll
        self.status_every = status_every
        self.probe = probe
        if probe is None and dns is not None and notifier.watchdog:
            self.probe = DnsProbe(reactor, dns_listen)
        self.ready = False
        self.pings = 0
        self.last_status: str | None = None
        self._started_at = None
        self._loops: list = []
        self._readiness = None

    # -- lifecycle -------------------------------------------------------------

    def startService(self):
        super().startService()
        self._started_at = self.reactor.seconds()
        self._say_status("starting: waiting for DNS and the first etcd snapshots")
        self._readiness = every(self.reactor, self.poll, self._check_ready, "systemd readiness")
        self._loops.append(self._readiness)
        if self.notifier.watchdog:
            period = self.notifier.watchdog / 4
            log.info("systemd watchdog: {sec:g}s, pinging every {period:g}s while DNS answers",
                     sec=self.notifier.watchdog, period=period)
            self._loops.append(every(self.reactor, period, self._watchdog_tick, "systemd watchdog"))
            self._watchdog_tick()

    def stopService(self):
        super().stopService()
        self.notifier.send(STOPPING=1, STATUS="stopping: releasing VIPs, restoring resolv.conf")
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        if self.probe is not None:
            self.probe.close()

    # -- readiness and status --------------------------------------------------

    def _check_ready(self) -> None:
        if self.ready:
            return
        waited = self.reactor.seconds() - self._started_at
        if self.dns is not None and not self.dns.listening():
            return
        pending = [p for p, w in self.watchers.items() if w.snapshot is None and w.status.lost_at is None]
        if pending and waited < self.ready_timeout:
            return
        self.ready = True
        line = self.status_line()
        self.notifier.send(READY=1, STATUS=line)
        self.last_status = line
        log.info("ready after {t:.2f}s: {line}", t=waited, line=line)
        # The fast poll only serves start-up: from now on one wake-up per status_every
        # (a changed STATUS= shows within status_every, as before), not 1/poll a second.
        self._readiness.stop()
        self._loops.append(every(self.reactor, self.status_every, self._refresh_status, "systemd status"))

    def _refresh_status(self) -> None:
        self._say_status(self.status_line())

    def _say_status(self, line: str) -> None:
        if line != self.last_status:
            self.last_status = line
            self.notifier.send(STATUS=line)

    def status_line(self) -> str:
        parts = []
        if self.dns is not None:
            parts.append(f"DNS on {self.dns.listen}" if self.dns.listening() else "DNS not listening")
        parts.append(self._etcd_words())
        if self.vips is not None:
            parts.append(f"{self.vips.held_count()} VIPs held")
        if self.leader is not None:
            status = self.leader.status()
            parts.append("leader" if status.get("is_leader") else f"leader: {status.get('holder') or 'none'}")
        return "; ".join(parts)

    def _etcd_words(self) -> str:
        now = self.reactor.seconds()
        if not self.watchers:
            return "etcd not watched"
        down = [w.status for w in self.watchers.values() if not w.status.connected]
        if not down:
            lease = ""
            if self.session is not None and self.session.ack_age() is not None:
                lease = f", lease keep-alive {self.session.ack_age():.1f}s ago"
            return f"etcd connected{lease}"
        never = [s for s in down if s.synced_at is None]
        since = min((s.lost_at for s in down if s.lost_at is not None), default=None)
        age = f" for {now - since:.0f}s" if since is not None else ""
        error = next((s.last_error for s in down if s.last_error), "not connected yet")
        what = "no snapshot yet" if never else "serving the last snapshot"
        return f"etcd unreachable{age} ({error}): {what}"

    # -- watchdog --------------------------------------------------------------

    def _watchdog_tick(self) -> None:
        """Runs on the reactor: a blocked reactor never gets here, so never pings."""
        if self.probe is not None and self.probe.sent == 0:
            self.probe.send()  # the first question: the next tick looks for its answer
            return
        healthy = self.probe is None or self.probe.answered
        if healthy and self.notifier.send(WATCHDOG=1):
            self.pings += 1
        elif not healthy:
            log.warn("systemd watchdog: DNS did not answer its probe within {period:g}s; no ping",
                     period=self.notifier.watchdog / 4)
        if self.probe is not None:
            self.probe.send()
