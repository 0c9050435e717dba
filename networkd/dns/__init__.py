"""The embedded DNS server: local names from etcd and the hosts file,
forwarding zones, upstream forwarding with a cache.

Queries arrive at ``udp`` and ``tcp``; repeated UDP questions are answered
from pre-packed bytes (``hot``) without parsing; everything else goes to
``resolver``: admission (``clients``), then the chain zone -> cache ->
forwarder.  ``service`` owns the listeners and feeds the resolver whole data.
"""
