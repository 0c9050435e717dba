"""Socket activation (packaging/rpm/networkd.socket): a restart loses no query.

The test process plays systemd: it holds the UDP and TCP sockets of the DNS
address and starts the daemon on them (LISTEN_FDS, LISTEN_PID, fds 3 and 4)
through a tiny exec wrapper, so LISTEN_PID is the daemon's own pid.  A
client sends queries for a name kept in etcd at about 1,000/s while the
daemon is stopped (SIGTERM) and started again on the same sockets, twice.
The client never retries: a query is lost unless its first datagram is
answered.  For contrast, the same restart of a daemon that binds the
address itself loses the queries sent while nothing listens.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

from dnslib import QTYPE, DNSRecord

from networkd.systemd import activation
from tests.support.daemon import REPO, TWISTD
from tests.support.dnsstub import random_loopback_host
from tests.support.ports import free_port

NAME, ADDRESS = "a.lain", "10.0.0.9"

# Moves the passed fds to 3, 4, ... (as systemd does), sets LISTEN_PID to its
# own pid, which exec keeps, and execs twistd.
WRAPPER = """
import fcntl, os, sys
fds = [int(fd) for fd in os.environ.pop("TEST_PASS_FDS").split(",") if fd]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
if fds:
    os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[1], sys.argv[1:])
"""


class Node:
    """The daemon's files and (with ``activated``) the sockets systemd would hold."""

    def __init__(self, etcd_server, etcd_root, activated: bool):
        self.host = random_loopback_host()
        self.workdir = tempfile.mkdtemp(prefix="networkd-activation-")
        self.resolv = os.path.join(self.workdir, "resolv.conf")
        with open(self.resolv, "w") as f:
            f.write("nameserver 127.0.0.1\n")  # never asked: the name is local
        self.log_path = os.path.join(self.workdir, "networkd.log")
        self.args = [
            "--etcd", etcd_server.endpoint, "--etcd-root", etcd_root,
            "--dns-listen", f"{self.host}:53", "--api-listen", f"127.0.0.1:{free_port()}",
            "--no-vips", "--node-ip", "10.1.1.1", "--resolv-conf", self.resolv,
            "--systemd-resolv-conf", os.path.join(self.workdir, "systemd-resolv.conf"),
        ]
        self.sockets = []
        if activated:
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE, as the unit's ReceiveBuffer=4M
            udp.bind((self.host, 53))
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((self.host, 53))
            tcp.listen(128)
            self.sockets = [udp, tcp]
        self.process = None
        self.kept: list = []  # after each stop: is our nameserver line still in resolv.conf?

    def start(self) -> None:
        fds = [s.fileno() for s in self.sockets]
        env = {**os.environ, "PYTHONPATH": REPO, "PYTHONUNBUFFERED": "1", "TEST_PASS_FDS": ",".join(map(str, fds))}
        if fds:
            env.update(LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=":".join(["dns"] * len(fds)))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", WRAPPER, TWISTD, "--nodaemon", "--pidfile=", "networkd", *self.args],
                cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, env=env, pass_fds=fds,
            )

    def wait_answering(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            if answer_of(self.host, NAME) == [ADDRESS]:
                return
            time.sleep(0.05)
        raise AssertionError(f"no answer for {NAME}:\n{self.log()}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(20)

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        for sock in self.sockets:
            sock.close()


def answer_of(host: str, name: str, timeout: float = 0.5):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(DNSRecord.question(name).pack(), (host, 53))
        try:
            reply = DNSRecord.parse(s.recv(4096))
        except (OSError, socket.timeout):
            return None
        return [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A]


class Client:
    """Queries for NAME at ``rate``/s, each once (no retry), from one UDP socket;
    ``phase`` tags each query with the restart it was sent in."""

    def __init__(self, host: str, rate: int = 1000):
        self.target = (host, 53)
        self.interval = 1.0 / rate
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.sent: dict = {}  # query id -> phase
        self.answered: set = set()
        self.right: set = set()
        self.phase = 0
        self._sending = threading.Event()
        self._receiving = threading.Event()
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._receive, daemon=True)]

    def start(self) -> None:
        self._sending.set()
        self._receiving.set()
        for thread in self._threads:
            thread.start()

    def _send(self) -> None:
        query = bytearray(DNSRecord.question(NAME).pack())
        next_at, i = time.monotonic(), 0
        while self._sending.is_set() and i < 65536:
            struct.pack_into(">H", query, 0, i)
            self.sent[i] = self.phase
            self.sock.sendto(query, self.target)
            i += 1
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def _receive(self) -> None:
        while self._receiving.is_set():
            try:
                data = self.sock.recv(4096)
            except (socket.timeout, ConnectionRefusedError):
                continue
            reply = DNSRecord.parse(data)
            self.answered.add(reply.header.id)
            if [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A] == [ADDRESS]:
                self.right.add(reply.header.id)

    def finish(self, wait: float = 10.0) -> None:
        """Stop sending; give the last queries ``wait`` seconds for their answers."""
        self._sending.clear()
        self._threads[0].join(5)
        deadline = time.monotonic() + wait
        while len(self.answered) < len(self.sent) and time.monotonic() < deadline:
            time.sleep(0.1)
        self._receiving.clear()
        self._threads[1].join(5)
        self.sock.close()

    def report(self) -> dict:
        """phase -> (sent, answered, answered with ADDRESS)."""
        out: dict = {}
        for qid, phase in self.sent.items():
            sent, answered, right = out.get(phase, (0, 0, 0))
            out[phase] = (sent + 1, answered + (qid in self.answered), right + (qid in self.right))
        return out


def restarts(etcd_server, etcd_root, activated: bool, count: int):
    """Run the node, restart it ``count`` times under load; the client's report and the node."""
    etcd_server.put(f"{etcd_root}/config/domains/{NAME}", f'{{"ips": ["{ADDRESS}"]}}')
    node = Node(etcd_server, etcd_root, activated)
    tcp_answers = []
    try:
        node.start()
        node.wait_answering()
        client = Client(node.host)
        client.start()
        time.sleep(1.0)
        for n in range(1, count + 1):
            client.phase = n
            node.stop()
            with open(node.resolv) as f:
                node.kept.append(f"nameserver {node.host}" in f.read())
            tcp = tcp_query(node.host) if activated else None  # waits in the held socket's backlog
            node.start()
            if tcp is not None:
                tcp_answers.append(tcp_answer(tcp))
            node.wait_answering()
            time.sleep(1.0)
        client.phase = count + 1
        time.sleep(0.5)
        client.finish()
        return client.report(), node, tcp_answers
    finally:
        node.stop() if node.process and node.process.poll() is None else None
        node.close()


def tcp_query(host: str) -> socket.socket:
    s = socket.create_connection((host, 53), timeout=20)
    query = DNSRecord.question(NAME).pack()
    s.sendall(struct.pack(">H", len(query)) + query)
    return s


def tcp_answer(s: socket.socket):
    with s:
        length = struct.unpack(">H", s.recv(2, socket.MSG_WAITALL))[0]
        reply = DNSRecord.parse(s.recv(length, socket.MSG_WAITALL))
    return [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A]


def test_restart_on_passed_sockets_loses_no_query(etcd_server, etcd_root, capsys):
    report, node, tcp_answers = restarts(etcd_server, etcd_root, activated=True, count=2)
    with capsys.disabled():
        print(f"\nsocket-activated restarts, phase: (sent, answered, answered {ADDRESS}): {report}")
    log = node.log()
    assert log.count("serving the UDP socket passed by systemd") == 3, log
    assert log.count("serving the TCP socket passed by systemd") == 3, log
    assert "binding UDP" not in log and "binding TCP" not in log, log
    sent = sum(s for s, _, _ in report.values())
    answered = sum(a for _, a, _ in report.values())
    assert sent > 1000 and all(report.get(phase) for phase in (1, 2)), report
    assert answered == sent, f"{sent - answered} of {sent} queries lost: {report}"
    assert tcp_answers == [[ADDRESS], [ADDRESS]], "a TCP query sent while the daemon was down is answered after"
    # The nameserver line stayed across each clean stop: the socket stays, queries wait.
    assert node.kept == [True, True], log
    assert "(socket activation: networkd.socket stays)" in log and "removed nameserver" not in log, log
    assert "Traceback" not in log, log


def test_restart_binding_itself_loses_queries(etcd_server, etcd_root, capsys):
    """The contrast: without passed sockets the queries of the restart gap are refused."""
    report, node, _ = restarts(etcd_server, etcd_root, activated=False, count=1)
    with capsys.disabled():
        print(f"\nrestart binding itself, phase: (sent, answered, answered {ADDRESS}): {report}")
    assert "binding UDP" in node.log()
    sent, answered, _ = report[1]
    assert answered < sent, report
    assert node.kept == [False], "without the socket, a clean stop takes our line out"


def test_passed_sockets_are_ours_only_and_unset():
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "dns:dns", "PATH": "/bin"}
    assert activation.passed_sockets(env) == []
    assert env == {"PATH": "/bin"}, "unset even when not ours, so no child inherits them"
    env = {"LISTEN_PID": "x", "LISTEN_FDS": "2"}
    assert activation.passed_sockets(env) == [] and env == {}
    assert activation.passed_sockets({}) == []


def test_take_matches_type_and_address():
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    udp.bind(("127.0.0.1", 0))
    tcp.bind(("127.0.0.1", 0))
    try:
        sockets = [tcp, udp]
        port = udp.getsockname()[1]
        assert activation.take(sockets, socket.SOCK_DGRAM, "127.0.0.2", port) is None
        assert activation.take(sockets, socket.SOCK_DGRAM, "127.0.0.1", port) is udp
        assert sockets == [tcp]
        assert activation.take(sockets, socket.SOCK_STREAM, "127.0.0.1", tcp.getsockname()[1]) is tcp
        assert sockets == []
        assert activation.describe(tcp).startswith("TCP 127.0.0.1:")
    finally:
        udp.close()
        tcp.close()


def test_socket_unit_listens_where_the_daemon_does(tmp_path):
    """networkd.socket's listeners are the --dns-listen default; both units verify; the RPM ships it."""
    import shutil

    from networkd.options import Options

    unit = open(os.path.join(REPO, "packaging/rpm/networkd.socket")).read()
    default = next(o[2] for o in Options.optParameters if o[0] == "dns-listen")
    assert f"ListenDatagram={default}\n" in unit and f"ListenStream={default}\n" in unit
    assert "Service=networkd.service" in unit and "RequiredBy=networkd.service" in unit
    spec = open(os.path.join(REPO, "packaging/rpm/networkd.spec")).read()
    assert "%{_unitdir}/networkd.socket\n" in spec and "packaging/rpm/networkd.socket" in spec
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    service = open(os.path.join(REPO, "packaging/rpm/networkd.service")).read()
    (tmp_path / "networkd.service").write_text(service.replace("/opt/networkd/bin/networkd", shutil.which("true")))
    (tmp_path / "networkd.socket").write_text(unit)
    result = subprocess.run([analyze, "verify", str(tmp_path / "networkd.socket"), str(tmp_path / "networkd.service")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
