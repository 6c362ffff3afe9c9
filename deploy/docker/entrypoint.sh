#!/bin/sh
# Entry point of the Stamen image: builds the flower-superlink / stamen-supernode command
# from environment variables, so that the compose overlays only set variables and mount
# files (overlays cannot append to a `command`, only replace it).
#
#   STAMEN_ROLE          superlink | supernode   (anything else: run the given command)
#   STAMEN_TLS_DIR       directory with ca.crt (+ server.pem, server.key on the SuperLink); unset: --insecure
#   STAMEN_DATABASE      SuperLink state file (--database); unset: in memory
#   STAMEN_SUPERNODE_AUTH=1   SuperLink: accept only registered SuperNodes (needs TLS)
#   STAMEN_AUTH_KEY      SuperNode: its private key (--auth-supernode-private-key; OpenSSH ECDSA, from deploy/tls/generate.sh)
#   STAMEN_SUPERLINK     SuperNode: the Fleet API address (default superlink:9092)
#   STAMEN_NODE_CONFIG   SuperNode: --node-config
#   STAMEN_NO_WARM=1     SuperNode: --no-warm (Flower's executor and polls; default: the warm runtime, docs/runtime.md)
#   STAMEN_IDLE_POLL / STAMEN_TASK_POLL   SuperNode: --idle-poll / --task-poll seconds
#   STAMEN_TRANSFER_CONCURRENCY   SuperNode: --transfer-concurrency (object RPCs in flight, docs/transfers.md)
#   STAMEN_UP_MBIT / STAMEN_DOWN_MBIT / STAMEN_DELAY_MS / STAMEN_JITTER_MS: shape eth0 first (shape.sh)
#   STAMEN_DRY_RUN=1     print the command instead of running it (used by the tests)
# Extra arguments are appended to the command.
set -eu
here=$(dirname "$0")

if [ -n "${STAMEN_UP_MBIT:-}${STAMEN_DOWN_MBIT:-}${STAMEN_DELAY_MS:-}" ]; then
  "$here/shape.sh"
fi

case "${STAMEN_ROLE:-}" in
  superlink)
    set -- flower-superlink --disable-runtime-dependency-installation --host 0.0.0.0 "$@"
    if [ -n "${STAMEN_TLS_DIR:-}" ]; then
      set -- "$@" --ssl-ca-certfile "$STAMEN_TLS_DIR/ca.crt" --ssl-certfile "$STAMEN_TLS_DIR/server.pem" \
        --ssl-keyfile "$STAMEN_TLS_DIR/server.key"
    else
      set -- "$@" --insecure
    fi
    if [ -n "${STAMEN_DATABASE:-}" ]; then set -- "$@" --database "$STAMEN_DATABASE"; fi
    if [ "${STAMEN_SUPERNODE_AUTH:-0}" = 1 ]; then
      if [ -z "${STAMEN_TLS_DIR:-}" ]; then echo "STAMEN_SUPERNODE_AUTH=1 needs TLS (STAMEN_TLS_DIR)" >&2; exit 2; fi
      set -- "$@" --enable-supernode-auth
    fi
    ;;
  supernode)
    if [ -z "${STAMEN_NODE_CONFIG:-}" ]; then echo "STAMEN_NODE_CONFIG is not set (e.g. 'partition-id=0 num-partitions=4')" >&2; exit 2; fi
    set -- stamen-supernode --superlink "${STAMEN_SUPERLINK:-superlink:9092}" --node-config "$STAMEN_NODE_CONFIG" "$@"
    if [ -n "${STAMEN_TLS_DIR:-}" ]; then
      set -- "$@" --root-certificates "$STAMEN_TLS_DIR/ca.crt"
    else
      set -- "$@" --insecure
    fi
    if [ -n "${STAMEN_AUTH_KEY:-}" ]; then
      set -- "$@" --auth-supernode-private-key "$STAMEN_AUTH_KEY"
    fi
    if [ "${STAMEN_NO_WARM:-0}" = 1 ]; then set -- "$@" --no-warm; fi
    if [ -n "${STAMEN_IDLE_POLL:-}" ]; then set -- "$@" --idle-poll "$STAMEN_IDLE_POLL"; fi
    if [ -n "${STAMEN_TASK_POLL:-}" ]; then set -- "$@" --task-poll "$STAMEN_TASK_POLL"; fi
    if [ -n "${STAMEN_TRANSFER_CONCURRENCY:-}" ]; then set -- "$@" --transfer-concurrency "$STAMEN_TRANSFER_CONCURRENCY"; fi
    ;;
esac

if [ "${STAMEN_DRY_RUN:-0}" = 1 ]; then
  printf '%s\n' "$*"
  exit 0
fi
exec "$@"
