"""This node's health for each floating VIP it could carry (issue 11): its probes, memoized per snapshot.

The VIP manager calls ``sync()`` on every pass; the targets are derived again
only when the configs or the pod groups changed (networkd.vips.wants), and
only for floating VIPs whose container is on this node.  ``local(ip)``:
True (every target up, or nothing to probe), False (a target is down), None
(undecided: not yet ``rise`` successes nor ``fall`` failures).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from networkd.vips.planner import local_container
from networkd.vips.probes import Prober, Target, targets_of


@dataclass(frozen=True)
class ProbeSettings:
    interval: float = 1.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3


def probe_settings(options) -> ProbeSettings | None:
    """From the command line (networkd.options); None with ``--vip-probe off``."""
    if options["vip-probe"] != "on":
        return None
    return ProbeSettings(options["vip-probe-interval"], options["vip-probe-timeout"],
                         options["vip-probe-rise"], options["vip-probe-fall"])


class VipHealth:
    def __init__(self, reactor, inputs, wants, hostname: str, settings: ProbeSettings | None,
                 changed: Callable[[], None]):
        self._inputs, self._wants, self._hostname = inputs, wants, hostname
        self.settings = settings
        self.prober = None if settings is None else Prober(
            reactor, interval=settings.interval, timeout=settings.timeout, rise=settings.rise, fall=settings.fall,
            changed=changed)
        self.targets: dict[str, tuple[Target, ...]] = {}  # floating VIP ip -> what is probed for it here
        self._memo: tuple = (None, None)

    def sync(self) -> None:
        """Probe the targets of the floating VIPs placeable here (nothing when probing is off)."""
        inputs = self._inputs
        if self.prober is None or (self._memo[0] is inputs.configs and self._memo[1] is inputs.containers):
            return
        targets = {}
        placeable = self._wants.placeable()
        for config in inputs.configs.values():
            if config.floating and config.ip in placeable:
                targets[config.ip] = targets_of(config, local_container(config, inputs.containers, self._hostname))
        self.targets = targets
        self.prober.track(t for ts in targets.values() for t in ts)
        self._memo = (inputs.configs, inputs.containers)

    def local(self, ip: str) -> bool | None:
        """This node's probe verdict for ``ip`` (True when nothing is probed)."""
        if self.prober is None:
            return True
        verdicts = [self.prober.up(t) for t in self.targets.get(ip, ())]
        if False in verdicts:
            return False
        return None if None in verdicts else True

    def why(self, ip: str) -> str | None:
        """The last error of a down target of ``ip``, for the log and the API."""
        if self.prober is None:
            return None
        for target in self.targets.get(ip, ()):
            state = self.prober.states.get(target)
            if state is not None and state.up is False:
                return f"probe {target}: {state.last_error}"
        return None

    def stop(self) -> None:
        if self.prober is not None:
            self.prober.stop()
        self._memo = (None, None)
