"""UDP queries read and answered many at a time (recvmmsg/sendmmsg), and the
one-by-one recvfrom loop kept for platforms without those calls.

The listener's reader is taken off the event loop while a client queues a
burst, so one read really meets a mixed batch: hot answers, first sightings,
a forwarded name that splits the batch, and garbage.
"""

from __future__ import annotations

import socket
import struct

import pytest
import pytest_twisted
from dnslib import DNSRecord
from twisted.internet import reactor, threads

from networkd.dns import mmsg
from networkd.dns.clients import ClientFilter
from networkd.dns.resolver import Resolver
from networkd.dns.udp import DnsUdpListener
from networkd.dns.zone import build_zone
from tests.support.waiting import eventually

pytestmark = pytest.mark.skipif(not mmsg.available(), reason="recvmmsg/sendmmsg need Linux")


def question(name: str, qid: int, qtype: str = "A") -> bytes:
    record = DNSRecord.question(name, qtype)
    record.header.id = qid
    return bytes(record.pack())


def collect(client: socket.socket, expected: int, timeout: float = 3.0) -> dict:
    """Replies by ID until ``expected`` arrived or the time is up."""
    client.settimeout(timeout)
    replies = {}
    try:
        while len(replies) < expected:
            data = client.recv(65535)
            replies[struct.unpack_from(">H", data)[0]] = DNSRecord.parse(data)
    except socket.timeout:
        pass
    return replies


def collect_all(client: socket.socket, timeout: float = 1.0) -> dict:
    """Every reply until the line goes quiet, by ID (garbage may be answered
    with FORMERR under any ID; replies dnslib cannot parse count as None)."""
    client.settimeout(timeout)
    replies: dict = {}
    try:
        while True:
            data = client.recv(65535)
            try:
                parsed = DNSRecord.parse(data)
            except Exception:
                parsed = None
            replies.setdefault(struct.unpack_from(">H", data)[0] if len(data) >= 2 else None, []).append(parsed)
    except socket.timeout:
        pass
    return replies


def ips(reply: DNSRecord) -> list:
    return sorted(str(rr.rdata) for rr in reply.rr)


@pytest.fixture(params=["batched", "one by one"])
def listener(request, upstream):
    resolver = Resolver(reactor, cache_size=100)
    zone, _ = build_zone({f"h{i}.lain": f'{{"ips": ["10.0.0.{i}"]}}' for i in range(1, 40)}, [],
                         node_ip=None, webrouters=(), ttl=60)
    resolver.set_zone(zone)
    resolver.set_upstreams([(upstream.host, 53)])
    udp = DnsUdpListener(resolver, reactor, "127.0.0.1", 0, batched=request.param == "batched")
    yield udp
    udp.stopListening()


def pause(udp: DnsUdpListener) -> None:
    udp.stopReading()


def resume(udp: DnsUdpListener) -> None:
    udp.startReading()


@pytest_twisted.ensureDeferred
async def test_a_mixed_burst_gets_every_answer_to_its_own_id(listener):
    server = ("127.0.0.1", listener.port)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    try:
        # Warm up: h1..h9 become hot answers.
        pause(listener)
        for i in range(1, 10):
            client.sendto(question(f"h{i}.lain", i), server)
        listener.doRead()
        warm = await threads.deferToThread(collect, client, 9)
        assert {qid: ips(r) for qid, r in warm.items()} == {i: [f"10.0.0.{i}"] for i in range(1, 10)}

        expected = {}
        burst = []
        for i in range(1, 10):  # hot
            burst.append((100 + i, question(f"H{i}.lain", 100 + i)))
            expected[100 + i] = (f"H{i}.lain.", [f"10.0.0.{i}"])
        burst.append((200, question("example.com", 200)))  # forwarded: answered later
        expected[200] = ("example.com.", ["93.184.216.34"])
        burst.append((None, b"\x01\x02\x03"))  # garbage: no answer
        for i in range(20, 30):  # first sight: the slow path, answered in the same batch
            burst.append((300 + i, question(f"h{i}.lain", 300 + i)))
            expected[300 + i] = (f"h{i}.lain.", [f"10.0.0.{i}"])
        burst.append((None, b"\xff" * 5000))  # larger than a batch slot: dropped
        burst.append((400, question("h1.lain", 400, "AAAA")))  # local NODATA
        expected[400] = ("h1.lain.", [])
        for i in range(1, 10):  # hot again, after everything above
            burst.append((500 + i, question(f"h{i}.lain", 500 + i)))
            expected[500 + i] = (f"h{i}.lain.", [f"10.0.0.{i}"])
        for _, data in burst:
            client.sendto(data, server)
        listener.doRead()
        resume(listener)
        replies = await threads.deferToThread(collect, client, len(expected))

        assert {qid: (str(r.q.qname), ips(r)) for qid, r in replies.items()} == expected
        assert all(r.header.rcode == 0 for r in replies.values())
        assert all(r.header.aa for qid, r in replies.items() if qid != 200), "local answers are authoritative"
        assert listener.resolver.stats.queries[("NOERROR", "local")] == 9 + 9 + 10 + 1 + 9
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_each_client_gets_its_own_answers(listener):
    """Replies go back to the address each query came from, across one batch."""
    server = ("127.0.0.1", listener.port)
    clients = []
    try:
        pause(listener)
        for n, host in enumerate(("127.0.0.1", "127.0.0.2", "127.0.0.3")):
            c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            c.bind((host, 0))
            clients.append(c)
            for k in range(4):
                c.sendto(question(f"h{n * 10 + k + 1}.lain", k), server)
        for _ in range(2):  # the second round is all hot answers
            listener.doRead()
            for n, c in enumerate(clients):
                got = await threads.deferToThread(collect, c, 4)
                assert {qid: ips(r) for qid, r in got.items()} == {
                    k: [f"10.0.0.{n * 10 + k + 1}"] for k in range(4)}, f"client {n}"
                for k in range(4):
                    c.sendto(question(f"h{n * 10 + k + 1}.lain", k), server)
        resume(listener)
        await eventually(lambda: listener.resolver.stats.queries[("NOERROR", "local")] == 36,
                         message="the last round answered")
    finally:
        for c in clients:
            c.close()


def test_batch_reads_senders_lengths_and_replies_in_place():
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.setblocking(False)
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        batch = mmsg.DatagramBatch(server, slots=4, size=64)
        assert batch.receive() == 0, "nothing waiting"
        a.sendto(b"first", server.getsockname())
        b.sendto(b"x" * 100, server.getsockname())  # does not fit a 64-byte slot
        a.sendto(b"third", server.getsockname())
        n = batch.receive()
        assert n == 3
        assert batch.lengths(n) == [5, -1, 5]
        assert bytes(batch.data[0:5]) == b"first" and bytes(batch.data[128:133]) == b"third"
        for i in (0, 1, 2):
            reply = b"reply %d" % i
            batch.data[batch.offset(i):batch.offset(i) + len(reply)] = reply
            batch.set_reply_length(i, len(reply))
        assert batch.send(0, 3) == 3
        a.settimeout(2)
        b.settimeout(2)
        assert sorted([a.recv(100), a.recv(100)]) == [b"reply 0", b"reply 2"]
        assert b.recv(100) == b"reply 1"
    finally:
        for s in (server, a, b):
            s.close()


@pytest_twisted.ensureDeferred
async def test_random_garbage_in_batches_leaves_the_server_answering(listener):
    """Thousands of random datagrams (empty ones, headers only, mangled
    queries, oversized) mixed with real questions: every real question is
    answered, nothing stops the reader."""
    import random

    rng = random.Random(4242)
    good = question("h5.lain", 7)
    server = ("127.0.0.1", listener.port)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    try:
        def garbage() -> bytes:
            kind = rng.randrange(5)
            if kind == 0:
                return b""
            if kind == 1:
                return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 13)))
            if kind == 2:  # a real query with a few bytes flipped
                data = bytearray(good)
                for _ in range(rng.randrange(1, 4)):
                    data[rng.randrange(2, len(data))] = rng.randrange(256)
                return bytes(data)
            if kind == 3:
                return good[:rng.randrange(2, len(good))]
            return bytes(rng.randrange(256) for _ in range(rng.randrange(13, 6000)))

        for rounds in range(5):
            pause(listener)
            ids = []
            for k in range(400):
                if k % 40 == 0:
                    qid = 1000 + rounds * 100 + k // 40
                    client.sendto(question(f"h{k // 40 + 1}.lain", qid), server)
                    ids.append(qid)
                else:
                    client.sendto(garbage(), server)
            listener.doRead()
            listener.doRead()
            resume(listener)
            replies = await threads.deferToThread(collect_all, client)
            for qid in ids:
                n = qid - 1000 - rounds * 100 + 1
                assert any(r is not None and str(r.q.qname) == f"h{n}.lain." and ips(r) == [f"10.0.0.{n}"]
                           for r in replies.get(qid, [])), qid
        final = await threads.deferToThread(
            lambda: (client.sendto(question("h3.lain", 9999), server), collect(client, 1))[1])
        assert ips(final[9999]) == ["10.0.0.3"]
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_cached_hot_answers_keep_counting_down(listener, upstream):
    """A cached answer on the hot path has its TTLs aged every second, without asking upstream again."""
    from tests.support.waiting import sleep

    server = ("127.0.0.1", listener.port)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))

    async def ask(qid: int) -> int:
        client.sendto(question("Example.COM", qid), server)
        reply = (await threads.deferToThread(collect, client, 1))[qid]
        assert ips(reply) == ["93.184.216.34"] and str(reply.q.qname) == "Example.COM."
        return reply.rr[0].ttl

    try:
        ttls = [await ask(1), await ask(2)]  # forwarded, then from the cache (now a hot answer)
        for qid in (3, 4, 5):
            await sleep(1.05)
            ttls.append(await ask(qid))
            ttls.append(await ask(qid + 10))  # the same second: the same hot bytes
        assert ttls[0] == 300 and ttls[2] < ttls[1] and ttls[4] < ttls[3] and ttls[6] < ttls[5], ttls
        assert all(ttls[i] == ttls[i + 1] or ttls[i] - 1 == ttls[i + 1] for i in (2, 4, 6)), ttls
        assert ttls[-1] >= 300 - 5
        assert upstream.names_asked() == ["example.com"], "one question upstream"
        assert listener.resolver.stats.queries[("NOERROR", "cache")] == 7
    finally:
        client.close()


class OnlyThese(ClientFilter):
    """Admits exactly the listed addresses, loopback or not, so that a test
    can refuse a sender on 127.0.0.0/8."""

    def __init__(self, admitted: set):
        super().__init__()
        self.admitted = admitted

    def decide(self, ip) -> bool:
        return str(ip) in self.admitted


def summary(replies: dict) -> dict:
    """{qid: (rcode, addresses)} of the replies collect_all gathered."""
    return {qid: [(r.header.rcode, ips(r)) for r in got] for qid, got in replies.items()}


@pytest.mark.parametrize("host, senders, admitted", [
    ("127.0.0.1", ("127.0.0.1", "127.0.0.2", "127.0.0.3"), {"127.0.0.1", "127.0.0.2"}),
    ("::1", ("::1",), {"::1"}),
    ("::1", ("::1",), set()),
])
@pytest_twisted.ensureDeferred
async def test_both_read_paths_admit_and_refuse_alike(upstream, host, senders, admitted):
    """The batched reader and the one-by-one reader go by the same
    ClientFilter.verdicts: a refused sender gets REFUSED (or nothing, for
    garbage) even for a question that is a hot answer for everyone else."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    outcomes, counts = {}, {}
    for mode in ("batched", "one by one"):
        clients = OnlyThese(set(senders))
        resolver = Resolver(reactor, cache_size=100, client_filter=clients)
        zone, _ = build_zone({f"h{i}.lain": f'{{"ips": ["10.0.0.{i}"]}}' for i in (1, 2)}, [],
                             node_ip=None, webrouters=(), ttl=60)
        resolver.set_zone(zone)
        resolver.set_upstreams([(upstream.host, 53)])
        try:
            udp = DnsUdpListener(resolver, reactor, host, 0, batched=mode == "batched")
        except OSError as e:
            pytest.skip(f"no {host} here: {e}")
        sockets = {}
        try:
            for sender in senders:
                sockets[sender] = socket.socket(family, socket.SOCK_DGRAM)
                sockets[sender].bind((sender, 0))
            server = (host, udp.port)
            warm = sockets[senders[0]]  # h1.lain and example.com become hot answers
            for qid, name in ((1, "h1.lain"), (2, "example.com"), (3, "example.com")):
                warm.sendto(question(name, qid), server)
                assert ips((await threads.deferToThread(collect, warm, 1))[qid]), name
            clients.admitted = set(admitted)
            clients.verdicts.clear()

            pause(udp)
            for sock in sockets.values():
                sock.sendto(question("h1.lain", 10), server)  # a hot local answer
                sock.sendto(question("example.com", 11), server)  # a hot cached answer
                sock.sendto(question("h2.lain", 12), server)  # first sight: the slow path
                sock.sendto(question("h2.lain", 13)[:4] + b"\x00\x02" + question("h2.lain", 13)[6:], server)  # FORMERR
            udp.doRead()
            resume(udp)
            outcomes[mode] = {sender: summary(await threads.deferToThread(collect_all, sock, 0.5))
                              for sender, sock in sockets.items()}
            counts[mode] = dict(resolver.stats.queries)
        finally:
            udp.stopListening()
            for sock in sockets.values():
                sock.close()

    answered = {10: [(0, ["10.0.0.1"])], 11: [(0, ["93.184.216.34"])], 12: [(0, ["10.0.0.2"])], 13: [(1, [])]}
    refused = {10: [(5, [])], 11: [(5, [])], 12: [(5, [])]}
    expected = {sender: answered if sender in admitted else refused for sender in senders}
    assert outcomes["batched"] == expected
    assert outcomes["one by one"] == expected
    assert counts["batched"] == counts["one by one"]
