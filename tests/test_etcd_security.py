"""TLS (with client certificates) and user/password authentication against a real etcd."""

from __future__ import annotations

import subprocess

import pytest
import pytest_twisted
from twisted.internet import reactor

from networkd.etcd.client import EtcdClient, EtcdUnavailable, TLSFiles
from networkd.etcd.reflector import PrefixWatcher
from networkd.options import parse_endpoints
from tests.support.etcd_server import EtcdServer
from tests.support.waiting import eventually


def openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out", f"{name}.pem", cwd=d)
    return {"ca": str(d / "ca.pem"), "cert": str(d / "server.pem"), "key": str(d / "server.key"),
            "client_cert": str(d / "client.pem"), "client_key": str(d / "client.key")}


@pytest.fixture
def tls_etcd(pki):
    server = EtcdServer(tls=pki).start()
    yield server
    server.destroy()


@pytest_twisted.ensureDeferred
async def test_snapshots_over_tls_with_client_certificate(tls_etcd, pki):
    tls_etcd.put("/tls/a", "1")
    client = EtcdClient(parse_endpoints(tls_etcd.endpoint),
                        tls=TLSFiles(pki["ca"], pki["client_cert"], pki["client_key"]), call_timeout=2)
    watcher = PrefixWatcher(client, "/tls/", reactor)
    seen = []
    watcher.subscribe(seen.append)
    watcher.startService()
    try:
        await eventually(lambda: seen and dict(seen[-1].values) == {"a": "1"})
        tls_etcd.put("/tls/b", "2")
        await eventually(lambda: dict(seen[-1].values) == {"a": "1", "b": "2"})
    finally:
        await watcher.stopService()
        await client.close()


@pytest_twisted.ensureDeferred
async def test_tls_without_client_certificate_is_refused(tls_etcd, pki):
    client = EtcdClient(parse_endpoints(tls_etcd.endpoint), tls=TLSFiles(pki["ca"]), call_timeout=2)
    try:
        with pytest.raises(EtcdUnavailable):
            await client.get_prefix(b"/tls/")
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_user_and_password(private_etcd):
    private_etcd.ctl("user", "add", "root", "--new-user-password=rootpw")
    private_etcd.ctl("auth", "enable")
    good = EtcdClient(parse_endpoints(private_etcd.endpoint), user="root", password="rootpw", call_timeout=2)
    bad = EtcdClient(parse_endpoints(private_etcd.endpoint), user="root", password="wrong", call_timeout=2)
    try:
        await good.put(b"/auth/k", b"v")
        assert (await good.get(b"/auth/k")).value == b"v"
        with pytest.raises(Exception, match="authentication failed|invalid auth"):
            await bad.get(b"/auth/k")
    finally:
        await good.close()
        await bad.close()
