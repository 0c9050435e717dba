"""The tests' etcd (tests/support/etcd_server.py): a health check that hangs while etcd starts is asked
again, and a start that fails leaves no etcd process and no data behind (a bench's failure path left
two running etcds on this machine)."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.support.etcd_server import EtcdServer


def test_a_hung_health_check_is_asked_again(monkeypatch):
    server = EtcdServer()
    real_ctl, hung = server.ctl, []

    def ctl(*args, **kwargs):
        if args[:2] == ("endpoint", "health") and len(hung) < 2:
            hung.append(args)
            raise subprocess.TimeoutExpired(["etcdctl", *args], kwargs.get("timeout", 2))
        return real_ctl(*args, **kwargs)

    monkeypatch.setattr(server, "ctl", ctl)
    try:
        server.start()
        assert len(hung) == 2
        assert real_ctl("endpoint", "health", check=False).returncode == 0
    finally:
        server.destroy()


def test_a_failed_start_leaves_nothing_behind(monkeypatch):
    server = EtcdServer()

    def ctl(*args, **kwargs):
        raise subprocess.TimeoutExpired(["etcdctl", *args], kwargs.get("timeout", 2))

    monkeypatch.setattr(server, "ctl", ctl)
    with pytest.raises(RuntimeError, match="did not become healthy"):
        server.start(timeout=1.0)
    assert server.process.poll() is not None, "the etcd it started is gone"
    assert not os.path.exists(server.data_dir)
