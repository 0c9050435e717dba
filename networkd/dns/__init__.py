"""The embedded DNS server: local names from etcd and the hosts file,
forwarding zones, upstream forwarding with a cache.

The chain is zone -> cache -> forwarder (server.Resolver); hot answers are
kept as packed bytes so that the common case never parses a message.
"""
