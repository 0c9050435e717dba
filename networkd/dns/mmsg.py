"""Many datagrams per system call: Linux recvmmsg(2) and sendmmsg(2).

The DNS hot path spends most of its time in the kernel, one recvfrom and
one sendto per query.  A batch reads up to ``slots`` queries with one call
into fixed buffers, and sends the answers, written in place over the
queries (the ID is already there, the client address too), with one more.
Python's socket module has neither call, so they go through ctypes; where
libc lacks them (not Linux), ``available()`` is False and the caller keeps
its recvfrom/sendto loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket

MSG_DONTWAIT = 0x40
MSG_TRUNC = 0x20


class IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class MsgHdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", MsgHdr), ("msg_len", ctypes.c_uint)]


def _libc_calls():
    if os.uname().sysname != "Linux":
        return None
    for name in ("libc.so.6", ctypes.util.find_library("c")):  # glibc first: find_library may run ldconfig
        if not name:
            continue
        try:
            libc = ctypes.CDLL(name, use_errno=True)
            recvmmsg, sendmmsg = libc.recvmmsg, libc.sendmmsg
        except (OSError, AttributeError):
            continue
        recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
        sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
        recvmmsg.restype = sendmmsg.restype = ctypes.c_int
        return recvmmsg, sendmmsg
    return None


_CALLS = _libc_calls()


def available() -> bool:
    return _CALLS is not None


class DatagramBatch:
    """Fixed buffers for ``slots`` datagrams of up to ``size`` bytes each.

    After ``receive`` returns n, datagram i is ``data[offset(i):offset(i) +
    lengths(n)[i]]`` and its sender's address (a sockaddr) is in ``names`` at
    ``i * namesize`` (the address alone: ``senders(n)[i]``).  ``raw`` is the
    same buffer as a ctypes array: ``raw[a:b]`` copies bytes out in about a
    third of the time ``bytes(data[a:b])`` takes (writes go through ``data``).
    ``send(start, stop)`` sends slots start..stop-1 back to their senders,
    each with the byte count set by ``set_reply_length``.
    """

    def __init__(self, sock: socket.socket, slots: int = 64, size: int = 4096):
        if _CALLS is None:
            raise OSError(errno.ENOSYS, "recvmmsg/sendmmsg are not available")
        self.sock = sock
        self.slots = slots
        self.size = size
        self.namesize = 28 if sock.family == socket.AF_INET6 else 16  # sockaddr_in6 / sockaddr_in
        self._address_span = (8, 24) if sock.family == socket.AF_INET6 else (4, 8)  # the address in it
        self._buffers = (ctypes.c_char * (slots * size))()
        self._names = (ctypes.c_char * (slots * self.namesize))()
        self._recv_iov = (IoVec * slots)()
        self._send_iov = (IoVec * slots)()
        self._recv = (MMsgHdr * slots)()
        self._send = (MMsgHdr * slots)()
        base, names = ctypes.addressof(self._buffers), ctypes.addressof(self._names)
        for i in range(slots):
            self._recv_iov[i].iov_base = self._send_iov[i].iov_base = base + i * size
            self._recv_iov[i].iov_len = size
            for headers, iov in ((self._recv, self._recv_iov), (self._send, self._send_iov)):
                header = headers[i].msg_hdr
                header.msg_name = names + i * self.namesize
                header.msg_namelen = self.namesize
                header.msg_iov = ctypes.addressof(iov[i])
                header.msg_iovlen = 1
        self.data = memoryview(self._buffers).cast("B")
        self.raw = self._buffers
        self.names = memoryview(self._names).cast("B")
        stride = ctypes.sizeof(MMsgHdr) // 4
        self._lengths = memoryview(self._recv).cast("B").cast("I")
        self._length_index = [i * stride + MMsgHdr.msg_len.offset // 4 for i in range(slots)]
        self._flags_index = [i * stride + MsgHdr.msg_flags.offset // 4 for i in range(slots)]
        size_t = "Q" if ctypes.sizeof(ctypes.c_size_t) == 8 else "I"
        self._reply_lengths = memoryview(self._send_iov).cast("B").cast(size_t)  # [base, len] per iovec
        self._recv_ptr = ctypes.addressof(self._recv)
        self._send_base = ctypes.addressof(self._send)
        self._header_size = ctypes.sizeof(MMsgHdr)
        self._recvmmsg, self._sendmmsg = _CALLS

    def offset(self, i: int) -> int:
        return i * self.size

    def lengths(self, n: int) -> list:
        """Byte counts of the first n datagrams; -1 for one cut short by the buffer."""
        values, index, flags = self._lengths, self._length_index, self._flags_index
        return [-1 if values[flags[i]] & MSG_TRUNC else values[index[i]] for i in range(n)]

    def senders(self, n: int) -> list:
        """The packed address (4 or 16 bytes) each of the first n datagrams came from."""
        size, (start, stop) = self.namesize, self._address_span
        names = self._names[:n * size]
        return [names[i * size + start:i * size + stop] for i in range(n)]

    def receive(self) -> int:
        """How many datagrams were read (0 when none are waiting)."""
        n = self._recvmmsg(self.sock.fileno(), self._recv_ptr, self.slots, MSG_DONTWAIT, None)
        if n < 0:
            code = ctypes.get_errno()
            if code in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                return 0
            raise OSError(code, os.strerror(code))
        return n

    def set_reply_length(self, i: int, length: int) -> None:
        self._reply_lengths[2 * i + 1] = length

    def send(self, start: int, stop: int) -> int:
        """Send slots start..stop-1 to their senders; how many went.  One the
        kernel refuses (send buffer full, unreachable) is skipped, as a lost
        datagram would be: the client asks again."""
        fd, sent, i = self.sock.fileno(), 0, start
        while i < stop:
            n = self._sendmmsg(fd, self._send_base + i * self._header_size, stop - i, MSG_DONTWAIT)
            if n > 0:
                sent += n
                i += n
            elif ctypes.get_errno() != errno.EINTR:
                i += 1
        return sent
