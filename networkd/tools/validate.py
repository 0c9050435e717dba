"""Is every key under the etcd root one the daemon can use?  Checked with the daemon's own parsers.

Pure: (etcd root, {full key: value}) -> one PartReport per part.  A part is a
prefix the daemon reads and the parser it reads it with; keys elsewhere
under the root are counted, not judged (networkd writes or ignores them).
``check_value`` checks one value before it is written (``--file``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from networkd.dns.names import BadName, split_wildcard
from networkd.dns.upstreams import parse_forward_zones
from networkd.dns.zone import parse_domain_value
from networkd.keys import Keys
from networkd.leader.publish import address_of
from networkd.vips.model import InvalidValue, parse_pod_group, parse_vip

# A domain of type "node" is valid wherever the daemon has a node IP; the
# check runs on no particular node, so it stands in with a documentation address.
NODE_IP_STAND_IN = "192.0.2.1"


class Invalid(ValueError):
    """The reason one key cannot be used."""


def _vip(key: str, raw: str) -> None:
    try:
        parse_vip(key, raw)
    except InvalidValue as e:
        raise Invalid(str(e)) from None


def _pod_group(key: str, raw: str) -> None:
    if key.count("/") != 1 or not all(key.split("/")):
        raise Invalid(f"key {key!r} is not <app>/<podgroup>")
    try:
        parse_pod_group(key, raw)
    except InvalidValue as e:
        raise Invalid(str(e)) from None


def _domain(key: str, raw: str) -> None:
    try:
        split_wildcard(key)
    except BadName as e:
        raise Invalid(f"bad name: {e}") from None
    try:
        parse_domain_value(raw, NODE_IP_STAND_IN, ())
    except ValueError as e:
        raise Invalid(str(e)) from None


def _domain_server(key: str, raw: str) -> None:
    _, invalid = parse_forward_zones({key: raw})
    if invalid:
        raise Invalid(next(iter(invalid.values())))


def _leader_address(key: str, raw: str) -> None:
    try:
        address_of(raw)
    except ValueError as e:
        raise Invalid(str(e)) from None


def _tinydns_worker(key: str, raw: str) -> None:
    if "/" in key:
        return  # not a worker key
    try:
        address_of(key)
    except ValueError as e:
        raise Invalid(f"key: {e}") from None


@dataclass(frozen=True)
class Part:
    name: str  # as --kind names it
    title: str
    prefix: Callable[[Keys], str]
    check: Callable[[str, str], None]  # (key relative to the prefix, value); raises Invalid
    exact: bool = False  # the prefix is one key, not a directory
    example_key: str = ""  # checked as this key when --file is given without --key


PARTS = (
    Part("vip", "VIP configs", lambda k: k.vips, _vip, example_key="192.0.2.10"),
    Part("podgroup", "deployd pod groups", lambda k: k.pod_groups, _pod_group, example_key="app/app.web.web"),
    Part("domain", "DNS names", lambda k: k.domains, _domain, example_key="example.lain"),
    Part("domain-server", "DNS forwarding zones", lambda k: k.domain_servers, _domain_server, example_key="lain"),
    Part("deployd-leader", "deployd leader key", lambda k: k.deployd_leader, _leader_address, exact=True),
    Part("swarm-leader", "swarm leader key", lambda k: k.swarm_leader, _leader_address, exact=True),
    Part("tinydns-worker", "tinydns workers", lambda k: k.tinydns_workers, _tinydns_worker,
         example_key="10.0.0.5:53"),
)
KINDS = tuple(part.name for part in PARTS)


@dataclass
class PartReport:
    part: Part
    prefix: str
    checked: int = 0
    invalid: list[tuple[str, str]] = field(default_factory=list)  # (full key, reason)


@dataclass
class Report:
    root: str
    parts: list[PartReport]
    other_keys: int = 0

    @property
    def checked(self) -> int:
        return sum(p.checked for p in self.parts)

    @property
    def invalid(self) -> int:
        return sum(len(p.invalid) for p in self.parts)


def _reason(check, key: str, raw: str) -> str | None:
    try:
        check(key, raw)
    except Invalid as e:
        return str(e)
    return None


def check_keys(root: str, values: Mapping[str, str]) -> Report:
    """Every key under ``root`` in ``values`` (full keys), judged by the part whose prefix it is under."""
    keys = Keys(root)
    reports = [PartReport(part, part.prefix(keys)) for part in PARTS]
    other = 0
    for full_key in sorted(values):
        report = _part_of(reports, full_key)
        if report is None:
            other += 1
            continue
        relative = "" if report.part.exact else full_key[len(report.prefix):]
        report.checked += 1
        reason = _reason(report.part.check, relative, values[full_key])
        if reason is not None:
            report.invalid.append((full_key, reason))
    return Report(root, reports, other)


def _part_of(reports: list[PartReport], full_key: str) -> PartReport | None:
    # The longest matching prefix wins (tinydns workers are under networkd/apps/).
    found = None
    for report in reports:
        matches = full_key == report.prefix if report.part.exact else full_key.startswith(report.prefix)
        if matches and (found is None or len(report.prefix) > len(found.prefix)):
            found = report
    return found


def kind_of_key(root: str, key: str) -> tuple[Part, str] | None:
    """(part, key relative to its prefix) for a full etcd key, or None."""
    report = _part_of([PartReport(part, part.prefix(Keys(root))) for part in PARTS], key)
    if report is None:
        return None
    return report.part, "" if report.part.exact else key[len(report.prefix):]


def part_named(kind: str) -> Part:
    return next(part for part in PARTS if part.name == kind)


def check_value(part: Part, key: str, raw: str) -> str | None:
    """The reason ``raw`` cannot be the value of ``key`` (relative) of ``part``, or None."""
    return _reason(part.check, key, raw)


def as_json(report: Report) -> dict:
    return {
        "root": report.root,
        "checked": report.checked,
        "invalid": report.invalid,
        "other_keys": report.other_keys,
        "parts": [{"part": p.part.name, "prefix": p.prefix, "checked": p.checked,
                   "invalid": [{"key": k, "error": e} for k, e in p.invalid]} for p in report.parts],
    }


__all__ = ["KINDS", "PARTS", "Report", "as_json", "check_keys", "check_value", "kind_of_key", "part_named"]
