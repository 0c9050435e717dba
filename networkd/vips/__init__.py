"""Floating VIPs: etcd locks, addresses, gratuitous ARP and DNAT rules."""
