#!/bin/sh
# Smoke test of the guest: modules load, node runs with the project's addon.
. "$(dirname "$0")/lib.sh"
section env
echo "kernel $(uname -r) cpus $(nproc) mem $(awk '/MemTotal/{print $2" kB"}' /proc/meminfo)"
section modules
check modprobe modules nbd ublk_drv dm-mod
for m in nbd ublk_drv dm_mod; do grep -q "^$m " /proc/modules && pass "module-$m" || fail "module-$m" "not in /proc/modules"; done
section node
T=$(up)
if OUT=$(cd "$PROJECT" && node -e '
  const { createRequire } = require("node:module");
  const r = createRequire(process.cwd() + "/package.json");
  const a = r("./build/Release/dm_remapd.node");
  console.log("addon exports:", Object.keys(a).sort().join(","));
  console.log("uname:", require("node:os").release());' 2>&1); then
	echo "$OUT"
	pass node-addon "$(el "$T")"
else
	echo "$OUT"
	fail node-addon "$(el "$T")"
fi
echo "uname -r: $(uname -r)"
finish
