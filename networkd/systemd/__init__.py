"""Running under systemd: the sd_notify protocol (``notify``), the DNS self-probe
behind the watchdog (``probe``) and the service that says READY, STATUS,
STOPPING and WATCHDOG (``service``)."""
