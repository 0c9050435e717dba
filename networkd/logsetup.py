"""Log level: twisted.logger with a filter, debug only with --verbose."""

from __future__ import annotations

from twisted.logger import LogLevel, LogLevelFilterPredicate, FilteringLogObserver, globalLogPublisher

_installed = False


def filter_debug_logs(verbose: bool) -> None:
    """Drop debug events unless ``verbose``, by wrapping the observers twistd set up."""
    global _installed
    if _installed or verbose:
        return
    _installed = True
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
    # Wrap every existing observer behind the level filter.  twistd sets its
    # observers up itself and offers no level option; _observers is the only
    # handle on them (covered by tests/test_daemon.py).
    observers = list(getattr(globalLogPublisher, "_observers", []))
    for observer in observers:
        globalLogPublisher.removeObserver(observer)
        globalLogPublisher.addObserver(FilteringLogObserver(observer, [predicate]))
