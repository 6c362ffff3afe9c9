#!/bin/sh
# Shape this container's eth0 (with-network.yml; needs cap_add NET_ADMIN).
#   uplink   (egress):  netem delay (when STAMEN_DELAY_MS is set) then tbf at STAMEN_UP_MBIT
#   downlink (ingress): a policer at STAMEN_DOWN_MBIT (no ifb needed; TCP backs off to the rate)
# The delay is applied once, on egress, as the whole round trip (2 x the one-way delay),
# because ingress has no queue to delay in without ifb. Docker hosts normally ship
# sch_netem; where it is missing the script says so and stops.
set -eu
dev=${STAMEN_DEV:-eth0}
run() { if [ "${STAMEN_DRY_RUN:-0}" = 1 ]; then echo "$*"; else "$@"; fi; }

run tc qdisc del dev "$dev" root 2>/dev/null || true
run tc qdisc del dev "$dev" ingress 2>/dev/null || true
parent="root"
if [ -n "${STAMEN_DELAY_MS:-}" ]; then
  rtt=$(awk "BEGIN { print 2 * ${STAMEN_DELAY_MS} }")
  jitter=$(awk "BEGIN { print 2 * ${STAMEN_JITTER_MS:-0} }")
  if ! run tc qdisc add dev "$dev" root handle 1: netem delay "${rtt}ms" "${jitter}ms"; then
    echo "shape.sh: netem is not available in this kernel (modprobe sch_netem on the host)" >&2
    exit 3
  fi
  parent="parent 1:"
fi
if [ -n "${STAMEN_UP_MBIT:-}" ]; then
  # shellcheck disable=SC2086
  run tc qdisc add dev "$dev" $parent handle 2: tbf rate "${STAMEN_UP_MBIT}mbit" burst 64kb latency 200ms
fi
if [ -n "${STAMEN_DOWN_MBIT:-}" ]; then
  run tc qdisc add dev "$dev" handle ffff: ingress
  run tc filter add dev "$dev" parent ffff: protocol ip u32 match u32 0 0 \
    police rate "${STAMEN_DOWN_MBIT}mbit" burst 256k drop flowid :1
fi
