"""etcd v3 access: the aetcd adapter, snapshots of key prefixes, the process lease."""
