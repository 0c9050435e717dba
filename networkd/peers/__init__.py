"""The peer channel and the peer-confirmed failsafe (issue 10 item 2; docs/design.md, "Failsafe")."""
