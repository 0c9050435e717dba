"""Metric families of one sample per VIP, written as Prometheus text without prometheus_client's per-sample work.

With 1,000 VIP configs ``/metrics`` has ~5,000 per-VIP samples; made as
``Sample`` tuples with a label dict each and formatted by ``generate_latest``
(label names validated and escaped per sample) they cost ~30 ms of CPU a
scrape.  A ``RowFamily`` holds plain rows, ``(label values, value)``, and
``write`` formats them a piece at a time: the label names are sorted once
per family into one format string, and each line's name and labels can be
kept from the last scrape.  The bytes are
``generate_latest``'s (the tests compare the two); its ``samples`` are still
there, made only when something asks for them (``generate_latest``, the
tests' reference, another registry user).
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

from prometheus_client import generate_latest
from prometheus_client.core import Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

Row = tuple  # (tuple of label values in ``labels`` order, value)


class RowFamily(Metric):
    """A gauge or counter family given as rows; ``name`` without ``_total`` for a counter (as
    CounterMetricFamily takes it)."""

    def __init__(self, name: str, documentation: str, typ: str, labels: Sequence[str], rows: Sequence[Row]):
        if typ not in ("gauge", "counter"):
            raise ValueError(f"RowFamily is for gauges and counters, not {typ}")
        if typ == "counter" and name.endswith("_total"):
            name = name[:-len("_total")]
        super().__init__(name, documentation, typ)
        self.labels = tuple(labels)
        self.rows = rows

    @property
    def sample_name(self) -> str:
        return self.name + "_total" if self.type == "counter" else self.name

    @property
    def samples(self) -> list[Sample]:
        """As CounterMetricFamily/GaugeMetricFamily would hold them (made on each access)."""
        name, labels = self.sample_name, self.labels
        return [Sample(name, dict(zip(labels, values)), value, None, None) for values, value in self.rows]

    @samples.setter
    def samples(self, value) -> None:  # Metric.__init__ sets an empty list: the rows are the samples
        pass

    def header(self) -> bytes:
        """The HELP and TYPE lines, written by generate_latest itself (its escaping of the help text)."""
        return generate_latest(OneFamily(Metric(self.name, self.documentation, self.type)))

    def write(self, piece: int, kept: dict | None = None) -> Iterator[bytes]:
        """The family's text: the header, then ``piece`` lines a chunk.  ``kept`` (name -> {label
        values: line prefix}) keeps each line's name and labels from one scrape to the next (the VIPs
        rarely change; their values do): only this scrape's rows stay in it."""
        yield self.header()
        labels, name = self.labels, self.sample_name
        # generate_latest writes the labels sorted by name
        fields = ",".join(f'{labels[i]}="{{{i}}}"' for i in sorted(range(len(labels)), key=labels.__getitem__))
        template = f"{name}{{{{{fields}}}}} " if fields else f"{name} "
        old = {} if kept is None else kept.get(name, {})
        new, lines, made = {}, [], 0
        for n, (values, value) in enumerate(self.rows, 1):
            prefix = old.get(values)
            if prefix is None:
                prefix, made = template.format(*map(_escape, values)), made + 1
            new[values] = prefix
            lines.append(f"{prefix}{_number(value)}\n")
            if not n % piece:
                yield "".join(lines).encode()
                lines = []
        if lines:
            yield "".join(lines).encode()
        if kept is not None and (made or len(new) != len(old)):  # else the old dict stays (it is older)
            kept[name] = new


def _number(value) -> str:
    """floatToGoString(value), without its work for the two values most per-VIP samples have."""
    if type(value) is float:
        if value == 1.0:
            return "1.0"
        if value == 0.0 and math.copysign(1.0, value) > 0:  # not -0.0 (written "-0.0")
            return "0.0"
    return floatToGoString(value)


def _escape(value) -> str:
    """A label value as the text format quotes it (as prometheus_client does)."""
    value = str(value)
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')
    return value


class OneFamily:
    """A registry of one metric family, for generate_latest."""

    def __init__(self, family):
        self._family = family

    def collect(self):
        yield self._family
