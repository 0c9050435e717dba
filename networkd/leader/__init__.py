"""Cluster-wide tasks run by one elected networkd."""
