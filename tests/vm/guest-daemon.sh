# Sourced by guest tests after lib.sh: the daemon's work folder, remapctl and
# JSON helpers, cleanup on exit, and start_daemon (waits for the control
# socket, or fails the run with the daemon's log).
W=/tmp/dmr
mkdir -p $W/state $W/mnt
SOCK=$W/control.sock
DPID=
ctl() { node "$PROJECT/dist/src/cli/remapctl.js" --socket "$SOCK" "$@"; }
json() { node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const v=JSON.parse(s);const r=new Function("v","return "+process.argv[1])(v);console.log(r)})' "$1"; }
cleanup() {
	umount $W/mnt 2>/dev/null
	[ -n "$DPID" ] && kill "$DPID" 2>/dev/null && wait "$DPID" 2>/dev/null
}
trap cleanup EXIT

start_daemon() {
	section daemon
	T=$(up)
	node "$PROJECT/dist/src/daemon/main.js" --state-dir $W/state --control-socket "$SOCK" >$W/daemon.log 2>&1 &
	DPID=$!
	i=0
	while ! ctl list >/dev/null 2>&1; do
		i=$((i + 1))
		if [ $i -gt 300 ] || ! kill -0 $DPID 2>/dev/null; then break; fi
		sleep 0.1
	done
	if ctl list >/dev/null 2>&1; then pass daemon-start "$(el "$T")"; else fail daemon-start "no control socket"; cat $W/daemon.log; finish; fi
}
