# tests/vm/names-ns-lib.sh: helpers of guest-names.sh and guest-mntns.sh
# (sourced after lib.sh and guest-daemon.sh): starting and stopping the
# daemon under a prefix (unshare, env), stable-name and device checks.
BYR=/dev/disk/by-remap
DEADLINE=5 # shutdownTimeoutMs (the default) in seconds
SLACK=3

# launch LOG STATEDIR [PREFIX...]: starts the daemon (under PREFIX, e.g.
# unshare) and waits for its `ready` log line (polling the log is cheap;
# a remapctl call costs a node start-up); DPID is node's pid.
launch() {
	log=$1
	st=$2
	shift 2
	T=$(up)
	"$@" node "$PROJECT/dist/src/daemon/main.js" --state-dir "$st" --control-socket "$SOCK" >"$log" 2>&1 &
	DPID=$!
	i=0
	while ! has_event "$log" ready; do
		i=$((i + 1))
		if [ $i -gt 900 ] || gone $DPID; then break; fi
		sleep 0.1
	done
	if has_event "$log" ready; then pass "daemon-start-$(basename "$log" .log)" "$(el "$T")"; else fail daemon-start "not ready"; cat "$log"; finish; fi
}
# stop_daemon: SIGTERM, wait; STOP_S = seconds to exit, DRC = exit code
stop_daemon() {
	T=$(up)
	kill -TERM "$DPID"
	wait "$DPID"
	DRC=$?
	STOP_S=$(awk -v a="$T" -v b="$(up)" 'BEGIN{printf "%.2f", b-a}')
	DPID=
	echo "daemon exit $DRC after ${STOP_S}s"
}
within() { awk -v x="$1" -v m="$2" 'BEGIN{exit !(x <= m)}'; }
kdev() { ctl status "$1" --json | json 'v.exports.find((e) => /^\/dev\/(ublkb|nbd)\d+$/.test(e)) ?? ""'; }
# link_is NAME DEV: NAME's link is ../../<dev> and resolves to DEV
link_is() { [ -L "$BYR/$1" ] && [ "$(readlink "$BYR/$1")" = "../../${2#/dev/}" ] && [ "$(readlink -f "$BYR/$1")" = "$2" ]; }
no_link() { [ ! -e "$BYR/$1" ] && [ ! -L "$BYR/$1" ]; }
udev_file_is() { [ "$(cat "/run/dm-remapd/udev/${2#/dev/}" 2>/dev/null)" = "DM_REMAPD_NAME=$1" ]; }
ublkc_gone() { [ ! -e "/sys/class/ublk-char/ublkc${1#/dev/ublkb}" ] && [ ! -e "/dev/ublkc${1#/dev/ublkb}" ]; }
# wait_for SECONDS CMD...: polls CMD every 0.1 s until it succeeds or
# SECONDS (of uptime, not of iterations: each is slow on a loaded host) pass
wait_for() {
	end=$(awk -v a="$(up)" -v s="$1" 'BEGIN{print a+s}')
	shift
	while ! "$@"; do
		awk -v n="$(up)" -v e="$end" 'BEGIN{exit !(n<e)}' || return 1
		sleep 0.1
	done
}
# gone PID: every thread of the process has exited (zombies count: sh reaps
# them at wait; a leader can be a zombie while another thread still runs)
gone() {
	[ -d "/proc/$1" ] || return 0
	awk '{ s = $0; sub(/^.*\) /, "", s); if (substr(s, 1, 1) != "Z") alive = 1 } END { exit alive }' /proc/$1/task/*/stat 2>/dev/null
}
has_event() { grep -q "\"event\":\"$2\"" "$1"; }
no_event() { ! has_event "$@"; }
only_initial_ns() { has_event "$1" mount-namespace && ! has_event "$1" mount-namespace-private; }
no_links() { for x in "$@"; do no_link "$x" || return 1; done; }

# in_ns PID CMD...: runs CMD in PID's mount namespace, with PID's root (the
# guest runs chrooted: entering a mount namespace alone resets the root)
in_ns() { p=$1; shift; nsenter -t "$p" -m -r "$@"; }
