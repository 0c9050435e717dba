"""Domain names as configured: normalisation and validation.

Names are case-insensitive: everything is lower-cased here, once, when the
data is built ([BUG 32]).  Any syntactically valid name is accepted,
single labels included, so ``*.lain`` works ([BUG 31]).
"""

from __future__ import annotations

import re

_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")


class BadName(ValueError):
    pass


def normalize(name: str) -> str:
    """Lower case, no trailing dot: ``name`` itself when it already is (nearly
    every etcd key), so the zone's tables share the key's string instead of
    holding a copy of each name (~60 bytes a name)."""
    text = name.strip()
    lower = text.lower()
    if lower != text:
        text = lower
    return text.rstrip(".")


def check_name(name: str) -> str:
    """The normalised name, or BadName saying what is wrong."""
    text = normalize(name)
    if not text:
        raise BadName("empty name")
    if len(text) > 253:
        raise BadName("name longer than 253 characters")
    for label in text.split("."):
        if not _LABEL.match(label):
            raise BadName(f"bad label {label!r}")
    return text


def split_wildcard(name: str) -> tuple[str, bool]:
    """``*.lain`` -> (``lain``, True); ``a.lain`` -> (``a.lain``, False)."""
    text = normalize(name)
    if text.startswith("*."):
        return check_name(text[2:]), True
    return check_name(text), False
