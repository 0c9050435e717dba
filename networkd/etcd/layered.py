"""A prefix's current values, handed out as immutable mappings without copying them whole.

Every snapshot of a prefix must stay as it was when published, but copying
40,000 domains for each put costs ~1 ms, the most of a put once the zone is
updated key by key (issue 13).  So the values are a base dict that is never
changed once published, under a small dict of the changes since then; a
snapshot gets a copy of the small one only (``Layered``).  When the changes
grow past an eighth of the base they are merged into a new base, so a
lookup stays two dict probes and the copying stays O(1) per change on
average.  Small prefixes (most of them) get a plain copy every time.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

SMALL = 4096  # below this many keys a plain copy is cheap: no layers
_GONE = object()  # a deleted key in the changes


class Layered(Mapping):
    """``base`` with ``top`` (key -> value, or _GONE) over it; neither is changed again."""

    __slots__ = ("_base", "_top", "_len")

    def __init__(self, base: dict, top: dict):
        self._base, self._top = base, top
        size = len(base)
        for key, value in top.items():
            size += (value is not _GONE) - (key in base)
        self._len = size

    def __getitem__(self, key):
        value = self._top.get(key, self)
        if value is self:
            return self._base[key]
        if value is _GONE:
            raise KeyError(key)
        return value

    def get(self, key, default=None):
        value = self._top.get(key, self)
        if value is self:
            return self._base.get(key, default)
        return default if value is _GONE else value

    def __contains__(self, key) -> bool:
        value = self._top.get(key, self)
        return key in self._base if value is self else value is not _GONE

    def __iter__(self):
        top, base = self._top, self._base
        for key in base:
            if key not in top:
                yield key
        for key, value in top.items():
            if value is not _GONE:
                yield key

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"Layered({len(self)} keys, {len(self._top)} changed)"


class LiveValues:
    """The values as they are now: changed key by key, published with ``frozen()``."""

    def __init__(self):
        self._base: dict = {}
        self._top: dict = {}

    def put(self, key: str, value: str) -> None:
        self._top[key] = value

    def delete(self, key: str) -> None:
        if key in self._base:
            self._top[key] = _GONE
        else:
            self._top.pop(key, None)

    def replace(self, values: dict) -> None:
        """All values at once (a whole read); ``values`` is owned from now on."""
        self._base, self._top = values, {}

    def as_dict(self) -> dict:
        """The values as a dict (merges the changes in: a whole read's comparison)."""
        self._merge()
        return self._base

    def frozen(self) -> Mapping:
        """An immutable mapping of the values now, for a Snapshot."""
        if self._top and (len(self._base) < SMALL or len(self._top) * 8 > len(self._base)):
            self._merge()
        if not self._top:
            return MappingProxyType(self._base)
        return Layered(self._base, dict(self._top))

    def _merge(self) -> None:
        if self._top:
            base = dict(self._base)  # the old one may be in a published snapshot: never change it
            for key, value in self._top.items():
                if value is _GONE:
                    base.pop(key, None)
                else:
                    base[key] = value
            self._base, self._top = base, {}
