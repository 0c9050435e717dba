"""``--notify-script``: run a program on every VIP transition on this node (issue 11, item 4).

The contract (README, "Floating VIPs"): the script is run as ``SCRIPT EVENT
VIP REASON`` with the same in ``NETWORKD_EVENT``, ``NETWORKD_VIP``,
``NETWORKD_REASON`` (and ``NETWORKD_HOSTNAME``); events are ``acquired``
(the address is on our interface and announced), ``released`` (it left:
released, lock lost, removed by someone, stopping), ``fenced`` (it left
because etcd stopped acknowledging our lease), ``unhealthy`` and ``healthy``
(our probe verdict for a VIP whose container is here changed).

One run at a time per VIP, in order; each is killed after ``timeout``; its
exit status and output are logged.  Runs are spawned from the reactor after
the change is done: a slow or failing script never delays a VIP change.
"""

from __future__ import annotations

import os
from collections import deque

from twisted.internet import protocol
from twisted.logger import Logger

from networkd.vips.history import VipHistory

log = Logger()

NOTIFY_TIMEOUT = 10.0  # seconds a run may take before it is killed
MAX_QUEUED = 64  # events waiting per VIP behind a slow run; the oldest waiting one goes beyond that
MAX_OUTPUT = 2048  # bytes of a run's output kept for the log


class _Run(protocol.ProcessProtocol):
    def __init__(self, notifier, ip: str, event: str):
        self._notifier, self.ip, self.event = notifier, ip, event
        self.output = b""
        self.timer = None
        self.done = False

    def outReceived(self, data: bytes):
        if len(self.output) < MAX_OUTPUT:
            self.output += data[: MAX_OUTPUT - len(self.output)]

    errReceived = outReceived

    def processEnded(self, reason):
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self._notifier._ended(self, getattr(reason.value, "exitCode", None), getattr(reason.value, "signal", None))


class Notifier:
    def __init__(self, reactor, path: str, hostname: str, timeout: float = NOTIFY_TIMEOUT):
        self._reactor, self.path, self.hostname, self.timeout = reactor, path, hostname, timeout
        self._queues: dict[str, deque] = {}
        self._running: dict[str, _Run] = {}
        self.runs = self.failures = self.dropped = 0

    def __call__(self, event: str, ip: str, reason: str) -> None:
        """Queue ``event`` for ``ip``; the run starts from the reactor, never inside the caller."""
        queue = self._queues.setdefault(ip, deque())
        if len(queue) >= MAX_QUEUED:
            old = queue.popleft()
            self.dropped += 1
            log.warn("notify script: VIP {ip} has {n} events waiting; dropped {old}", ip=ip, n=len(queue), old=old[0])
        queue.append((event, reason))
        if ip not in self._running:
            self._running[ip] = None  # reserved: the next run starts from the reactor
            self._reactor.callLater(0, self._next, ip)

    def _next(self, ip: str) -> None:
        queue = self._queues.get(ip)
        if not queue:
            self._queues.pop(ip, None)
            self._running.pop(ip, None)
            return
        event, reason = queue.popleft()
        run = self._running[ip] = _Run(self, ip, event)
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "NETWORKD_EVENT": event,
               "NETWORKD_VIP": ip, "NETWORKD_REASON": reason, "NETWORKD_HOSTNAME": self.hostname}
        try:
            process = self._reactor.spawnProcess(run, self.path, [self.path, event, ip, reason], env=env)
        except Exception as e:
            self.failures += 1
            log.warn("notify script {path} {event} {ip}: could not start: {e}", path=self.path, event=event, ip=ip, e=e)
            self._reactor.callLater(0, self._next, ip)
            return
        self.runs += 1
        run.timer = self._reactor.callLater(self.timeout, self._kill, run, process)

    def _kill(self, run: _Run, process) -> None:
        """Time is up: kill it and go on (a child it left holding our pipes does not hold the queue)."""
        try:
            process.signalProcess("KILL")
            process.loseConnection()
        except Exception:  # it ended meanwhile
            pass
        self._ended(run, None, f"KILL after {self.timeout:g}s")

    def _ended(self, run: _Run, code, signal) -> None:
        if run.done:
            return
        run.done = True
        output = run.output.decode(errors="replace").strip()
        if code == 0:
            log.info("notify script {event} {ip}: exit 0{out}", event=run.event, ip=run.ip,
                     out=f"; output: {output}" if output else "")
        else:
            self.failures += 1
            status = f"killed by signal {signal}" if signal else f"exit {code}"
            log.warn("notify script {event} {ip}: {status}{out}", event=run.event, ip=run.ip, status=status,
                     out=f"; output: {output}" if output else "")
        if self._running.get(run.ip) is run:
            self._next(run.ip)


class Transitions:
    """Turns what happens to our VIPs into events (the VIP manager's host and health report here): kept
    in the history (networkd.vips.history) and, with ``--notify-script``, handed to the script."""

    def __init__(self, manager, notifier: Notifier | None):
        self._manager, self._notifier = manager, notifier
        self.history = VipHistory(manager._clock)
        self.up: set[str] = set()  # VIPs we reported acquired
        manager.host.on_change = self.address
        manager.health.on_verdict = self.verdict
        manager.inputs.on_change = self._snapshot

    def _snapshot(self) -> None:
        """Holders as the configs and lock snapshots say (both needed: before the lock snapshot
        came, every VIP would look unheld)."""
        inputs = self._manager.inputs
        if inputs.seen["configs"] and inputs.seen["locks"]:
            self.history.observe(inputs.floating_ips(), inputs.holders)

    def _notify(self, event: str, ip: str, reason: str) -> None:
        self.history.record(event, ip, reason)
        if self._notifier is not None:
            self._notifier(event, ip, reason)

    def address(self, ip: str, added: bool) -> None:
        manager = self._manager
        if added:
            if ip not in self.up:
                self.up.add(ip)
                lease = manager._session.lease
                self._notify("acquired", ip, f"lock held on lease {lease:x}" if lease is not None else "lock held")
            return
        if ip not in self.up:
            return
        self.up.discard(ip)
        record = manager.locks.records.get(ip)
        if manager.stopping:
            self._notify("released", ip, "networkd is stopping")
        elif manager.fenced():
            self._notify("fenced", ip, "etcd has not acknowledged our lease in time")
        elif record is not None and record.releasing:
            self._notify("released", ip, record.reason or "released")
        elif record is None:
            self._notify("released", ip, "lock lost")
        else:
            self._notify("released", ip, "address removed from the interface or expired")

    def verdict(self, ip: str, healthy: bool, why: str | None) -> None:
        self._notify("healthy" if healthy else "unhealthy", ip, "probes answer" if healthy else why or "probe down")
