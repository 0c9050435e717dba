"""Collect what networkd logs during a test, as formatted lines."""

from __future__ import annotations

from twisted.logger import formatEvent, globalLogPublisher


class LogCapture:
    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, event):
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
