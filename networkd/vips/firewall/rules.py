"""Our DNAT rules as text: what iptables should hold, rendered and read back.

Both back ends keep ``lain-PREROUTING`` and ``lain-OUTPUT`` in table nat,
jumped to first from PREROUTING and OUTPUT.  Every rule carries its VIP key
as a comment.  Reading the chains back and comparing them with the desired
rules lets a pass rewrite them only when they differ, so a changed dest,
proto or container IP, or a removed port, leaves nothing behind ([BUG 12]).
Pure: no I/O here.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Iterable

from networkd.vips.planner import DnatRule

CHAINS = {"PREROUTING": "lain-PREROUTING", "OUTPUT": "lain-OUTPUT"}


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
