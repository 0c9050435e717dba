"""The aetcd that networkd.etcd.client was written against is the one installed.

``_Client.connect`` re-implements aetcd's ``Client.connect`` for TLS
channels, reading and setting private fields of that one release (setup.cfg
pins it).  These tests fail loudly when the pin, ``AETCD_VERSION`` and the
installed aetcd disagree, or when aetcd's client changes under them; then
re-check ``_Client.connect`` against the new ``Client.connect`` and update
the pin, the constant and the fingerprints below together.  No etcd is
needed: gRPC channels connect lazily, and authentication is a stub.
"""

from __future__ import annotations

import asyncio
import configparser
import hashlib
import importlib.metadata
import inspect
from pathlib import Path

import aetcd
import grpc
import pytest
import pytest_twisted
from aetcd import rpc
from twisted.internet.defer import Deferred

from networkd.etcd.client import (
    AETCD_VERSION, CHANNEL_OPTIONS, Compacted, EtcdUnavailable, _Client, _LeaseCompare, _translate,
)
from networkd.options import Endpoint

SETUP_CFG = Path(__file__).resolve().parent.parent / "setup.cfg"

# sha256 of the source of the aetcd 1.0.0 methods _Client depends on:
# __init__ sets the fields connect reads, _init_channel_attrs lists the
# fields connect must set (close resets them), connect is what _Client
# re-implements.
FINGERPRINTS = {
    "__init__": "60226116bd94b7d8e7da86260a6cc26064d9c5e45945f51af05eeb8a1c8e170e",
    "_init_channel_attrs": "d6e77523561942b504a248406217baac56b31ad7c848faba42597e1b8fbc9770",
    "connect": "739bd1375223094e19daf098d371f493cb667fb98c13e656b1e111a654af9264",
}

TOKEN = "stub-token"


def run(coroutine) -> Deferred:
    """Await an asyncio coroutine from a Twisted test (see networkd.etcd.client)."""
    return Deferred.fromFuture(asyncio.ensure_future(coroutine))


def test_the_installed_aetcd_is_the_pinned_release():
    installed = importlib.metadata.version("aetcd")
    parser = configparser.ConfigParser()
    parser.read(SETUP_CFG)
    requirements = parser["options"]["install_requires"].split()
    assert f"aetcd=={AETCD_VERSION}" in requirements, \
        f"setup.cfg must pin aetcd=={AETCD_VERSION} (networkd.etcd.client.AETCD_VERSION): {requirements}"
    assert installed == AETCD_VERSION, (
        f"aetcd {installed} is installed, networkd.etcd.client is written for {AETCD_VERSION}: "
        f"reinstall (pip install -e .[test]) or port _Client.connect to {installed}")


@pytest.mark.parametrize("name", sorted(FINGERPRINTS))
def test_aetcd_client_method_is_the_one_mirrored(name):
    source = inspect.getsource(getattr(aetcd.Client, name))
    digest = hashlib.sha256(source.encode()).hexdigest()
    assert digest == FINGERPRINTS[name], (
        f"aetcd.Client.{name} is not the aetcd {AETCD_VERSION} code networkd.etcd.client._Client "
        f"mirrors: compare _Client.connect with it, then update FINGERPRINTS.  It now reads:\n{source}")


class StubAuth:
    """rpc.AuthStub that answers Authenticate with a fixed token, no server needed."""

    requests: list = []

    def __init__(self, channel):
        self.channel = channel

    async def Authenticate(self, request, timeout=None):
        StubAuth.requests.append((request.name, request.password, timeout))
        return rpc.AuthenticateResponse(token=TOKEN)


@pytest.fixture
def channels(monkeypatch):
    """Record which channel factory made which channel; authentication is stubbed."""
    made = {}

    def recording(name):
        real = getattr(rpc, name)

        def factory(*args, **kwargs):
            channel = real(*args, **kwargs)
            made[id(channel)] = (name, args, kwargs)
            return channel

        monkeypatch.setattr(rpc, name, factory)

    recording("insecure_channel")
    recording("secure_channel")
    monkeypatch.setattr(rpc, "AuthStub", StubAuth)
    StubAuth.requests = []
    return made


def shape(client) -> dict:
    """Every field of an aetcd client: its type, or its value when it is plain data."""
    plain = (type(None), bool, int, float, str, bytes, tuple)
    return {name: value if isinstance(value, plain) else type(value)
            for name, value in vars(client).items() if name != "_credentials"}


def watcher_shape(client) -> dict:
    return shape(client._watcher) if client._watcher is not None else {}


@pytest.mark.parametrize("auth", [False, True], ids=["no-auth", "auth"])
@pytest_twisted.ensureDeferred
async def test_tls_connect_leaves_the_client_as_aetcd_connect_does(channels, auth):
    credentials = grpc.ssl_channel_credentials()
    kwargs = dict(username="root", password="pw") if auth else {}
    kwargs.update(timeout=None, options=CHANNEL_OPTIONS)
    plain = aetcd.Client("127.0.0.1", 1, **kwargs)
    tls = _Client("127.0.0.1", 1, credentials=credentials, **kwargs)
    assert shape(tls) == shape(plain), "before connect"
    try:
        await run(plain.connect())
        await run(tls.connect())
        assert shape(tls) == shape(plain), "after connect: _Client.connect must set what aetcd's does"
        assert watcher_shape(tls) == watcher_shape(plain)
        assert tls._connected.is_set() and not tls._is_connecting
        assert tls.metadata == ((("token", TOKEN),) if auth else None)
        assert StubAuth.requests == ([("root", "pw", None)] * 2 if auth else [])

        how_plain, how_tls = channels[id(plain.channel)], channels[id(tls.channel)]
        assert how_plain[0] == "insecure_channel"
        assert how_tls == ("secure_channel", ("127.0.0.1:1", credentials),
                           {"options": CHANNEL_OPTIONS.items()})

        await run(tls.connect())  # connected: nothing happens
        assert channels[id(tls.channel)] is how_tls and len(channels) == 2
    finally:
        await run(plain.close())
        await run(tls.close())
    assert shape(tls) == shape(plain), "after close"
    assert tls.channel is None and not tls._connected.is_set()


@pytest_twisted.ensureDeferred
async def test_without_credentials_connect_is_aetcds(channels):
    client = _Client("127.0.0.1", 1, timeout=None, options=CHANNEL_OPTIONS)
    try:
        await run(client.connect())
        assert channels[id(client.channel)][0] == "insecure_channel"
    finally:
        await run(client.close())


def test_lease_compare_builds_etcds_lease_compare():
    message = (_LeaseCompare(b"/lain/networkd/leader") == 0x1234).build_message()
    assert message == rpc.Compare(key=b"/lain/networkd/leader", result=rpc.Compare.EQUAL,
                                  target=rpc.Compare.LEASE, lease=0x1234)


def test_aetcd_errors_still_translate():
    """The adapter reads aetcd's compacted revision and its connection errors."""
    endpoint = Endpoint("127.0.0.1", 1, False)
    compacted = _translate(aetcd.RevisionCompactedError(41), endpoint)
    assert isinstance(compacted, Compacted) and "41" in str(compacted)
    failed = _translate(aetcd.ConnectionFailedError("gone"), endpoint)
    assert isinstance(failed, EtcdUnavailable) and "gone" in str(failed)
