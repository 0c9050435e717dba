"""The only code that changes iptables: DNAT rules for VIPs in our own chains.

``rules`` (the rules as iptables text, rendered and parsed back; pure),
``backends`` (iptables-restore on nft hosts, python-iptables on legacy
hosts; blocking) and ``driver`` (``Firewall``: one pass at a time in a
thread, retried).  The names below are what the VIP reconciler uses.
"""

from networkd.vips.firewall.backends import (
    XTABLES_LOCK, FirewallError, LegacyBackend, NftRestoreBackend, RestoreBackend, detect_backend, make_backend,
)
from networkd.vips.firewall.driver import Firewall
from networkd.vips.firewall.rules import (
    CHAINS, ChainState, NatRule, nat_rules, parse_rule, parse_save, render_restore, rule_args,
)

__all__ = [
    "CHAINS", "XTABLES_LOCK", "ChainState", "Firewall", "FirewallError", "LegacyBackend", "NatRule",
    "NftRestoreBackend", "RestoreBackend", "detect_backend", "make_backend", "nat_rules", "parse_rule",
    "parse_save", "render_restore", "rule_args",
]
