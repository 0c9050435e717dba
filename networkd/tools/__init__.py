"""The operator's commands beside the daemon: ``networkd check`` and ``networkd status``."""
