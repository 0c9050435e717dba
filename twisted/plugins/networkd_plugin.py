"""twistd plugin: ``twistd -n networkd [options]``."""

from twisted.application.service import ServiceMaker

networkd = ServiceMaker(
    "networkd",
    "networkd.tap",
    "Per-node network daemon: floating VIPs, embedded DNS, resolv.conf guardian, HTTP API.",
    "networkd",
)
