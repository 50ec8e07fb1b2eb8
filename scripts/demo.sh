#!/usr/bin/env bash
# The main job on an embedded default: installs what is needed, builds, then
# runs dm-remapd on file-backed images (a 1 GiB sparse main and a 256 MiB
# spare in a state folder) and exports the device over NBD on a unix socket
# and on localhost TCP. Ctrl-C tears it down cleanly. Run again: the same
# device (and its remaps) comes back from the state folder.
#
#   bash scripts/demo.sh [STATE_DIR]      (default /var/tmp/dm-remapd-default)
#   env: DM_REMAPD_PORT (TCP port, default 10809)
set -euo pipefail
cd "$(dirname "$0")/.."
# (the test suite, which has just installed and built, skips this step)
[ "${DM_REMAPD_SKIP_INSTALL:-}" = 1 ] || bash scripts/install-deps.sh >&2

STATE=${1:-/var/tmp/dm-remapd-default}
PORT=${DM_REMAPD_PORT:-10809}
NAME=default
mkdir -p "$STATE/state"
SOCK="$STATE/control.sock"
NBD_SOCK="$STATE/$NAME.nbd"
[ -e "$STATE/main.img" ] || truncate -s 1G "$STATE/main.img"
[ -e "$STATE/spare.img" ] || truncate -s 256M "$STATE/spare.img"

remapctl() { node dist/src/cli/remapctl.js --socket "$SOCK" "$@"; }

node dist/src/daemon/main.js --state-dir "$STATE/state" --control-socket "$SOCK" &
DAEMON=$!
stop() {
  trap - INT TERM
  echo "stopping dm-remapd (pid $DAEMON)..." >&2
  kill -TERM "$DAEMON" 2>/dev/null || true
  wait "$DAEMON" || true
  echo "stopped; images and remaps stay in $STATE" >&2
  exit 0
}
trap stop INT TERM

for _ in $(seq 100); do
  remapctl list >/dev/null 2>&1 && break
  kill -0 "$DAEMON" 2>/dev/null || { echo "dm-remapd exited early" >&2; exit 1; }
  sleep 0.1
done
if ! remapctl status "$NAME" >/dev/null 2>&1; then
  remapctl add "$NAME" --main "$STATE/main.img" --spare "$STATE/spare.img" --format \
    --nbd-unix "$NBD_SOCK" --nbd-tcp "127.0.0.1:$PORT" >&2
fi
remapctl status "$NAME" >&2

cat >&2 <<EOT

dm-remapd is serving device "$NAME" (main $STATE/main.img, spare $STATE/spare.img).
Reach it with any NBD client:
  nbdinfo 'nbd+unix:///$NAME?socket=$NBD_SOCK'
  qemu-img info 'nbd://127.0.0.1:$PORT/$NAME'
  qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' 'nbd://127.0.0.1:$PORT/$NAME'
  nbd-client 127.0.0.1 $PORT /dev/nbd0 -N $NAME      # where the kernel has nbd
Operate it:
  node dist/src/cli/remapctl.js --socket $SOCK status $NAME
  node dist/src/cli/remapctl.js --socket $SOCK remap $NAME 1234
Ctrl-C stops it cleanly.
EOT
wait "$DAEMON"
