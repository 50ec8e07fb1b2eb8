# Guest test matrix, one frontend per boot: sourced by guest-matrix-ublk.sh
# (KIND=ublk, /dev/ublkbN) and guest-matrix-nbd.sh (KIND=nbd, /dev/nbdN).
#  1. fio random write + read with verify=crc32c on the device, then on a file
#     of a mounted ext4 (and verify-only again after umount, fsck, remount).
#  2. openers: `remapctl remove` of a mounted device, of a device held open by
#     a process and of one held by a dm device is refused (exit 5), naming who
#     holds it; `remapctl openers` lists them; the device keeps working.
#  3. removal during an active metadata write (the spare's metadata areas
#     behind dm-delay, a manual remap committing, a client write parked behind
#     it): done within the timeout + 1 s, the device is gone (ublk: no
#     ublkcN), the daemon keeps serving the other device.
#  4. removal during error recovery: writes hitting `error` segments under the
#     main, remaps in flight (spare writes slowed by dm-delay): same, and the
#     metadata reopens with the remaps after.
#  5. remove --force of a mounted device: done within the timeout + 1 s; the
#     device goes once the filesystem is unmounted.
#  6. DMR_GUEST_CYCLES (default 100, as the issue asks) rapid add/remove cycles with I/O: fd,
#     thread and RSS figures of the daemon flat (tests/vm/cycles.mjs).
#  7. daemon stopped: no ublkcN left; the frontend's module unloads.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/guest-daemon.sh"

KIND=${KIND:?run guest-matrix-ublk.sh or guest-matrix-nbd.sh}
CYCLES=${DMR_GUEST_CYCLES:-100}
RM_TIMEOUT=3000 # ms, the deadline given to every remove below
case $KIND in
ublk) MOD=ublk_drv ATTACH=--ublk ;;
nbd) MOD=nbd ATTACH="--nbd-device auto" ;;
*) echo "unknown KIND $KIND"; exit 1 ;;
esac

# add_dev NAME MAIN SPARE: formats, attaches; prints the kernel device
add_dev() {
	out=$(ctl add "$1" --main "$2" --spare "$3" --format $ATTACH 2>&1) || { echo "$out" >&2; return 1; }
	echo "$out" | tail -n1
}
is_dev() { case "$1" in /dev/ublkb* | /dev/nbd*) return 0 ;; *) return 1 ;; esac; }
# dev_gone DEV: detached (ublk: no ublkbN and no ublkcN; nbd: no client)
dev_gone() {
	n=${1#/dev/}
	case $KIND in
	ublk) [ ! -e "/sys/block/$n" ] && [ ! -e "/sys/class/ublk-char/ublkc${n#ublkb}" ] ;;
	nbd) [ ! -e "/sys/block/$n/pid" ] ;;
	esac
}
# wait_for SECONDS CMD...: polls CMD every 0.1 s
wait_for() {
	n=$(($1 * 10))
	shift
	while ! "$@"; do
		n=$((n - 1))
		[ $n -le 0 ] && return 1
		sleep 0.1
	done
}
alive() { kill -0 "$1" 2>/dev/null; }
# reap PID SECONDS: waits for a background job, kills it when it outlives SECONDS; returns its status
reap() {
	wait_for "$2" sh -c "! kill -0 $1 2>/dev/null" || { echo "pid $1 still running after $2 s: killed"; kill -9 "$1" 2>/dev/null; }
	wait "$1" 2>/dev/null
}
# io_check DEV MIB: 1 MiB O_DIRECT write at MIB, read back, compare
io_check() {
	head -c 1M /dev/urandom >$W/io.pat
	dd if=$W/io.pat of="$1" bs=1M seek="$2" oflag=direct conv=fsync status=none &&
		dd if="$1" of=$W/io.back bs=1M skip="$2" count=1 iflag=direct status=none &&
		cmp $W/io.pat $W/io.back
}
dm_node() { # NAME: dm-N of a device-mapper device
	for d in /sys/block/dm-*; do [ "$(cat "$d/dm/name")" = "$1" ] && echo "${d##*/}" && return 0; done
	return 1
}
writes_in_flight() { [ "$(awk '{print $2}' "/sys/block/$1/inflight")" -gt 0 ]; }
# remove_timed NAME [ARGS]: remove --json with RM_TIMEOUT; sets RRC, RMS (daemon-side elapsed ms), RWALL
remove_timed() {
	name=$1
	shift
	t=$(up)
	ROUT=$(ctl --json remove "$name" --timeout $RM_TIMEOUT "$@" 2>$W/remove.err)
	RRC=$?
	RWALL=$(el "$t")
	RERR=$(cat $W/remove.err)
	RMS=$(echo "$ROUT" | json 'v.elapsedMs ?? 999999' 2>/dev/null || echo 999999)
	echo "remove $name $*: rc=$RRC elapsedMs=$RMS wall=$RWALL (remapctl start-up included)"
	[ -n "$RERR" ] && echo "$RERR"
	[ "$RRC" = 0 ] && echo "$ROUT" | json '"timedOut "+v.timedOut+", metadataAborted "+v.metadataAborted+", requestsAbandoned "+v.requestsAbandoned+", cancelled: "+v.cancelled.join("; ")'
	return 0
}
fio_verify() { # NAME ARGS...: random writes then reads of every block, crc32c-verified
	n=$1
	shift
	fio --name="$n" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 --verify=crc32c --verify_fatal=1 \
		--do_verify=1 --eta=never --output=$W/fio-$n.txt "$@" || { tail -n 30 $W/fio-$n.txt; return 1; }
	awk '/(READ|WRITE):/ {print "  fio '"$n"':", $0}' $W/fio-$n.txt
}

cd $W # fio keeps state files in the working folder (the host root is read-only)
section "$KIND: modules"
check modprobe modules $MOD dm-mod dm-delay loop ext4

start_daemon

# Sections 1-5 (DMR_GUEST_ONLY=cycles skips them: the cycles alone, e.g. to measure a leak)
sections_1_to_5() {
# ------------------------------------------------------------ 1: fio verify
section "$KIND: fio verify=crc32c on the device and on ext4"
truncate -s 256M $W/keep-main.img
truncate -s 32M $W/keep-spare.img
T=$(up)
KEEP=$(add_dev keep $W/keep-main.img $W/keep-spare.img)
is_dev "$KEEP" && pass add-keep "$KEEP in $(el "$T")" || { fail add-keep "got '$KEEP'"; tail -20 $W/daemon.log; finish; }
check fio-verify-device fio_verify dev --filename="$KEEP" --size=16M
T=$(up)
check mkfs mkfs.ext4 -q -F -b 4096 "$KEEP"
check mount mount "$KEEP" $W/mnt
check fio-verify-ext4 fio_verify fs --directory=$W/mnt --size=16M
check umount umount $W/mnt
check fsck e2fsck -fn "$KEEP"
check remount mount "$KEEP" $W/mnt
check fio-verify-only-after-remount fio_verify fs --directory=$W/mnt --size=16M --verify_only
echo "ext4 + fio on $KEEP: $(el "$T")"

# ------------------------------------------------------------ 2: openers
section "$KIND: remove refuses a device in use and names who holds it"
remove_timed keep
[ "$RRC" = 5 ] && echo "$RERR" | grep -q "mounted at $W/mnt (ext4)" && pass refuse-mounted "rc=$RRC" || fail refuse-mounted "rc=$RRC: $RERR"
check still-served-mounted sh -c "head -c 1M /dev/urandom >$W/probe && cp $W/probe $W/mnt/probe && sync && echo 3 >/proc/sys/vm/drop_caches && cmp $W/probe $W/mnt/probe"
check umount-keep umount $W/mnt
sleep 600 <"$KEEP" &
HOLDER=$!
ctl openers keep
ctl --json openers keep >$W/openers.json
N=$(json 'v.openers.filter(o=>o.kind==="fd"&&o.pid==='"$HOLDER"'&&o.comm==="sleep").length' <$W/openers.json)
[ "$N" = 1 ] && pass openers-lists-holder "pid $HOLDER" || fail openers-lists-holder "$(cat $W/openers.json)"
remove_timed keep
[ "$RRC" = 5 ] && echo "$RERR" | grep -q "open by pid $HOLDER (sleep)" && pass refuse-open "rc=$RRC" || fail refuse-open "rc=$RRC: $RERR"
kill $HOLDER
wait $HOLDER 2>/dev/null
check dm-holder dmsetup create dmrhold --table "0 8 linear $KEEP 0"
remove_timed keep
[ "$RRC" = 5 ] && echo "$RERR" | grep -q "held by dm-[0-9]* (device-mapper dmrhold)" && pass refuse-dm-holder "rc=$RRC" || fail refuse-dm-holder "rc=$RRC: $RERR"
check dm-holder-remove dmsetup remove dmrhold
check still-served io_check "$KEEP" 250

# ------------------------------------------------------------ 3: removal during a metadata write
section "$KIND: removal during an active metadata write (metadata behind dm-delay)"
truncate -s 64M $W/a-main.img
truncate -s 32M $W/a-spare.img
ALOOP=$(losetup -f --show $W/a-spare.img)
AS=$(blockdev --getsz "$ALOOP")
check dm-slow-create dmsetup create dmrslow --table "0 $AS linear $ALOOP 0"
dmsetup mknodes dmrslow
T=$(up)
A=$(add_dev va $W/a-main.img /dev/mapper/dmrslow)
is_dev "$A" && pass add-va "$A in $(el "$T")" || { fail add-va "got '$A'"; tail -20 $W/daemon.log; finish; }
check va-io io_check "$A" 2
# dataOffset (superblock offset 80, docs/FORMAT.md): copy 0 of the metadata is before it, copy 1 as long at the end
D=$(($(od -An -t u8 -j 80 -N 8 $W/a-spare.img) / 512))
echo "spare data at sector $D of $AS: metadata writes delayed by 30 s"
check dm-slow-load sh -c "dmsetup suspend dmrslow && printf '%s\n' '0 $D delay $ALOOP 0 0 $ALOOP 0 30000' '$D $((AS - 2 * D)) linear $ALOOP $D' '$((AS - D)) $D delay $ALOOP $((AS - D)) 0 $ALOOP $((AS - D)) 30000' | dmsetup load dmrslow && dmsetup resume dmrslow"
SLOW=$(dm_node dmrslow)
ctl remap va 40 >$W/remap.out 2>&1 &
RPID=$!
wait_for 20 writes_in_flight "$SLOW" && pass metadata-write-in-flight "$(cat /sys/block/$SLOW/inflight)" || fail metadata-write-in-flight "no write in flight on $SLOW"
dd if=/dev/zero of="$A" bs=4k seek=40 count=1 oflag=direct status=none 2>$W/parked.err &
PARKED=$!
sleep 0.5
remove_timed va --force # the parked writer holds the device open
[ "$RMS" -le $((RM_TIMEOUT + 1000)) ] && pass remove-during-metadata-write "${RMS} ms (deadline $RM_TIMEOUT ms)" || fail remove-during-metadata-write "${RMS} ms, rc=$RRC: $RERR $ROUT"
# the parked writer fails and closes the device; the interrupted remapctl remap answers
reap $PARKED 10
echo "parked client write: rc=$? $(cat $W/parked.err)"
reap $RPID 10
echo "remapctl remap (interrupted): rc=$? $(tail -n1 $W/remap.out)"
check va-gone wait_for 3 dev_gone "$A"
check keep-served-after-a io_check "$KEEP" 249
# fast again: the delayed writes go out, the engine's abandoned I/O ends, the spare closes
dmsetup suspend dmrslow && dmsetup load dmrslow --table "0 $AS linear $ALOOP 0" && dmsetup resume dmrslow
check dm-slow-remove wait_for 15 sh -c 'dmsetup remove dmrslow 2>/dev/null'
losetup -d "$ALOOP"

# ------------------------------------------------------------ 4: removal during error recovery
section "$KIND: removal during error recovery (remaps in flight)"
truncate -s 128M $W/b-main.img
truncate -s 64M $W/b-spare.img
BML=$(losetup -f --show $W/b-main.img)
BMS=$(blockdev --getsz "$BML")
BSL=$(losetup -f --show $W/b-spare.img)
BSS=$(blockdev --getsz "$BSL")
check dm-bmain-create dmsetup create dmrbmain --table "0 $BMS linear $BML 0"
check dm-bspare-create dmsetup create dmrbspare --table "0 $BSS linear $BSL 0"
dmsetup mknodes
T=$(up)
B=$(add_dev vb /dev/mapper/dmrbmain /dev/mapper/dmrbspare)
is_dev "$B" && pass add-vb "$B in $(el "$T")" || { fail add-vb "got '$B'"; tail -20 $W/daemon.log; finish; }
# blocks 4096..8191 (16 MiB) fail; every spare write takes 200 ms, so remaps stay in flight (and under the engine's breaker of 1024
# remaps a minute). With 1 s no spare write was seen in flight within 30 s and the first remaps came much later.
check dm-bmain-errors sh -c "dmsetup suspend dmrbmain && printf '%s\n' '0 32768 linear $BML 0' '32768 32768 error' '65536 $((BMS - 65536)) linear $BML 65536' | dmsetup load dmrbmain && dmsetup resume dmrbmain"
check dm-bspare-delay sh -c "dmsetup suspend dmrbspare && dmsetup load dmrbspare --table '0 $BSS delay $BSL 0 0 $BSL 0 200' && dmsetup resume dmrbspare"
BSPARE=$(dm_node dmrbspare)
fio --name=recovery --filename="$B" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 --offset=16M --size=16M \
	--time_based --runtime=120 --eta=never --output=$W/fio-recovery.txt >/dev/null 2>&1 &
FPID=$!
wait_for 30 writes_in_flight "$BSPARE" && pass remaps-in-flight "$(cat /sys/block/$BSPARE/inflight)" || fail remaps-in-flight "no spare write in flight"
REMAPPED=$(ctl status vb --json | json v.remappedBlocks)
echo "remapped so far: $REMAPPED; spare in flight now: $(cat /sys/block/$BSPARE/inflight)"
[ "$REMAPPED" -gt 0 ] && pass remaps-under-way "$REMAPPED blocks" || fail remaps-under-way "none remapped yet"
remove_timed vb --force # fio holds the device open
[ "$RMS" -le $((RM_TIMEOUT + 1000)) ] && pass remove-during-recovery "${RMS} ms (deadline $RM_TIMEOUT ms)" || fail remove-during-recovery "${RMS} ms, rc=$RRC: $RERR $ROUT"
reap $FPID 15
echo "fio writer ended: rc=$? ($(grep -c 'error' $W/fio-recovery.txt) error lines)"
check vb-gone wait_for 3 dev_gone "$B"
check keep-served-after-b io_check "$KEEP" 248
grep -E '"event":"(drained|removed)".*"device":"vb"|"device":"vb".*"event":"(drained|removed)"' $W/daemon.log | tail -n 2 | cut -c1-300
check dm-bspare-fast sh -c "dmsetup suspend dmrbspare && dmsetup load dmrbspare --table '0 $BSS linear $BSL 0' && dmsetup resume dmrbspare"
# a removal past its deadline finishes in the background: wait for it before reopening
if echo "$ROUT" | grep -q '"timedOut": true'; then
	wait_for 15 sh -c "grep '\"event\":\"drained\"' $W/daemon.log | grep -q '\"device\":\"vb\"'" || echo "vb did not drain within 15 s"
fi
# the metadata reopens with at least the remaps seen before the removal
T=$(up)
OUT=$(ctl --json add vb2 --main /dev/mapper/dmrbmain --spare /dev/mapper/dmrbspare 2>$W/add.err)
AFTER=$(echo "$OUT" | json v.remappedBlocks 2>/dev/null || echo -1)
[ "$AFTER" -ge "$REMAPPED" ] && pass metadata-reopens "remappedBlocks $AFTER >= $REMAPPED in $(el "$T")" || fail metadata-reopens "$(cat $W/add.err) $OUT"
check vb2-remove ctl remove vb2
check dm-b-remove sh -c "dmsetup remove dmrbmain && dmsetup remove dmrbspare"
losetup -d "$BML"
losetup -d "$BSL"

# ------------------------------------------------------------ 5: remove --force of a mounted device
section "$KIND: remove --force of a mounted device"
check mount-keep-force mount "$KEEP" $W/mnt
remove_timed keep --force
[ "$RRC" = 0 ] && [ "$RMS" -le $((RM_TIMEOUT + 1000)) ] && pass remove-force-mounted "${RMS} ms" || fail remove-force-mounted "rc=$RRC ${RMS} ms: $RERR $ROUT"
umount $W/mnt 2>/dev/null || umount -l $W/mnt
check keep-gone-after-umount wait_for 5 dev_gone "$KEEP"

}
[ "${DMR_GUEST_ONLY:-}" = cycles ] || sections_1_to_5

# ------------------------------------------------------------ 6: cycles
section "$KIND: $CYCLES add/remove cycles with I/O"
T=$(up)
node "$(dirname "$0")/cycles.mjs" "$SOCK" $KIND "$CYCLES" "$DPID" $W
RC=$?
FAILS=$((FAILS + RC))
echo "cycles: $(el "$T")"

# ------------------------------------------------------------ 7: the end
section "$KIND: daemon stop, module unload"
kill "$DPID" && wait "$DPID"
echo "daemon exit $?"
DPID=
check no-ublkc sh -c '! ls /sys/class/ublk-char/ 2>/dev/null | grep -q ublkc'
check "modprobe-r-$MOD" unload $MOD
grep -q "^$MOD " /proc/modules && fail "$MOD-unloaded" "still loaded" || pass "$MOD-unloaded" ""
unload dm-delay
echo "daemon warnings: $(grep -c '"level":40' $W/daemon.log), errors: $(grep -cE '"level":(50|60)' $W/daemon.log)"
grep -E '"level":(50|60)' $W/daemon.log | tail -n 10 | cut -c1-400
section "dmesg (filtered)"
dmesg | grep -iE 'ublk|nbd|device-mapper|ext4|call trace|hung|blocked for' | tail -n 30
finish
