#!/bin/sh
# Guest test matrix on /dev/nbdN (tests/vm/guest-matrix.sh, shared with the other frontend).
KIND=nbd
. "$(dirname "$0")/guest-matrix.sh"
