#!/usr/bin/env bash
# make demo: as root, the VIP demo in network namespaces (scripts/demo_vips.py); otherwise
# a throw-away etcd on 127.0.0.1 and networkd against it, safe for this host.
# It never touches /etc/resolv.conf, /etc/hosts, interfaces or iptables: DNS listens on
# 127.0.0.1:5353, resolv.conf and hosts are temp files, VIPs are off (they need a namespace).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

# As root: the whole job (VIPs moving between namespaced nodes, scripts/demo_vips.py).
# Without root, or without network namespaces, it says so and this DNS-only demo follows.
if [ "$(id -u)" = 0 ]; then
  rc=0
  "$PY" scripts/demo_vips.py || rc=$?
  [ "$rc" = 3 ] || exit "$rc"
else
  echo "networkd demo: not root, so no VIPs (they need network namespaces); the DNS-only demo follows." >&2
fi
DEMO=$(mktemp -d /tmp/networkd-demo.XXXXXX)
ETCD_PORT=${ETCD_PORT:-23790}
DNS_PORT=${DNS_PORT:-5353}
API_PORT=${API_PORT:-3000}
ENDPOINT=http://127.0.0.1:$ETCD_PORT
ETCDCTL="etcdctl --endpoints=$ENDPOINT"
export ETCDCTL_API=3

etcd_pid=""
cleanup() {
  [ -n "$etcd_pid" ] && kill "$etcd_pid" 2>/dev/null && wait "$etcd_pid" 2>/dev/null || true
  rm -rf "$DEMO"
}
trap cleanup EXIT INT TERM

etcd --name demo --data-dir "$DEMO/etcd" \
  --listen-client-urls "$ENDPOINT" --advertise-client-urls "$ENDPOINT" \
  --listen-peer-urls http://127.0.0.1:$((ETCD_PORT + 1)) \
  --initial-advertise-peer-urls http://127.0.0.1:$((ETCD_PORT + 1)) \
  --initial-cluster demo=http://127.0.0.1:$((ETCD_PORT + 1)) \
  --log-level warn >"$DEMO/etcd.log" 2>&1 &
etcd_pid=$!
for _ in $(seq 50); do $ETCDCTL endpoint health >/dev/null 2>&1 && break; sleep 0.2; done

$ETCDCTL put /lain/config/domains/hello.lain '{"ips": ["10.10.0.7"], "type": ""}' >/dev/null
$ETCDCTL put '/lain/config/domains/*.apps.lain' '{"ips": ["10.10.0.8"]}' >/dev/null
$ETCDCTL put /lain/config/domains/node.lain '{"type": "node"}' >/dev/null

# No upstream nameserver: the demo answers its own names only and forwards nothing.
printf '# networkd demo resolv.conf (a temp file)\noptions rotate timeout:1\n' >"$DEMO/resolv.conf"
printf '127.0.0.1 localhost\n10.10.0.9 from-hosts-file.demo\n' >"$DEMO/hosts"

cat <<MSG
networkd demo: etcd at $ENDPOINT, DNS at 127.0.0.1:$DNS_PORT, API at 127.0.0.1:$API_PORT
Try, in another terminal:
  dig @127.0.0.1 -p $DNS_PORT hello.lain
  dig @127.0.0.1 -p $DNS_PORT anything.apps.lain
  curl 127.0.0.1:$API_PORT/v1/dns/config
  ETCDCTL_API=3 etcdctl --endpoints=$ENDPOINT put /lain/config/domains/new.lain '{"ips":["10.10.0.10"]}'
  cat $DEMO/resolv.conf     # the guarded file
Ctrl-C stops the daemon and the demo etcd.
MSG

"$PY" -m networkd --etcd "$ENDPOINT" --hostname demo-node --node-ip 127.0.0.1 --no-vips \
  --dns-listen 127.0.0.1:$DNS_PORT --api-listen 127.0.0.1:$API_PORT \
  --resolv-conf "$DEMO/resolv.conf" --hosts-file "$DEMO/hosts" || true
