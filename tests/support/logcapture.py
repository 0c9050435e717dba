"""Collect what networkd logs during a test, as formatted lines."""

from __future__ import annotations

from twisted.logger import formatEvent, globalLogPublisher


class LogCapture:
    def __init__(self):
        self.lines: list[str] = []
        self.events: list[dict] = []

    def __call__(self, event):
        self.events.append(event)
        self.lines.append(formatEvent(event))

    def __enter__(self):
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self)

    def has(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def matching(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]

    def at_level(self, *levels: str) -> list[str]:
        """Lines logged at these levels (``"warn"``, ``"error"``, ``"critical"``), with a failure's traceback."""
        return [line + ("\n" + event["log_failure"].getTraceback() if "log_failure" in event else "")
                for event, line in zip(self.events, self.lines)
                if getattr(event.get("log_level"), "name", None) in levels]
