#!/bin/sh
# Guest test matrix on /dev/ublkbN (tests/vm/guest-matrix.sh, shared with the other frontend).
KIND=ublk
. "$(dirname "$0")/guest-matrix.sh"
