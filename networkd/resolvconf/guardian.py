"""The resolv.conf guardian: our nameserver first, no ``rotate``, upstreams fed to DNS.

The file is only touched once the DNS server listens (BUG 30), is written
atomically (BUG 37), watched through its directory so replace-by-rename and
delete/recreate are seen, and given back on a clean stop (BUG 2).  The
address written is the one DNS really listens on (BUG 38).  The other
nameservers, in file order and never ourselves, are the forwarder's
upstreams.

Level-triggered: every change (and a periodic re-check) asks for a look,
which reads the file and computes what it should be; our own writes read
back as already right, so they cause no further write.  Looks run through
a SerialJob: one at a time, a burst of events folded into one, a failed
look retried with backoff.  Another writer is never overwritten with what
we made of an older text: the file is replaced only if it still reads as
the look saw it, and an empty file (truncated by a writer rewriting it in
place) waits as a missing one does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from inotify_simple import flags
from twisted.application import service
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from networkd.backoff import Backoff, every
from networkd.dirwatch import DirectoryWatcher
from networkd.options import ListenAddress
from networkd.resolvconf.filestate import FileState, look_at, replace_if_unchanged, restore_file
from networkd.resolvconf.ratelimit import RewriteLimit
from networkd.resolvconf.text import DNS_PORT, describe_writer, resolv_conf_address, rewrite, upstreams
from networkd.serial import SerialJob

log = Logger()


@dataclass
class GuardianStatus:
    path: str
    state: str = "starting"
    address: str | None = None
    writes: int = 0
    undone: int = 0
    last_writer: str | None = None
    last_error: str | None = None
    upstreams: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {
            "path": self.path, "state": self.state, "address": self.address, "writes": self.writes,
            "undone": self.undone, "last_writer": self.last_writer, "last_error": self.last_error,
            "upstreams": list(self.upstreams),
        }


def _in_thread(reactor):
    def run(f, *args):
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)
    return run


class ResolvConfGuardian(service.Service):
    """Keeps resolv.conf pointing at our DNS and the forwarder's upstreams in sync with it.

    ``read_only``: only feed the upstreams (``--no-resolv-conf``).
    ``burst``/``window``: at most ``burst`` rewrites per ``window`` seconds; a
    writer that keeps undoing us is named in the log instead of fought.
    """

    name = "resolv.conf guardian"

    def __init__(
        self,
        path: str,
        dns,
        dns_listen: ListenAddress,
        reactor,
        *,
        systemd_path: str = "/run/systemd/resolve/resolv.conf",
        keep_on_stop: bool = False,
        keep_reason: str = "--keep-resolv-conf",
        read_only: bool = False,
        node_ip: str | None = None,
        settle: float = 0.01,
        missing_grace: float = 0.3,
        burst: int = 5,
        window: float = 10.0,
        recheck: float = 30.0,
        max_writer_wait: float = 2.0,
        run_blocking: Callable | None = None,
    ):
        self.path = os.path.abspath(path)
        self._dns = dns
        self._listen = dns_listen
        self._reactor = reactor
        self._systemd_path = systemd_path
        self._keep_on_stop = keep_on_stop
        self._keep_reason = keep_reason  # why the line stays on stop: the option, or socket activation
        self._read_only = read_only
        self._node_ip = node_ip
        self._settle = settle
        self._missing_grace = missing_grace
        self._limit = RewriteLimit(reactor, burst, window)
        self._run_blocking = run_blocking or _in_thread(reactor)
        self.address = resolv_conf_address(dns_listen)
        self.status = GuardianStatus(self.path, address=self.address)
        self._watcher = DirectoryWatcher(reactor, self._on_change)
        self._recheck_interval = recheck
        self._recheck = None
        self._looks: SerialJob | None = None  # made at start: a stopped SerialJob stays stopped
        self._writing = False  # True once DNS listens (and we may write)
        self._wrote = False  # we changed the file at least once
        self._good = False  # the file was as it should be at the last look
        self._missing_since: float | None = None
        self._stub_logged = False
        self._fed: list[tuple[str, int]] | None = None
        self._being_written: dict[tuple[str, str], float] = {}
        self._max_writer_wait = max_writer_wait

    # -- lifecycle -------------------------------------------------------------

    def startService(self):
        super().startService()
        self._looks = SerialJob(self._reactor, self._check, f"checking {self.path}",
                                backoff=Backoff(1.0, self._recheck_interval), failed=self._failed)
        self._watcher.start()
        self._recheck = every(self._reactor, self._recheck_interval, self._kick, "resolv.conf re-check")
        self._prime()
        self._kick()
        if self._read_only:
            self.status.state = "read-only (--no-resolv-conf): feeding upstreams only"
        elif self._listen.port != DNS_PORT:
            self.status.state = f"not rewriting: DNS listens on port {self._listen.port}, resolv.conf can only name port 53"
            log.warn("resolv.conf: DNS listens on {listen}; resolv.conf cannot name a port other than 53, "
                     "so {path} is left as it is (upstreams are still read from it)",
                     listen=self._listen, path=self.path)
        else:
            self.status.state = "waiting for the DNS server to listen"
            # Not cancelled on stop: the Deferred may be shared; the callbacks check self.running.
            self._dns.when_listening().addCallbacks(self._dns_listening, self._dns_failed)

    def _prime(self) -> None:
        """Read the file once at start, on the spot (a small local file): the DNS server knows its upstreams
        before it reads its first query, instead of answering the first forwarded ones with "no upstream"
        until the first look in a thread comes back.  A failure here is left to that look."""
        try:
            self._feed(look_at(self.path, self._systemd_path))
        except Exception as e:
            log.debug("resolv.conf: first read of {path} failed ({e}); retried in the background", path=self.path,
                      e=e)

    def _dns_listening(self, _):
        if not self.running:
            return
        self._writing = True
        self.status.state = "guarding"
        log.info("resolv.conf: DNS listens on {listen}; guarding {path}", listen=self._listen, path=self.path)
        self._kick()

    def _dns_failed(self, failure):
        if not self.running or failure.check(defer.CancelledError):
            return
        self.status.state = "not rewriting: the DNS server is not listening"
        self.status.last_error = failure.getErrorMessage()
        log.error("resolv.conf: the DNS server did not start ({e}); {path} is not pointed at it",
                  e=failure.getErrorMessage(), path=self.path)

    def stopService(self):
        super().stopService()
        if self._recheck is not None and self._recheck.running:
            self._recheck.stop()
        self._watcher.stop()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._looks is not None:
            await self._looks.stop()  # the look under way ends first; none after it
        self._writing = False
        if not self._wrote:
            return
        if self._keep_on_stop:
            log.info("resolv.conf: leaving nameserver {ip} in {path} ({why})",
                     ip=self.address, path=self.path, why=self._keep_reason)
            return
        try:
            how = await self._run_blocking(restore_file, self.path, self.address)
        except Exception as e:
            log.error("resolv.conf: could not remove nameserver {ip} from {path}: {e}",
                      ip=self.address, path=self.path, e=e)
            return
        if how:
            log.info("resolv.conf: removed nameserver {ip} from {path} ({how}); the node resolves without us",
                     ip=self.address, path=self.path, how=how)

    # -- scheduling --------------------------------------------------------------

    def _on_change(self, directory: str, name: str, mask: int) -> None:
        if mask & flags.CREATE and name and not os.path.islink(os.path.join(directory, name)):
            # A new regular file is still being written: replacing it now would
            # lose the rest of its writer's output.  Its CLOSE_WRITE follows.
            self._being_written[(directory, name)] = self._reactor.seconds()
            return
        self._being_written.pop((directory, name), None)
        self._kick()

    def _writer_busy(self) -> float:
        """Seconds to wait for a writer that created the file and has not closed it yet."""
        now = self._reactor.seconds()
        for key, since in list(self._being_written.items()):
            if now - since >= self._max_writer_wait:
                del self._being_written[key]  # it may have been opened read-only after all
        if not self._being_written:
            return 0.0
        return max(0.01, min(since + self._max_writer_wait for since in self._being_written.values()) - now)

    def _kick(self, delay: float | None = None) -> None:
        """Look at the file soon (after ``settle``: bursts of events become one look)."""
        if self.running:
            self._looks.later(self._settle if delay is None else delay)

    def _failed(self, error: BaseException) -> None:
        self.status.last_error = str(error) or type(error).__name__
        log.failure("resolv.conf: checking {path} failed", Failure(error), path=self.path)

    # -- one look ----------------------------------------------------------------

    async def _check(self) -> None:
        busy = self._writer_busy()
        if busy:
            self._kick(busy)
            return
        state: FileState = await self._run_blocking(look_at, self.path, self._systemd_path)
        if not self.running:
            return
        problems = self._watcher.watch(state.watch_list(self._systemd_path))
        for problem in problems:
            log.debug("resolv.conf: {problem}", problem=problem)
        self._feed(state)
        if not self._writing:
            return
        if not state.text:
            # Missing, or empty: a writer that rewrites it in place truncates it first, and a file we
            # replaced now would take the place of the one it is still writing (its text lost).
            now = self._reactor.seconds()
            if self._missing_since is None:
                self._missing_since = now
                if state.text is None:
                    log.info("resolv.conf: {path} is missing; recreating it unless someone else does",
                             path=self.path)
                self._kick(self._missing_grace)
                return
            if now - self._missing_since < self._missing_grace:
                self._kick(self._missing_grace - (now - self._missing_since))
                return
        self._missing_since = None
        text = state.text
        if text is None:
            # Recreate it with the upstreams it had, so the node (and our
            # forwarder) keep resolving, and a restore on stop leaves a working file.
            text = "".join(f"nameserver {ip}\n" for ip, _ in (self._fed or []))
        desired = rewrite(text, self.address)
        if state.text == desired:
            self._good = True
            return
        if self._good:
            self.status.undone += 1
            self.status.last_writer = describe_writer(state.text, state.uid)
            log.info("resolv.conf: {path} was changed by someone else ({who}); putting nameserver {ip} back",
                     path=self.path, who=self.status.last_writer, ip=self.address)
        self._good = False
        wait = self._rate_limit_wait()
        if wait > 0:
            self._kick(wait)
            return
        how = await self._run_blocking(replace_if_unchanged, self.path, state.text, desired.encode())
        if how is None:  # written by someone else since our look: look again rather than undo it
            log.debug("resolv.conf: {path} changed while we looked at it; looking again", path=self.path)
            self._kick()
            return
        self._limit.record()
        self.status.writes += 1
        self.status.last_error = None
        self._wrote = True
        self._good = True
        if self.status.writes == 1:
            log.info("resolv.conf: nameserver {ip} is now first in {path} ({how})",
                     ip=self.address, path=self.path, how=how)

    def _rate_limit_wait(self) -> float:
        wait = self._limit.wait()
        if wait > 0 and self._limit.warn_now():
            log.warn("resolv.conf: another writer keeps undoing our nameserver line in {path} "
                     "({n} rewrites in {w:.0f}s; last: {who}); next rewrite in {wait:.1f}s. "
                     "Configure that tool to keep nameserver {ip} first, or run with --no-resolv-conf",
                     path=self.path, n=self._limit.recent, w=self._limit.window,
                     who=self.status.last_writer, wait=wait, ip=self.address)
        return wait

    def _feed(self, state: FileState) -> None:
        """Hand the forwarder the other nameservers (kept as they were while the file is missing).

        The DNS server logs the list it takes; no second log line here."""
        if state.stub and not self._stub_logged:
            self._stub_logged = True
            log.info("resolv.conf: {path} is systemd-resolved's stub ({real}); upstreams come from {sd}",
                     path=self.path, real=state.realpath, sd=self._systemd_path)
        if state.upstream_text is None:
            return
        servers = upstreams(state.upstream_text, self._listen, self._node_ip)
        if servers == self._fed:
            return
        self._fed = servers
        self.status.upstreams = tuple(f"{ip}:{port}" for ip, port in servers)
        try:
            self._dns.set_upstreams(list(servers))
        except Exception:
            log.failure("resolv.conf: the DNS server refused the upstream list")
