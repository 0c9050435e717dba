"""The resolv.conf guardian: our nameserver first, no ``rotate``, upstreams fed to DNS.

The file is only touched once the DNS server listens (BUG 30), is written
atomically (BUG 37), watched through its directory so replace-by-rename and
delete/recreate are seen, and given back on a clean stop (BUG 2).  The
address written is the one DNS really listens on (BUG 38).  The other
nameservers, in file order and never ourselves, are the forwarder's
upstreams.

Level-triggered: every change (and a periodic re-check) reads the file and
computes what it should be; our own writes read back as already right, so
they cause no further write.
"""

from __future__ import annotations

import collections
import ipaddress
import os
import pwd
from dataclasses import dataclass
from typing import Callable

from inotify_simple import flags
from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.logger import Logger

from networkd.atomicfile import replace_file
from networkd.dirwatch import DirectoryWatcher
from networkd.options import ListenAddress

log = Logger()

DNS_PORT = 53
STUB_NAME = "stub-resolv.conf"  # systemd-resolved's file that points at 127.0.0.53


# -- the text ------------------------------------------------------------------


def _words(line: str) -> list[str]:
    """Keyword and arguments of a resolv.conf line; [] for comments and blanks."""
    stripped = line.strip()
    if not stripped or stripped[0] in "#;":
        return []
    return stripped.split()


def _same_ip(text: str, ip: str) -> bool:
    try:
        return ipaddress.ip_address(text) == ipaddress.ip_address(ip)
    except ValueError:
        return text == ip


def rewrite(text: str, ours: str) -> str:
    """``text`` with ``nameserver <ours>`` as its first nameserver and no ``rotate``.

    Our line goes where the first nameserver line was (at the end if there is
    none); other copies of it are dropped; ``rotate`` is removed from options
    lines, and an options line left empty is dropped.  Every other line is
    kept as it is.  Idempotent: ``rewrite(rewrite(t)) == rewrite(t)``.
    """
    out: list[str] = []
    placed = False
    for line in text.splitlines():
        words = _words(line)
        keyword = words[0] if words else ""
        if keyword == "nameserver":
            if not placed:
                out.append(f"nameserver {ours}")
                placed = True
            if len(words) > 1 and _same_ip(words[1], ours):
                continue
        elif keyword == "options" and "rotate" in words[1:]:
            rest = [w for w in words[1:] if w != "rotate"]
            if not rest:
                continue
            line = "options " + " ".join(rest)
        out.append(line)
    if not placed:
        out.append(f"nameserver {ours}")
    return "".join(line + "\n" for line in out)


def restore(text: str, ours: str) -> str:
    """``text`` without our nameserver line(s): the node's own resolution again."""
    out = []
    for line in text.splitlines():
        words = _words(line)
        if len(words) > 1 and words[0] == "nameserver" and _same_ip(words[1], ours):
            continue
        out.append(line)
    return "".join(line + "\n" for line in out)


def parse_nameservers(text: str) -> list[str]:
    """The IP addresses of the ``nameserver`` lines, in file order, without repeats.

    Lines whose argument is not an IP address are skipped (libc skips them too).
    """
    servers: list[str] = []
    for line in text.splitlines():
        words = _words(line)
        if len(words) < 2 or words[0] != "nameserver":
            continue
        address, _, scope = words[1].partition("%")
        try:
            ip = str(ipaddress.ip_address(address))
        except ValueError:
            continue
        if scope:
            ip = f"{ip}%{scope}"
        if ip not in servers:
            servers.append(ip)
    return servers


def resolv_conf_address(listen: ListenAddress) -> str:
    """What resolv.conf must name to reach a DNS server listening on ``listen``."""
    if listen.host == "0.0.0.0":
        return "127.0.0.1"
    if listen.host == "::":
        return "::1"
    return listen.host


def is_self(ip: str, listen: ListenAddress, node_ip: str | None = None) -> bool:
    """Would a query to ``ip``:53 reach our own DNS server?"""
    if listen.port != DNS_PORT:
        return False
    bare = ip.partition("%")[0]
    if _same_ip(bare, listen.host):
        return True
    if listen.host in ("0.0.0.0", "::"):
        try:
            address = ipaddress.ip_address(bare)
        except ValueError:
            return False
        if address.is_loopback or address.is_unspecified:
            return True
        return node_ip is not None and _same_ip(bare, node_ip)
    return False


def upstreams(text: str, listen: ListenAddress, node_ip: str | None = None) -> list[tuple[str, int]]:
    """The forwarder's upstreams from resolv.conf text: every nameserver but us, port 53."""
    return [(ip, DNS_PORT) for ip in parse_nameservers(text) if not is_self(ip, listen, node_ip)]


def describe_writer(text: str | None, uid: int | None) -> str:
    """Who probably wrote this content: its header comment and the file owner.

    inotify does not say which process wrote; tools that manage resolv.conf
    (NetworkManager, resolvconf, systemd-resolved, dhclient) sign their work
    with a header comment, which is the best hint there is.
    """
    if text is None:
        return "the file was deleted"
    header = None
    for line in text.splitlines()[:5]:
        stripped = line.strip()
        if stripped.startswith(("#", ";")) and len(stripped) > 1:
            header = stripped[:80]
            break
    try:
        owner = pwd.getpwuid(uid).pw_name if uid is not None else "?"
    except KeyError:
        owner = str(uid)
    hint = f"header {header!r}" if header else "no header comment"
    return f"{hint}, file owner {owner}"


# -- the file as found ---------------------------------------------------------


@dataclass(frozen=True)
class FileState:
    """One look at the guarded file (and at systemd's upstream file in stub mode)."""

    path: str
    text: str | None  # None: missing
    realpath: str
    is_symlink: bool
    inode: int | None
    uid: int | None
    stub: bool  # a symlink to systemd-resolved's stub file
    upstream_text: str | None  # the text to take upstreams from (None: unknown)

    def watch_list(self, systemd_path: str) -> dict[str, set[str]]:
        wanted: dict[str, set[str]] = collections.defaultdict(set)
        for path in (self.path, self.realpath) + ((systemd_path,) if self.stub else ()):
            directory, name = os.path.split(os.path.abspath(path))
            wanted[directory].add(name)
        return dict(wanted)


def _read_text(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None


def look_at(path: str, systemd_path: str) -> FileState:
    """Read the file and what it is (blocking: call it off the reactor thread)."""
    is_symlink = os.path.islink(path)
    realpath = os.path.realpath(path)
    text = _read_text(path)
    try:
        st = os.stat(path)
        inode, uid = st.st_ino, st.st_uid
    except FileNotFoundError:
        inode = uid = None
    stub = is_symlink and os.path.basename(realpath) == STUB_NAME
    upstream_text = _read_text(systemd_path) if stub else text
    return FileState(path, text, realpath, is_symlink, inode, uid, stub, upstream_text)


# -- the service ---------------------------------------------------------------


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
        self._read_only = read_only
        self._node_ip = node_ip
        self._settle = settle
        self._missing_grace = missing_grace
        self._burst = burst
        self._window = window
        self._run_blocking = run_blocking or _in_thread(reactor)
        self.address = resolv_conf_address(dns_listen)
        self.status = GuardianStatus(self.path, address=self.address)
        self._watcher = DirectoryWatcher(reactor, self._on_change)
        self._recheck = task.LoopingCall(self._kick)
        self._recheck.clock = reactor
        self._recheck_interval = recheck
        self._writing = False  # True once DNS listens (and we may write)
        self._wrote = False  # we changed the file at least once
        self._good = False  # the file was as it should be at the last look
        self._missing_since: float | None = None
        self._stub_logged = False
        self._fed: list[tuple[str, int]] | None = None
        self._recent_writes: collections.deque[float] = collections.deque()
        self._warned_at: float | None = None
        self._pending = None
        self._busy: defer.Deferred | None = None
        self._again = False
        self._being_written: dict[tuple[str, str], float] = {}
        self._max_writer_wait = max_writer_wait

    # -- lifecycle -------------------------------------------------------------

    def startService(self):
        super().startService()
        self._watcher.start()
        self._recheck.start(self._recheck_interval, now=True)
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
        if self._recheck.running:
            self._recheck.stop()
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        self._watcher.stop()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._busy is not None:
            try:
                await self._busy
            except Exception:
                pass
        self._writing = False
        if not self._wrote:
            return
        if self._keep_on_stop:
            log.info("resolv.conf: leaving nameserver {ip} in {path} (--keep-resolv-conf)",
                     ip=self.address, path=self.path)
            return
        try:
            how = await self._run_blocking(self._restore_file)
        except Exception as e:
            log.error("resolv.conf: could not remove nameserver {ip} from {path}: {e}",
                      ip=self.address, path=self.path, e=e)
            return
        if how:
            log.info("resolv.conf: removed nameserver {ip} from {path} ({how}); the node resolves without us",
                     ip=self.address, path=self.path, how=how)

    def _restore_file(self) -> str | None:
        text = _read_text(self.path)
        if text is None:
            return None
        restored = restore(text, self.address)
        if restored == text:
            return None
        return replace_file(self.path, restored.encode())

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
        """Look at the file soon; bursts of events become one look."""
        if not self.running:
            return
        delay = self._settle if delay is None else delay
        if self._pending is not None and self._pending.active():
            if self._pending.getTime() <= self._reactor.seconds() + delay:
                return
            self._pending.cancel()
        self._pending = self._reactor.callLater(delay, self._run)

    def _run(self) -> None:
        self._pending = None
        if self._busy is not None:
            self._again = True
            return
        self._busy = defer.Deferred.fromCoroutine(self._check())
        self._busy.addErrback(self._failed)
        self._busy.addBoth(self._done)

    def _failed(self, failure):
        self.status.last_error = failure.getErrorMessage()
        log.failure("resolv.conf: checking {path} failed", failure, path=self.path)

    def _done(self, _):
        self._busy = None
        if self._again:
            self._again = False
            self._kick()

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
        if state.stub and not self._stub_logged:
            self._stub_logged = True
            log.info("resolv.conf: {path} is systemd-resolved's stub ({real}); upstreams come from {sd}",
                     path=self.path, real=state.realpath, sd=self._systemd_path)
        self._feed(state)
        if not self._writing:
            return
        if state.text is None:
            now = self._reactor.seconds()
            if self._missing_since is None:
                self._missing_since = now
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
        how = await self._run_blocking(replace_file, self.path, desired.encode())
        self._recent_writes.append(self._reactor.seconds())
        self.status.writes += 1
        self.status.last_error = None
        self._wrote = True
        self._good = True
        if self.status.writes == 1:
            log.info("resolv.conf: nameserver {ip} is now first in {path} ({how})",
                     ip=self.address, path=self.path, how=how)

    def _rate_limit_wait(self) -> float:
        now = self._reactor.seconds()
        while self._recent_writes and self._recent_writes[0] <= now - self._window:
            self._recent_writes.popleft()
        if len(self._recent_writes) < self._burst:
            return 0.0
        wait = self._recent_writes[0] + self._window - now
        if self._warned_at is None or now - self._warned_at >= self._window:
            self._warned_at = now
            log.warn("resolv.conf: another writer keeps undoing our nameserver line in {path} "
                     "({n} rewrites in {w:.0f}s; last: {who}); next rewrite in {wait:.1f}s. "
                     "Configure that tool to keep nameserver {ip} first, or run with --no-resolv-conf",
                     path=self.path, n=len(self._recent_writes), w=self._window,
                     who=self.status.last_writer, wait=wait, ip=self.address)
        return wait

    def _feed(self, state: FileState) -> None:
        """Hand the forwarder the other nameservers (kept as they were while the file is missing).

        The DNS server logs the list it takes; no second log line here."""
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
