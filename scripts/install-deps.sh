#!/usr/bin/env bash
# Install the Debian packages networkd's tests and demo need, if any is missing.
set -euo pipefail

declare -A need=(
  [etcd]=etcd-server [etcdctl]=etcd-client [ip]=iproute2 [iptables]=iptables
  [iptables-restore]=iptables [arping]=arping [dig]=bind9-dnsutils [dnsperf]=dnsperf
  [dnsmasq]=dnsmasq-base [curl]=curl [taskset]=util-linux
  [rpmbuild]=rpm [rpm2archive]=rpm [systemd-analyze]=systemd [promtool]=prometheus
)
missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1 \
    || missing+=("${need[$cmd]}")
done
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "installing: ${missing[*]}"
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
  SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
# prometheus brings promtool (tests/test_monitoring.py) and a server unit: installing it must not
# start a Prometheus on this machine, so services are kept from starting for the install
# (policy-rc.d, Debian's switch for that), unless the machine already has such a policy.
policy=/usr/sbin/policy-rc.d
own_policy=""
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null && $SUDO chmod 755 "$policy" && own_policy=1
  trap '[ -n "$own_policy" ] && $SUDO rm -f "$policy"' EXIT
fi
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
