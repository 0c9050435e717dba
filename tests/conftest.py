"""Shared fixtures: a real etcd server, a fresh key root per test, namespaces."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid

import pytest

from tests.support.etcd_server import EtcdServer
from tests.support.privileges import require_privileged


def pytest_configure(config):
    """Every temporary file of the run, ours and the daemons', goes under one directory.

    Test helpers make work directories (daemon logs, etcd data, hosts
    files) that tests read after a daemon stopped, so nothing removes
    them one by one; the run removes them all at its end instead
    (``pytest_unconfigure``), failed tests included.
    """
    config._networkd_tmp = (tempfile.tempdir, os.environ.get("TMPDIR"))
    tempfile.tempdir = tempfile.mkdtemp(prefix="networkd-tests-")
    os.environ["TMPDIR"] = tempfile.tempdir


def pytest_unconfigure(config):
    run_dir = tempfile.tempdir
    tempfile.tempdir, tmpdir = config._networkd_tmp
    if tmpdir is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = tmpdir
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def etcd_server():
    """One etcd for the session; tests isolate themselves with ``etcd_root``."""
    if not shutil.which("etcd"):
        pytest.fail("etcd is not installed (Debian package etcd-server); run `make test`")
    server = EtcdServer().start()
    yield server
    server.destroy()


@pytest.fixture
def private_etcd():
    """An etcd of this test's own, for tests that stop, restart or compact it."""
    server = EtcdServer().start()
    yield server
    server.destroy()


@pytest.fixture
def etcd_root():
    """A key root nobody else uses, e.g. ``/t3f9a1c``."""
    return f"/t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def privileged():
    require_privileged()


@pytest.fixture
def lan(privileged):
    from tests.support.netns import Lan

    lan = Lan()
    yield lan
    lan.delete()


@pytest.fixture
def upstream():
    """A stub DNS upstream on a random 127.0.0.x:53 that knows example.com."""
    from tests.support.dnsstub import StubServer

    stub = StubServer()
    stub.records["example.com"] = ["93.184.216.34"]
    yield stub
    stub.close()


@pytest.fixture
def own_asyncio_reactor():
    """A Twisted asyncio reactor on a loop of its own, as the daemon runs it (not pytest-twisted's)."""
    import asyncio

    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    loop = asyncio.new_event_loop()
    made = AsyncioSelectorReactor(loop)
    yield made
    made.disconnectAll()
    loop.close()
