"""What ``/v1/status`` says of the peer channel and the failsafe (networkd.peers.failsafe). Read-only."""

from __future__ import annotations

from networkd.peers.failsafe import DRIFT


def peer_status(failsafe) -> dict:
    now = failsafe.clock()
    covering = failsafe.covering()
    channel = failsafe.channel
    return {
        "failsafe": "on" if failsafe.enabled else "off", "why": failsafe.off_reason,
        "listen": channel.address if channel is not None else None,
        "keeping": sorted(failsafe.vips) if covering is not None else [],
        "deadline_in": None if covering is None else round(covering - now, 2),
        "retaking": failsafe.retaking,
        "holdoff_left": max(0.0, round(failsafe.started_at + failsafe.promise - now, 1)) if failsafe.enabled else 0.0,
        "promises_given": failsafe.promises.view(),
        "promises_held": promises_held(failsafe, now),
        "refused_messages": channel.refused if channel is not None else 0,
    }


def promises_held(failsafe, now: float) -> list[dict]:
    """Per member, how long its newest promise to us still holds (as our deadline counts it)."""
    latest: dict[str, float] = {}
    for current in failsafe.rounds.values():
        for member, granted in current.promised.items():
            latest[member] = max(latest.get(member, 0.0), current.sent + granted * DRIFT - failsafe.slack)
    return [{"from": m, "seconds_left": round(t - now, 2)} for m, t in sorted(latest.items()) if t > now]
