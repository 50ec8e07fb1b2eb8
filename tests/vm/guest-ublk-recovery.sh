#!/bin/sh
# Guest test: ublk crash recovery (USER_RECOVERY + REISSUE, docs/UBLK.md "Crash recovery").
#  1. ext4 on /dev/ublkb0 (dm-remapd over files), mounted; fio random write
#     with verify=crc32c plus a file copy; `kill -9` of the daemon mid-fio;
#     restart: the daemon recovers the SAME /dev/ublkb0 (START/END_USER_RECOVERY),
#     the held requests are reissued, fio completes and verifies, the copy is
#     intact, the mount stays usable (write+sync+read), umount, fsck clean.
#  2. daemon stop (SIGTERM, as `systemctl restart`) with the filesystem
#     mounted and fio running: the device is left to the next daemon
#     (ublk-suspended), which recovers it; fio verifies, fsck clean.
#  3. fallback, recovery disabled (DM_REMAPD_UBLK_RECOVERY=0): a device added
#     without recovery, kill -9, restart: the stale device is deleted (no
#     orphan /dev/ublkcN), a new one is added, the data written before the
#     crash reads back. Then the recovery device of 1-2, after kill -9:
#     a restart whose recovery fails half-way (test hook) cleans it up and
#     adds a new one; a restart with recovery disabled deletes and replaces
#     it; no orphan either time.
#     A device whose main is missing at the next start is not assembled;
#     `remapctl remove` of it deletes the ublk device left for it.
#  4. remove everything; no /dev/ublkcN left; `modprobe -r ublk_drv` succeeds.
. "$(dirname "$0")/lib.sh"

W=/tmp/dmr
mkdir -p $W/state $W/state2 $W/mnt
SOCK=$W/control.sock
SOCK2=$W/control2.sock
DPID=
D2PID=
FIOPID=
CPPID=
N=0
ctl() { node "$PROJECT/dist/src/cli/remapctl.js" --socket "$SOCK" "$@"; }
ctl2() { node "$PROJECT/dist/src/cli/remapctl.js" --socket "$SOCK2" "$@"; }
json() { node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const v=JSON.parse(s);const r=new Function("v","return "+process.argv[1])(v);console.log(r)})' "$1"; }
cleanup() {
	for p in $FIOPID $CPPID; do kill "$p" 2>/dev/null; done
	umount $W/mnt 2>/dev/null
	for p in $DPID $D2PID; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
}
trap cleanup EXIT

# spawn STATE SOCK [VAR=VALUE]: starts a daemon with its own log $W/d-N.log;
# LASTPID, LASTLOG. Waits for its "ready" line (reassembly, and so recovery,
# happens before it).
spawn() {
	N=$((N + 1))
	LASTLOG=$W/d-$N.log
	env ${3:-} node "$PROJECT/dist/src/daemon/main.js" --state-dir "$1" --control-socket "$2" >"$LASTLOG" 2>&1 &
	LASTPID=$!
	i=0
	while ! grep -q '"event":"ready"' "$LASTLOG" 2>/dev/null; do
		i=$((i + 1))
		if [ $i -gt 900 ] || ! kill -0 $LASTPID 2>/dev/null; then
			echo "daemon $N did not get ready:"
			tail -n 30 "$LASTLOG"
			return 1
		fi
		sleep 0.1
	done
}
wios() { awk '{print $5}' "/sys/block/$1/stat"; }
ublkc_list() { ls /sys/class/ublk-char/ 2>/dev/null | grep '^ublkc' | sort | tr '\n' ' '; }
# kill_mid_fio DEV SIGNAL: waits until fio has written 300+ requests more, then signals the daemon
kill_mid_fio() {
	base=$(wios "$1")
	i=0
	while [ "$(wios "$1")" -lt $((base + 300)) ] && [ $i -lt 600 ] && kill -0 $FIOPID 2>/dev/null; do i=$((i + 1)); sleep 0.05; done
	if ! kill -0 $FIOPID 2>/dev/null; then
		fail "fio-running-at-$2" "fio ended before the daemon was signalled"
		return 1
	fi
	echo "at $2: $(($(wios "$1") - base)) writes done by fio's phase so far, in flight (r w): $(cat /sys/block/$1/inflight)"
	TK=$(up)
	kill "-$2" $DPID
	wait $DPID 2>/dev/null
	echo "daemon $DPID gone after $(el "$TK") ($2)"
	DPID=
}
fio_start() { # FILE SIZE
	timeout 240 fio --name=crash --filename="$1" --size="$2" --bs=4k --rw=randwrite --ioengine=libaio --iodepth=8 --direct=1 \
		--verify=crc32c --do_verify=1 --verify_fatal=1 --end_fsync=1 --output="$W/fio-$N.out" >/dev/null 2>&1 &
	FIOPID=$!
	FIOOUT=$W/fio-$N.out
}
fio_result() { # NAME
	T=$(up)
	wait $FIOPID
	rc=$?
	FIOPID=
	grep -E 'verify|err=|WRITE:|READ:' "$FIOOUT" | head -n 6
	if [ $rc -eq 0 ] && ! grep -q 'verify: bad' "$FIOOUT"; then pass "$1" "fio exit 0, verify passed (waited $(el "$T"))"; else fail "$1" "fio exit $rc"; cat "$FIOOUT"; fi
}

section modules
check modprobe modules ublk_drv dm-mod ext4

section "daemon 1"
T=$(up)
if spawn $W/state "$SOCK"; then DPID=$LASTPID; pass daemon-start "$(el "$T")"; else fail daemon-start ""; finish; fi

# ------------------------------------------------------------ 1: kill -9 under fio
section "1: kill -9 of the daemon under fio, restart, recovery"
truncate -s 512M $W/main.img
truncate -s 64M $W/spare.img
T=$(up)
OUT=$(ctl add r0 --main $W/main.img --spare $W/spare.img --format --ublk 2>&1)
DEV=$(echo "$OUT" | tail -n1)
case "$DEV" in /dev/ublkb*) pass add-ublk "$DEV in $(el "$T")" ;; *) fail add-ublk "no device printed: $OUT"; tail -20 $LASTLOG; finish ;; esac
B=${DEV#/dev/}
grep '"ublk-attached"' $LASTLOG | tail -n1
grep -q '"recovered":false' $LASTLOG && echo "flags: $(grep -o '"flags":[0-9]*' $LASTLOG | tail -n1)"
[ -f $W/state/ublk/r0.json ] && pass record-written "$(tr -d ' \n' <$W/state/ublk/r0.json)" || fail record-written "no $W/state/ublk/r0.json"
DEVNO=$(cat /sys/block/$B/dev)
check mkfs mkfs.ext4 -q -F -b 4096 "$DEV"
check mount mount "$DEV" $W/mnt
head -c 8M /dev/urandom >$W/copy.src
fio_start $W/mnt/fio.dat 8M
cp $W/copy.src $W/mnt/copy.bin &
CPPID=$!
TKILL=$(up)
kill_mid_fio $B KILL
[ -e /sys/block/$B ] && pass device-kept-after-kill "/sys/block/$B present" || fail device-kept-after-kill "/sys/block/$B gone"
echo "ublk-char after kill: $(ublkc_list)"
T=$(up)
if spawn $W/state "$SOCK"; then DPID=$LASTPID; pass daemon-restart "$(el "$T")"; else fail daemon-restart ""; finish; fi
grep '"ublk-attached"' $LASTLOG | tail -n1
grep '"ublk-attached"' $LASTLOG | grep -q '"recovered":true' && pass recovered "$(grep -o '"recoveryMs":[0-9]*' $LASTLOG | tail -n1), kill -> ready $(el "$TKILL")" || { fail recovered "no recovered ublk-attached line"; grep -E '"level":(40|50)' $LASTLOG | tail -n 5; }
fio_result fio-verify-after-kill
T=$(up)
wait $CPPID
CPRC=$?
CPPID=
check copy-completed [ $CPRC -eq 0 ]
check copy-intact sh -c "sync && echo 3 >/proc/sys/vm/drop_caches && cmp $W/copy.src $W/mnt/copy.bin"
echo "kill -> fio and copy done: $(el "$TKILL")"
check same-device [ "$(cat /sys/block/$B/dev 2>/dev/null)" = "$DEVNO" ]
ctl status r0 --json | grep -q "\"$DEV\"" && pass status-names-device "$DEV" || fail status-names-device "$DEV not among the exports of r0"
check still-mounted mountpoint -q $W/mnt
head -c 4M /dev/urandom >$W/post.src
check write-sync-read sh -c "cp $W/post.src $W/mnt/post.bin && sync && echo 3 >/proc/sys/vm/drop_caches && cmp $W/post.src $W/mnt/post.bin"
check no-io-errors sh -c "! dmesg | grep -E '$B|EXT4-fs' | grep -iE 'I/O error|error'"
check no-orphan-ublkc [ "$(ublkc_list)" = "ublkc${B#ublkb} " ]
check umount umount $W/mnt
check fsck e2fsck -fn "$DEV"

# ------------------------------------------------------------ 2: SIGTERM (systemctl restart)
section "2: daemon stop (SIGTERM) with the filesystem mounted, restart"
check remount mount "$DEV" $W/mnt
rm -f $W/mnt/fio.dat
fio_start $W/mnt/fio2.dat 6M
TKILL=$(up)
kill_mid_fio $B TERM
grep '"ublk-suspended"' $W/d-$N.log | tail -n1
grep -q '"ublk-suspended"' $W/d-$N.log && pass suspended-at-stop "" || fail suspended-at-stop "no ublk-suspended line"
[ -e /sys/block/$B ] && pass device-kept-after-stop "" || fail device-kept-after-stop "/sys/block/$B gone"
T=$(up)
if spawn $W/state "$SOCK"; then DPID=$LASTPID; pass daemon-restart2 "$(el "$T")"; else fail daemon-restart2 ""; finish; fi
grep '"ublk-attached"' $LASTLOG | grep -q '"recovered":true' && pass recovered2 "$(grep -o '"recoveryMs":[0-9]*' $LASTLOG | tail -n1), stop -> ready $(el "$TKILL")" || fail recovered2 "not recovered"
fio_result fio-verify-after-stop
check same-device2 [ "$(cat /sys/block/$B/dev 2>/dev/null)" = "$DEVNO" ]
check copy-intact2 cmp $W/copy.src $W/mnt/copy.bin
check umount2 umount $W/mnt
check fsck2 e2fsck -fn "$DEV"

# ------------------------------------------------------------ 3: fallback without recovery
section "3: recovery disabled: restart deletes the stale device (no orphan)"
truncate -s 128M $W/fmain.img
truncate -s 16M $W/fspare.img
T=$(up)
if spawn $W/state2 "$SOCK2" DM_REMAPD_UBLK_RECOVERY=0; then D2PID=$LASTPID; pass daemon2-start "$(el "$T")"; else fail daemon2-start ""; finish; fi
OUT=$(ctl2 add f0 --main $W/fmain.img --spare $W/fspare.img --format --ublk 2>&1)
FDEV=$(echo "$OUT" | tail -n1)
case "$FDEV" in /dev/ublkb*) pass add-norecovery "$FDEV" ;; *) fail add-norecovery "$OUT"; finish ;; esac
FB=${FDEV#/dev/}
head -c 8M /dev/urandom >$W/f.pat
check f-write dd if=$W/f.pat of=$FDEV bs=1M oflag=direct conv=fsync status=none
kill -KILL $D2PID
wait $D2PID 2>/dev/null
D2PID=
i=0
while [ -e /sys/block/$FB ] && [ $i -lt 100 ]; do i=$((i + 1)); sleep 0.05; done
echo "after kill -9 without recovery: /sys/block/$FB $([ -e /sys/block/$FB ] && echo present || echo gone), ublk-char: $(ublkc_list)"
T=$(up)
if spawn $W/state2 "$SOCK2" DM_REMAPD_UBLK_RECOVERY=0; then D2PID=$LASTPID; pass daemon2-restart "$(el "$T")"; else fail daemon2-restart ""; finish; fi
grep '"ublk-stale-deleted"' $LASTLOG | tail -n1
grep -q '"ublk-stale-deleted"' $LASTLOG && pass stale-deleted "" || fail stale-deleted "no ublk-stale-deleted line"
FDEV2=$(ctl2 status f0 --json | json 'v.exports.find((e)=>e.startsWith("/dev/ublkb"))')
echo "f0 now on $FDEV2"
check f-reads-back sh -c "dd if=$FDEV2 of=$W/f.back bs=1M count=8 iflag=direct status=none && cmp $W/f.pat $W/f.back"
EXPECT=$(printf 'ublkc%s\n' ${B#ublkb} ${FDEV2#/dev/ublkb} | sort | tr '\n' ' ')
check no-orphan-after-fallback [ "$(ublkc_list)" = "$EXPECT" ]
echo "ublk-char: $(ublkc_list)"

# a recovery that fails half-way (queues started, then an error): cleaned up, a new device
kill -KILL $DPID
wait $DPID 2>/dev/null
DPID=
T=$(up)
if spawn $W/state "$SOCK" DM_REMAPD_UBLK_TEST_FAIL_RECOVERY=1; then DPID=$LASTPID; pass daemon-restart-failing "$(el "$T")"; else fail daemon-restart-failing ""; finish; fi
grep -E '"ublk-recovery-failed"|"ublk-stale-deleted"' $LASTLOG | tail -n2
grep -q '"ublk-recovery-failed"' $LASTLOG && grep '"ublk-stale-deleted"' $LASTLOG | grep -q 'its recovery failed' && pass failed-recovery-cleaned "" || fail failed-recovery-cleaned "no ublk-recovery-failed + ublk-stale-deleted lines"
RDEV=$(ctl status r0 --json | json 'v.exports.find((e)=>e.startsWith("/dev/ublkb"))')
echo "r0 now on $RDEV, ublk-char: $(ublkc_list)"
check fsck-after-failed-recovery e2fsck -fn "$RDEV"
check no-orphan-after-failed-recovery [ "$(ublkc_list | wc -w)" -eq 2 ]

# the recovery device, restarted with recovery disabled: deleted and replaced
kill -KILL $DPID
wait $DPID 2>/dev/null
DPID=
T=$(up)
if spawn $W/state "$SOCK" DM_REMAPD_UBLK_RECOVERY=0; then DPID=$LASTPID; pass daemon-restart3 "$(el "$T")"; else fail daemon-restart3 ""; finish; fi
grep '"ublk-stale-deleted"' $LASTLOG | tail -n1
grep '"ublk-stale-deleted"' $LASTLOG | grep -q 'recovery is disabled' && pass quiesced-deleted-when-disabled "" || fail quiesced-deleted-when-disabled "no ublk-stale-deleted line naming the reason"
RDEV=$(ctl status r0 --json | json 'v.exports.find((e)=>e.startsWith("/dev/ublkb"))')
check fsck3 e2fsck -fn "$RDEV"
echo "ublk-char: $(ublkc_list)"
check no-orphan-after-disabled [ "$(ublkc_list | wc -w)" -eq 2 ]

# a device that cannot be assembled at restart (main missing): `remapctl remove` deletes its left-over ublk device
kill -KILL $DPID
wait $DPID 2>/dev/null
DPID=
echo "after kill -9 (r0 now without recovery): ublk-char: $(ublkc_list)"
mv $W/main.img $W/main.moved
T=$(up)
if spawn $W/state "$SOCK"; then DPID=$LASTPID; pass daemon-restart-missing-main "$(el "$T")"; else fail daemon-restart-missing-main ""; finish; fi
ST=$(ctl status r0 --json | json v.state)
[ "$ST" = failed ] && pass r0-not-assembled "$ST" || fail r0-not-assembled "state $ST"
check remove-unassembled-r0 ctl remove r0
grep '"ublk-stale-deleted"' $LASTLOG | tail -n1
check record-dropped [ ! -e $W/state/ublk/r0.json ]
check no-orphan-after-remove-unassembled [ "$(ublkc_list)" = "ublkc${FDEV2#/dev/ublkb} " ]

# ------------------------------------------------------------ 4: cleanup
section "4: remove, modules"
check remove-f0 ctl2 remove f0
check records-removed sh -c "[ ! -e $W/state/ublk/r0.json ] && [ ! -e $W/state2/ublk/f0.json ]"
kill $DPID $D2PID
wait $DPID $D2PID 2>/dev/null
DPID=
D2PID=
check no-ublkc-left [ -z "$(ublkc_list)" ]
check modprobe-r-ublk unload ublk_drv
for f in $W/d-*.log; do echo "$f: warnings $(grep -c '"level":40' $f), errors $(grep -cE '"level":(50|60)' $f)"; grep -E '"level":(40|50|60)' $f | tail -n 4; done
section "dmesg (filtered)"
dmesg | grep -iE 'ublk|ext4|error|warn|call trace|hung' | tail -n 30
finish
