#!/usr/bin/env bash
# Installs everything dm-remapd needs to build, run and test on a fresh
# Debian/Ubuntu machine (as root), then installs the npm packages and builds
# the native addon offline against the headers of the installed node.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  build-essential python3 pkg-config liburing-dev   # addon build (node-gyp + liburing)
  nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd fuse3  # fault injection, NBD peers
  qemu-utils fio util-linux e2fsprogs bsdutils curl gddrescue  # peers for tests and benchmarks (curl: metrics scrapes; script: scan progress bar; ddrescue mapfiles)
  qemu-system-x86 busybox-static kmod cpio xz-utils dmsetup nbd-client debian-archive-keyring udev  # tests/vm: the QEMU guest (it fetches its own kernel; udev: guest-names.sh tests the udev rule with the host's systemd-udevd)
)

need_apt=0
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || { need_apt=1; break; }
done
if [ "$need_apt" = 1 ]; then
  if [ "$(id -u)" != 0 ]; then echo "install-deps: run as root to install: ${APT_PACKAGES[*]}" >&2; exit 1; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${APT_PACKAGES[@]}"
fi

if ! command -v node >/dev/null; then
  echo "install-deps: Node.js >= 20.17 is required (not found on PATH)" >&2; exit 1
fi
node -e 'const [a,b]=process.versions.node.split(".").map(Number); if (a<20||(a===20&&b<17)) { console.error("install-deps: Node.js >= 20.17 is required, found "+process.version); process.exit(1) }'

# node-gyp must not download headers: point it at the running node's prefix
# (Debian: /usr, official tarballs: their own prefix), which holds include/node.
npm_config_nodedir="$(node -p 'require("path").resolve(process.execPath, "../..")')"
export npm_config_nodedir
if [ ! -f "$npm_config_nodedir/include/node/node_api.h" ]; then
  echo "install-deps: no Node headers under $npm_config_nodedir/include/node" >&2; exit 1
fi

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund
else
  npm rebuild --no-audit --no-fund >/dev/null
fi
npm run build --silent
