#!/usr/bin/env bash
# Real kernel links for the edge testbed: one network namespace per device, joined by a bridge, each device's
# egress shaped with tbf. A complement to flowspec's user-space shaping (`--link`), for checking it against the
# kernel's TCP stack: tbf limits bandwidth; this kernel has no netem, so latency stays in user space
# (`python -m flowspec.bench.node --profile ... --link 100gbit,1ms` adds 1 ms per hop without a second bandwidth limit).
#
#   sudo scripts/netns-testbed.sh up 5 150mbit      # fs0 (the head) .. fs4, 10.77.0.1 .. 10.77.0.5
#   scripts/netns-testbed.sh peers 5 7000 > peers.txt # head first, one port per device
#   sudo scripts/netns-testbed.sh exec 2 bin/flowspec-node --peers peers.txt --index 2 --model smollm2-135m --insecure
#   sudo scripts/netns-testbed.sh check 150mbit      # measure fs0 -> fs1 throughput against the rate
#   sudo scripts/netns-testbed.sh down
#
# Addresses are not loopback, so the nodes ask for a shared secret (FLOWSPEC_SECRET) or --insecure.
set -euo pipefail

PREFIX=fs
BRIDGE=fsbr0
NET=10.77.0

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

need_root() { [[ $(id -u) == 0 ]] || { echo "error: $1 needs root (network namespaces, tc)" >&2; exit 1; }; }

count() { ip netns list | grep -c "^${PREFIX}[0-9]" || true; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)

rate_bps() {  # the rate in bit/s, read by flowspec's own link-shape parser (same syntax as --link)
  "$ROOT/.venv/bin/python" -c "
import sys
from flowspec.errors import ConfigError
from flowspec.bench.shaping import LinkShape
try:
    print(int(LinkShape.parse(sys.argv[1]).bandwidth_bps))
except ConfigError as exc:
    sys.exit(f'error: {exc}')" "$1"
}

up() {
  local n=${1:?usage: up N RATE} rate=${2:?usage: up N RATE}
  need_root up
  [[ $n =~ ^[0-9]+$ && $n -ge 2 && $n -le 32 ]] || { echo "error: N must be 2..32 devices (head + stages)" >&2; exit 1; }
  local bps burst
  bps=$(rate_bps "$rate")
  burst=$(( bps / 8 / 1000 > 32768 ? bps / 8 / 1000 : 32768 ))  # >= rate/HZ bytes: 32 KiB or 1 ms of traffic
  [[ $(count) == 0 ]] || { echo "error: a testbed is already up; run '$0 down' first" >&2; exit 1; }
  ip link add "$BRIDGE" type bridge
  ip link set "$BRIDGE" up
  for ((k = 0; k < n; k++)); do
    local ns=$PREFIX$k
    ip netns add "$ns"
    ip link add "veth$k" type veth peer name eth0 netns "$ns"
    ip link set "veth$k" master "$BRIDGE" up
    ip -n "$ns" addr add "$NET.$((k + 1))/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    # egress of each device: its NIC sends at most `rate` (the bridge side is left unshaped)
    ip netns exec "$ns" tc qdisc add dev eth0 root tbf rate "$rate" burst "$burst" latency 50ms
  done
  echo "up: $n devices ${PREFIX}0..${PREFIX}$((n - 1)) at $NET.1..$NET.$n, egress $rate (tbf burst $burst B)"
}

down() {
  need_root down
  for ns in $(ip netns list | awk '{print $1}' | grep "^${PREFIX}[0-9]" || true); do
    ip netns del "$ns"
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  echo "down"
}

peers() {
  local n=${1:?usage: peers N BASEPORT} port=${2:-7000}
  echo "# written by scripts/netns-testbed.sh: device k runs in namespace ${PREFIX}k"
  for ((k = 0; k < n; k++)); do
    echo "$NET.$((k + 1)):$((port + k))"
  done
}

exec_in() {
  local k=${1:?usage: exec K COMMAND...}; shift
  need_root exec
  exec ip netns exec "$PREFIX$k" "$@"
}

check() {  # one TCP stream fs0 -> fs1 for 2 s; the measured rate must sit just under the tbf rate
  local rate=${1:?usage: check RATE}
  need_root check
  local bps; bps=$(rate_bps "$rate")
  ip netns exec "${PREFIX}1" python3 - "$NET.2" <<'EOF' &
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5999)); s.listen(1)
c, _ = s.accept()
while c.recv(1 << 20):
    pass
EOF
  sleep 0.5
  ip netns exec "${PREFIX}0" python3 - "$NET.2" "$bps" <<'EOF'
import socket, sys, time
want = float(sys.argv[2])
s = socket.create_connection((sys.argv[1], 5999))
buf = b"\0" * (1 << 16)
sent, t0 = 0, time.monotonic()
while time.monotonic() - t0 < 2.0:
    sent += s.send(buf)
s.close()
got = sent * 8 / (time.monotonic() - t0)
print(f"fs0 -> fs1: {got / 1e6:.1f} Mbit/s for a {want / 1e6:.0f} Mbit/s link")
sys.exit(0 if 0.7 * want <= got <= 1.1 * want else 1)
EOF
  wait
}

case ${1:-} in
  up) shift; up "$@" ;;
  down) down ;;
  peers) shift; peers "$@" ;;
  exec) shift; exec_in "$@" ;;
  check) shift; check "$@" ;;
  -h|--help|help) usage ;;
  *) usage 1 ;;
esac
