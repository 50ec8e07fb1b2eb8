# tests/vm/lib.sh: helpers for guest scripts (sourced inside the guest).
# Prints "RESULT name PASS|FAIL detail" lines and STEP timings; FAILS counts.
set -u
FAILS=0
PROJECT=${DMR_PROJECT:-$(cd "$(dirname "$0")/../.." && pwd)}
KROOT=${DMR_VM_KROOT:?not in the dm-remapd test guest}
# Settings passed from the host (vm.sh writes every DMR_GUEST_* variable to the run folder)
if [ -n "${DMR_VM_RUN:-}" ] && [ -f "$DMR_VM_RUN/env" ]; then . "$DMR_VM_RUN/env"; fi
up() { cut -d' ' -f1 /proc/uptime; }
el() { awk -v a="$1" -v b="$(up)" 'BEGIN{printf "%.2fs", b-a}'; }
pass() { echo "RESULT $1 PASS ${2:-}"; }
fail() { echo "RESULT $1 FAIL ${2:-}"; FAILS=$((FAILS + 1)); }
section() { echo; echo "===== $* (t=$(up)s)"; }
# check NAME CMD...: runs CMD, PASS/FAIL with its time
check() {
	local name=$1 t
	shift
	t=$(up)
	if "$@"; then pass "$name" "$(el "$t")"; else fail "$name" "rc=$? after $(el "$t"): $*"; fi
}
modules() { modprobe -d "$KROOT" -a "$@"; }
unload() { modprobe -d "$KROOT" -r "$@"; }
finish() {
	section summary
	echo "fails=$FAILS t=$(up)s"
	exit "$FAILS"
}
