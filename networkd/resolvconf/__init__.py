"""resolv.conf: the node resolves through our DNS, and our DNS forwards to the node's servers.

``text`` (rewrite, restore, parse; pure), ``filestate`` (one look at the
file; blocking), ``ratelimit`` (how often we may rewrite) and ``guardian``
(the service).  The names below are what the rest of networkd uses.
"""

from networkd.resolvconf.guardian import GuardianStatus, ResolvConfGuardian
from networkd.resolvconf.text import (
    DNS_PORT, describe_writer, is_self, parse_nameservers, resolv_conf_address, restore, rewrite, upstreams,
)

__all__ = [
    "DNS_PORT", "GuardianStatus", "ResolvConfGuardian", "describe_writer", "is_self", "parse_nameservers",
    "resolv_conf_address", "restore", "rewrite", "upstreams",
]
