"""The only code that changes iptables: DNAT rules for VIPs in our own chains.

One interface, two back ends (DESIGN.md, "Firewall"):

* ``NftRestoreBackend`` -- ``iptables-restore --noflush`` of our two chains
  in one atomic transaction; for hosts whose iptables is iptables-nft
  (Debian >= 10, RHEL >= 8), where python-iptables' legacy tables would be
  invisible or missing.
* ``LegacyBackend`` -- python-iptables (libiptc) for legacy-iptables hosts,
  committing the whole nat table at once, under the xtables lock.

Both keep ``lain-PREROUTING`` and ``lain-OUTPUT`` in table nat, jumped to
first from PREROUTING and OUTPUT.  Every rule carries its VIP key as a
comment.  Reconciling reads the chains back and rewrites them only when
they differ from the desired rules, so a changed dest, proto or container
IP, or a removed port, leaves nothing behind ([BUG 12]).  The blocking work
runs in a thread, one call at a time.
"""

from __future__ import annotations

import fcntl
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from twisted.internet import defer, threads
from twisted.logger import Logger

from networkd.backoff import Backoff
from networkd.vips.planner import DnatRule

log = Logger()

CHAINS = {"PREROUTING": "lain-PREROUTING", "OUTPUT": "lain-OUTPUT"}
XTABLES_LOCK = "/run/xtables.lock"


class FirewallError(Exception):
    """iptables refused our rules (the message says why)."""


@dataclass(frozen=True, order=True)
class NatRule:
    """One rule in one of our chains."""

    chain: str
    ip: str
    proto: str
    port: int
    to_ip: str
    to_port: int
    key: str
    out_lo: bool = False


def nat_rules(dnats: Iterable[DnatRule]) -> list[NatRule]:
    """Each DNAT becomes a PREROUTING rule and an OUTPUT ``-o lo`` rule (local traffic)."""
    rules = set()
    for d in dnats:
        rules.add(NatRule(CHAINS["PREROUTING"], d.ip, d.proto, d.port, d.to_ip, d.to_port, d.key))
        rules.add(NatRule(CHAINS["OUTPUT"], d.ip, d.proto, d.port, d.to_ip, d.to_port, d.key, True))
    return sorted(rules)


def rule_args(rule: NatRule) -> list[str]:
    """The rule as iptables arguments after ``-A CHAIN`` (iptables-save's order)."""
    args = ["-d", f"{rule.ip}/32"]
    if rule.out_lo:
        args += ["-o", "lo"]
    args += ["-p", rule.proto, "-m", rule.proto, "--dport", str(rule.port),
             "-m", "comment", "--comment", rule.key,
             "-j", "DNAT", "--to-destination", f"{rule.to_ip}:{rule.to_port}"]
    return args


def render_restore(rules: Iterable[NatRule], missing_jumps: Iterable[str] = ()) -> str:
    """iptables-restore input that replaces our chains (and adds missing jumps)."""
    lines = ["*nat"]
    lines += [f":{chain} - [0:0]" for chain in CHAINS.values()]
    for builtin in missing_jumps:
        lines.append(f"-I {builtin} 1 -j {CHAINS[builtin]}")
    for rule in sorted(rules):
        lines.append(" ".join(["-A", rule.chain] + [shlex.quote(a) for a in rule_args(rule)]))
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


_TOKEN = re.compile(r'"([^"]*)"|(\S+)')


def parse_rule(line: str) -> NatRule | None:
    """A NatRule from one ``iptables-save`` line of our chains, None if it is not one of ours."""
    try:
        # shlex only for what iptables-save never writes for our rules (single quotes, escapes):
        # the read-back of 2,000 rules runs every few seconds.
        if "'" in line or "\\" in line:
            tokens = shlex.split(line)
        else:
            tokens = [quoted or bare for quoted, bare in _TOKEN.findall(line)]
    except ValueError:
        return None
    if len(tokens) < 2 or tokens[0] != "-A" or tokens[1] not in CHAINS.values():
        return None
    fields: dict[str, str] = {}
    i = 2
    while i < len(tokens):
        option = tokens[i]
        value = tokens[i + 1] if i + 1 < len(tokens) else None
        if value is None:
            return None
        if option == "-m":
            pass
        elif option in ("-d", "-o", "-p", "--dport", "--comment", "-j", "--to-destination"):
            fields[option] = value
        else:
            return None
        i += 2
    try:
        ip, _, mask = fields["-d"].partition("/")
        to_ip, _, to_port = fields["--to-destination"].rpartition(":")
        if mask not in ("", "32") or fields["-j"] != "DNAT":
            return None
        return NatRule(tokens[1], ip, fields["-p"], int(fields["--dport"]), to_ip, int(to_port),
                       fields["--comment"], fields.get("-o") == "lo")
    except (KeyError, ValueError):
        return None


@dataclass
class ChainState:
    """What is in the kernel now: our rules, and what is missing or foreign."""

    rules: list[NatRule]
    missing_chains: list[str]
    missing_jumps: list[str]
    foreign: int = 0  # lines in our chains we did not write

    def matches(self, rules: list[NatRule]) -> bool:
        return not (self.missing_chains or self.missing_jumps or self.foreign) and sorted(self.rules) == sorted(rules)


def parse_save(text: str) -> ChainState:
    """Our chains, as ``iptables-save -t nat`` prints them."""
    chains = set()
    jumps = set()
    rules: list[NatRule] = []
    foreign = 0
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(":"):
            chains.add(line[1:].split()[0])
        elif line.startswith("-A "):
            parts = line.split()
            if parts[1] in CHAINS and parts[2:] == ["-j", CHAINS[parts[1]]]:
                jumps.add(parts[1])
            elif parts[1] in CHAINS.values():
                rule = parse_rule(line)
                if rule is None:
                    foreign += 1
                else:
                    rules.append(rule)
    return ChainState(
        rules,
        [c for c in CHAINS.values() if c not in chains],
        [b for b in CHAINS if b not in jumps],
        foreign,
    )


# -- back ends ---------------------------------------------------------------


class RestoreBackend:
    """Atomic ``iptables-restore --noflush`` of our chains.

    The nft variant is the back end for iptables-nft hosts; the legacy
    variant is only a fallback when python-iptables cannot load.
    """

    def __init__(self, variant: str = "nft", run=subprocess.run, sleep=time.sleep, attempts: int = 5):
        self.name = variant if variant == "nft" else f"{variant} (iptables-restore)"
        self._restore = _binary(f"iptables-{variant}-restore", "iptables-restore")
        self._save = _binary(f"iptables-{variant}-save", "iptables-save")
        self._run = run
        self._sleep = sleep
        self._attempts = attempts

    def read(self) -> ChainState:
        done = self._retrying([self._save, "-t", "nat"], None)
        return parse_save(done.stdout)

    def write(self, rules: list[NatRule], missing_jumps: list[str]) -> None:
        self._retrying([self._restore, "--noflush", "-w", "5"], render_restore(rules, missing_jumps))

    def _retrying(self, argv: list[str], stdin: str | None):
        """Run; retry only on exit status 4 (resource problem: the xtables lock), never guess."""
        backoff = Backoff(0.05, 1.0)
        for attempt in range(self._attempts):
            done = self._run(argv, input=stdin, capture_output=True, text=True, timeout=30)
            if done.returncode == 0:
                return done
            if done.returncode != 4 or attempt == self._attempts - 1:
                raise FirewallError(f"{os.path.basename(argv[0])} failed ({done.returncode}): "
                                    f"{(done.stderr or done.stdout).strip()[:300]}")
            self._sleep(backoff.next())
        raise FirewallError("unreachable")


class LegacyBackend:
    """python-iptables on the legacy tables, under the xtables lock (legacy hosts)."""

    name = "legacy"

    def __init__(self, lock_path: str = XTABLES_LOCK, lock_timeout: float = 10.0):
        import iptc  # imported here: it loads libiptc, which nft-only hosts may lack

        self._iptc = iptc
        self._lock_path = lock_path
        self._lock_timeout = lock_timeout

    def _locked(self):
        """The xtables lock, as iptables-legacy takes it: retry until free, fail after a timeout."""
        fd = os.open(self._lock_path, os.O_CREAT | os.O_RDWR, 0o600)
        deadline = time.monotonic() + self._lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise FirewallError(f"xtables lock {self._lock_path} still held after {self._lock_timeout}s")
                time.sleep(0.05)

    def _table(self):
        table = self._iptc.Table(self._iptc.Table.NAT)
        table.refresh()
        return table

    def read(self) -> ChainState:
        fd = self._locked()
        try:
            table = self._table()
            names = {c.name for c in table.chains}
            rules: list[NatRule] = []
            foreign = 0
            jumps = set()
            for builtin, ours in CHAINS.items():
                if any(r.target.name == ours for r in self._iptc.Chain(table, builtin).rules):
                    jumps.add(builtin)
                if ours in names:
                    for r in self._iptc.Chain(table, ours).rules:
                        rule = self._from_iptc(ours, r)
                        if rule is None:
                            foreign += 1
                        else:
                            rules.append(rule)
            return ChainState(rules, [c for c in CHAINS.values() if c not in names],
                              [b for b in CHAINS if b not in jumps], foreign)
        finally:
            os.close(fd)

    def _from_iptc(self, chain: str, r) -> NatRule | None:
        try:
            ip, _, mask = r.dst.partition("/")
            if mask not in ("255.255.255.255", "32") or r.target.name != "DNAT":
                return None
            dport = comment = None
            for m in r.matches:
                if m.name in ("tcp", "udp"):
                    dport = m.dport
                elif m.name == "comment":
                    comment = m.comment
            to_ip, _, to_port = r.target.to_destination.rpartition(":")
            return NatRule(chain, ip, r.protocol, int(dport), to_ip, int(to_port), comment,
                           r.out_interface == "lo")
        except Exception:
            return None

    def write(self, rules: list[NatRule], missing_jumps: list[str]) -> None:
        iptc = self._iptc
        fd = self._locked()
        try:
            table = self._table()
            table.autocommit = False
            try:
                names = {c.name for c in table.chains}
                for ours in CHAINS.values():
                    if ours not in names:
                        table.create_chain(ours)
                    else:
                        iptc.Chain(table, ours).flush()
                for builtin in missing_jumps:
                    jump = iptc.Rule()
                    jump.create_target(CHAINS[builtin])
                    iptc.Chain(table, builtin).insert_rule(jump)
                for rule in sorted(rules):
                    iptc.Chain(table, rule.chain).append_rule(self._to_iptc(rule))
                table.commit()
            except iptc.IPTCError as e:
                raise FirewallError(f"python-iptables: {e}") from None
            finally:
                table.autocommit = True
        finally:
            os.close(fd)

    def _to_iptc(self, rule: NatRule):
        r = self._iptc.Rule()
        r.dst = f"{rule.ip}/32"
        if rule.out_lo:
            r.out_interface = "lo"
        r.protocol = rule.proto
        r.create_match(rule.proto).dport = str(rule.port)
        r.create_match("comment").comment = rule.key
        r.create_target("DNAT").to_destination = f"{rule.to_ip}:{rule.to_port}"
        return r


def _binary(*names: str) -> str:
    for name in names:
        for directory in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):
            path = os.path.join(directory, name)
            if os.access(path, os.X_OK):
                return path
        found = shutil.which(name)
        if found:
            return found
    return names[-1]


def detect_backend(choice: str = "auto", run=subprocess.run) -> str:
    """``legacy`` or ``nft``: what the host's ``iptables`` uses (``--firewall-backend``)."""
    if choice in ("legacy", "nft"):
        return choice
    try:
        version = run([_binary("iptables"), "-V"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "legacy"
    return "nft" if "nf_tables" in version else "legacy"


def make_backend(name: str):
    return NftRestoreBackend() if name == "nft" else LegacyBackend()


def NftRestoreBackend(**kwargs) -> RestoreBackend:
    """The back end for iptables-nft hosts."""
    return RestoreBackend("nft", **kwargs)


# -- the driver the reconciler uses ------------------------------------------


class Firewall:
    """Keeps our chains equal to ``desired()``, one blocking call at a time, off the reactor.

    ``sync()`` asks for a pass; the pass reads ``desired()`` when it runs, so
    a request made while another pass is busy is served with the newest
    state.  Failures are logged and retried with backoff; never raised.
    """

    def __init__(self, reactor, backend, desired: Callable[[], Iterable[DnatRule]], to_thread=None):
        self._reactor = reactor
        self.backend = backend
        self._desired = desired
        self._to_thread = to_thread or (lambda f, *a: threads.deferToThread(f, *a))
        self._busy = False
        self._dirty = False
        self._retry = None
        self._backoff = Backoff(0.2, 5.0)
        self._waiters: list[defer.Deferred] = []
        self._reset_first = True
        self._verify = False
        self._trusted = False  # True while our last pass succeeded: the kernel has what we wrote
        self.applied: frozenset[DnatRule] = frozenset()
        self.last_error: str | None = None
        self.writes = 0
        self.stopped = False

    def reset(self) -> None:
        """Rebuild our chains from scratch on the next pass (startup)."""
        self._reset_first = True
        self.sync()

    def sync(self, verify: bool = False) -> defer.Deferred:
        """Fires once a pass that started after this call finished (success or not).

        A pass writes without reading first when our last pass succeeded
        (we know what is there); ``verify`` reads the kernel's rules back
        and rewrites them only if they drifted (anti-entropy).
        """
        waiter = defer.Deferred()
        self._waiters.append(waiter)
        self._dirty = True
        self._verify = self._verify or verify
        if not self._busy:
            self._start()
        return waiter

    def _start(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self._busy = True
        self._dirty = False
        waiters, self._waiters = self._waiters, []
        dnats = frozenset(self._desired())
        reset, self._reset_first = self._reset_first, False
        verify, self._verify = self._verify or not self._trusted, False
        if not reset and not verify and dnats == self.applied:
            self._done(False, dnats, waiters)
            return
        self._trusted = False  # until this pass succeeded
        d = self._to_thread(self._pass, dnats, reset, verify)
        d.addCallbacks(self._done, self._failed, callbackArgs=(dnats, waiters), errbackArgs=(waiters, reset))

    def _pass(self, dnats: frozenset[DnatRule], reset: bool, verify: bool) -> bool:
        rules = nat_rules(dnats)
        if not reset and not verify:
            self.backend.write(rules, [])  # our chains and jumps are in place: replace the chains
            return True
        state = self.backend.read()
        if not reset and state.matches(rules):
            return False
        self.backend.write(rules, state.missing_jumps)
        return True

    def _done(self, wrote: bool, dnats, waiters) -> None:
        self._busy = False
        self._trusted = True
        self.applied = dnats
        self.last_error = None
        self._backoff.reset()
        if wrote:
            self.writes += 1
            log.info("iptables ({backend}): {n} DNAT rules in place", backend=self.backend.name, n=len(dnats))
        for waiter in waiters:
            waiter.callback(True)
        if self._dirty:
            self._start()

    def _failed(self, failure, waiters, reset) -> None:
        self._busy = False
        self._reset_first = self._reset_first or reset
        self.last_error = str(failure.value) if failure.check(FirewallError) else failure.getErrorMessage()
        if not failure.check(FirewallError):
            log.failure("iptables pass failed", failure)
        else:
            log.warn("iptables pass failed: {e}", e=self.last_error)
        for waiter in waiters:
            waiter.callback(False)
        if self._dirty:
            self._start()
        elif not self.stopped:
            self._retry = self._reactor.callLater(self._backoff.next(), self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        if not self._busy:
            self._dirty = True
            self._verify = True
            self._start()

    def stop(self) -> None:
        self.stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
