"""Skip tests that need root or network namespaces, unless CI demands them."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

REQUIRE = os.environ.get("NETWORKD_REQUIRE_PRIVILEGED") == "1"


def _can_make_netns() -> str | None:
    """None if we may create network namespaces, else the reason we may not."""
    if os.geteuid() != 0:
        return "needs root"
    name = f"nd-probe-{uuid.uuid4().hex[:6]}"
    try:
        made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    except FileNotFoundError:
        return "iproute2 (ip) is not installed"
    if made.returncode != 0:
        return f"cannot create network namespaces: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


_reason: str | None | bool = False


def privileged_reason() -> str | None:
    global _reason
    if _reason is False:
        _reason = _can_make_netns()
    return _reason


def require_privileged() -> None:
    """Skip (or, with NETWORKD_REQUIRE_PRIVILEGED=1, fail) without root and netns."""
    reason = privileged_reason()
    if reason is None:
        return
    if REQUIRE:
        pytest.fail(f"privileged test cannot run: {reason} (NETWORKD_REQUIRE_PRIVILEGED=1)")
    pytest.skip(reason)
