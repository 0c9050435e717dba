"""The two ways to change iptables; both replace our chains in one transaction.

* ``NftRestoreBackend`` -- ``iptables-restore --noflush`` of our two chains
  in one atomic transaction; for hosts whose iptables is iptables-nft
  (Debian >= 10, RHEL >= 8), where python-iptables' legacy tables would be
  invisible or missing.
* ``LegacyBackend`` -- python-iptables (libiptc) for legacy-iptables hosts,
  committing the whole nat table at once, under the xtables lock.

A back end has ``name``, ``read() -> ChainState`` and ``write(rules,
missing_jumps)``; both block, so the driver calls them in a thread.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time

from networkd.backoff import Backoff
from networkd.vips.firewall.rules import CHAINS, ChainState, NatRule, parse_save, render_restore

XTABLES_LOCK = "/run/xtables.lock"


class FirewallError(Exception):
    """iptables refused our rules (the message says why)."""


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
