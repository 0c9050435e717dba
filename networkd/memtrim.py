"""Once start-up is over, the C heap's free pages go back to the kernel.

Start-up makes much that it drops again: the first etcd snapshots (a
protobuf message of every key, then their text), the zone built from them
in slices, the imports' temporary objects.  glibc keeps the memory freed
inside its heap for later allocations; ``malloc_trim(0)`` returns the whole
free pages among it to the kernel (``madvise(MADV_DONTNEED)``), which took
the daemon's RSS down by ~1.3 MB with 10,000 domains (docs/benchmarks.md, "Memory").  Once
only, ``TRIM_AFTER`` seconds after the reactor started (the domains are
answered within ~1 s, the VIPs held within ~1 s): no timer at rest.  Not
glibc (musl): nothing to do.
"""

from __future__ import annotations

import ctypes

from twisted.logger import Logger

log = Logger()

TRIM_AFTER = 10.0  # seconds after the reactor started


def malloc_trim() -> bool | None:
    """``malloc_trim(0)``: True if memory went back to the kernel, None without glibc's."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim  # glibc's name: no find_library (it may run ldconfig)
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))


def trim_after_startup(reactor, after: float = TRIM_AFTER, trim=malloc_trim):
    """Trim the heap once, ``after`` seconds from now; the DelayedCall."""
    def run():
        released = trim()
        log.debug("start-up over: malloc_trim {done}",
                  done="is not glibc's" if released is None else "released memory" if released else "had nothing")

    return reactor.callLater(after, run)
