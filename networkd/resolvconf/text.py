"""resolv.conf text: our line put first or taken out, nameservers read, writers named.

Pure functions of the text (tests feed them strings): ``rewrite`` and
``restore`` change only the lines they must, so every other line a tool or
an operator wrote stays as it was.
"""

from __future__ import annotations

import ipaddress
import pwd

from networkd.options import ListenAddress

DNS_PORT = 53


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
