#!/bin/sh
# The hazard itself (docs/OPERATION.md, "Mount namespaces: the ublk self-deadlock"):
# guest-mntns.sh with its section 4, which leaves a daemon that cannot exit
# and devices that stay quiesced. A demonstration, not part of vm.test.ts:
#   bash tests/vm/vm.sh run tests/vm/guest-mntns-hazard.sh
DMR_GUEST_HAZARD=1
. "$(dirname "$0")/guest-mntns.sh"
