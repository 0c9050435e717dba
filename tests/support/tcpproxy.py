"""A TCP proxy on 127.0.0.1 that a test can cut and heal: a network partition
between the daemon and etcd, without stopping etcd."""

from __future__ import annotations

import socket
import threading

from tests.support.ports import free_port


class TCPProxy:
    """Relays connections to ``target_port`` on the host's 127.0.0.1.

    ``listener``: a listening socket to accept on (e.g. one made inside a
    network namespace); by default a new one on 127.0.0.1.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", listener: socket.socket | None = None):
        self.target = (target_host, target_port)
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._cut = False
        self._closed = False
        self._listener = listener or socket.create_server(("127.0.0.1", free_port()), reuse_port=False)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._cut:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
                upstream.settimeout(None)
                # A relay passes on what it got at once: with Nagle, a reply that reached it in two
                # reads waits for the peer's delayed ACK (up to 40 ms) before its second part goes on.
                for s in (client, upstream):
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        """Drop every connection and refuse new ones."""
        self._cut = True
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def heal(self) -> None:
        self._cut = False

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()
