#!/bin/sh
# Guest test: dm-remapd devices served as /dev/ublkbN (ublk_drv, docs/UBLK.md).
#  1. file-backed main + spare: `remapctl add --ublk` prints /dev/ublkbN;
#     mkfs.ext4, mount, write, umount, fsck, remount, verify, O_DIRECT round
#     trip; `remapctl remove` deletes it (no /dev/ublkcN left).
#  2. main = loop device under a device-mapper linear table; an `error`
#     segment is loaded live under a file's blocks; rewriting the file through
#     /dev/ublkbN succeeds, `remapctl status --json` counts the remaps.
#  2b. fast path: live remaps racing fio verify writes.
#  2c. --ublk-queues 2 --ublk-depth 64: 2 blk-mq queues of 64 tags, status,
#     devices.json, fio verify with 2 jobs.
#  3. throughput (dd, O_DIRECT) with USER_COPY and with per-tag buffers
#     (DM_REMAPD_UBLK_COPY=buffers), plus a round trip and ext4 on the latter.
#  4. no /dev/ublkcN left; `modprobe -r ublk_drv` succeeds.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/guest-daemon.sh"

section modules
check modprobe modules ublk_drv dm-mod loop ext4

start_daemon

# ------------------------------------------------------------ 1: files
section "ublk over files"
truncate -s 256M $W/main.img
truncate -s 32M $W/spare.img
T=$(up)
OUT=$(ctl add u0 --main $W/main.img --spare $W/spare.img --format --ublk 2>&1)
echo "$OUT"
DEV=$(echo "$OUT" | tail -n1)
case "$DEV" in /dev/ublkb*) pass add-ublk "$DEV in $(el "$T")" ;; *) fail add-ublk "no device printed"; tail -20 $W/daemon.log; dmesg | tail -20; finish ;; esac
ID=${DEV#/dev/ublkb}
grep '"ublk-attached"' $W/daemon.log | tail -n1
echo "size $(blockdev --getsize64 "$DEV") lbs $(blockdev --getss "$DEV") pbs $(blockdev --getpbsz "$DEV") ro $(blockdev --getro "$DEV")"
echo "queue: write_cache=$(cat /sys/block/ublkb$ID/queue/write_cache) fua=$(cat /sys/block/ublkb$ID/queue/fua 2>/dev/null) discard_max=$(cat /sys/block/ublkb$ID/queue/discard_max_bytes) wz_max=$(cat /sys/block/ublkb$ID/queue/write_zeroes_max_bytes) max_kb=$(cat /sys/block/ublkb$ID/queue/max_sectors_kb)"

write_files() { # DIR COUNT PREFIX
	n=0
	while [ $n -lt "$2" ]; do
		head -c $((256 * 1024 + n * 4096)) /dev/urandom >"$1/$3$n.bin" || return 1
		n=$((n + 1))
	done
	(cd "$1" && sha256sum ./*.bin >$W/sums-$3)
}
head -c 8M /dev/urandom >$W/pat
check odirect-roundtrip sh -c "dd if=$W/pat of=$DEV bs=1M oflag=direct conv=fsync status=none && dd if=$DEV of=$W/back bs=1M count=8 iflag=direct status=none && cmp $W/pat $W/back"
check discard blkdiscard -o 0 -l 8M "$DEV"
check zeroout blkdiscard -z -o 0 -l 1M "$DEV"
check zeroes-read sh -c "dd if=$DEV bs=1M count=1 iflag=direct status=none | cmp -n 1048576 - /dev/zero"
T=$(up)
check mkfs mkfs.ext4 -q -F -b 4096 "$DEV"
check mount mount "$DEV" $W/mnt
check write-files write_files $W/mnt 16 f
check umount umount $W/mnt
check fsck e2fsck -fn "$DEV"
check remount mount "$DEV" $W/mnt
check verify sh -c "cd $W/mnt && sha256sum -c --quiet $W/sums-f"
check umount2 umount $W/mnt
echo "ext4 cycle on $DEV: $(el "$T")"
ctl status u0 --json | json '"reads "+v.stats.reads+" writes "+v.stats.writes+" flushes "+v.stats.flushes+" discards "+v.stats.discards+" writeZeroes "+v.stats.writeZeroes'
T=$(up)
check remove ctl remove u0
echo "remove: $(el "$T")"
grep '"ublk-detached"' $W/daemon.log | tail -n1
[ -e /sys/block/ublkb$ID ] && fail ublkb-gone "/sys/block/ublkb$ID still exists" || pass ublkb-gone ""
[ -e /sys/class/ublk-char/ublkc$ID ] && fail ublkc-gone "ublkc$ID still exists" || pass ublkc-gone ""

# ------------------------------------------------------------ 2: device-mapper bad blocks
section "ublk over dm with error segments"
truncate -s 256M $W/dmain.img
truncate -s 32M $W/dspare.img
LOOP=$(losetup -f --show $W/dmain.img)
SECTORS=$(blockdev --getsz "$LOOP")
check dm-create dmsetup create dmrmain --table "0 $SECTORS linear $LOOP 0"
dmsetup mknodes dmrmain # no udev in the guest
T=$(up)
OUT=$(ctl add u1 --main /dev/mapper/dmrmain --spare $W/dspare.img --format --ublk 2>&1)
echo "$OUT"
DEV=$(echo "$OUT" | tail -n1)
case "$DEV" in /dev/ublkb*) pass add-ublk-dm "$DEV in $(el "$T")" ;; *) fail add-ublk-dm "no device printed"; tail -20 $W/daemon.log; finish ;; esac
ID=${DEV#/dev/ublkb}
check mkfs-dm mkfs.ext4 -q -F -b 4096 "$DEV"
check mount-dm mount "$DEV" $W/mnt
check write-files-dm write_files $W/mnt 8 g
head -c 4M /dev/urandom >$W/victim.v1
cp $W/victim.v1 $W/mnt/victim && sync
EXT=$(filefrag -v -b4096 $W/mnt/victim | awk '$1 == "0:" { gsub(/[.:]/, " "); print $4, $6; exit }')
PSTART=${EXT% *}
PLEN=${EXT#* }
BAD=$((PLEN < 64 ? PLEN : 64))
echo "victim extent: block $PSTART, $PLEN blocks; making $BAD blocks bad"
if [ -z "$PSTART" ] || [ "$BAD" -le 0 ]; then fail filefrag "cannot locate the victim: $(filefrag -v -b4096 $W/mnt/victim)"; finish; fi
S0=$((PSTART * 8))
SL=$((BAD * 8))
TABLE="0 $S0 linear $LOOP 0
$S0 $SL error
$((S0 + SL)) $((SECTORS - S0 - SL)) linear $LOOP $((S0 + SL))"
check dm-suspend dmsetup suspend dmrmain
check dm-load sh -c "printf '%s\n' '$TABLE' | dmsetup load dmrmain"
check dm-resume dmsetup resume dmrmain
BEFORE=$(ctl status u1 --json | json v.remappedBlocks)
head -c 4M /dev/urandom >$W/victim.v2
T=$(up)
check rewrite-over-bad dd if=$W/victim.v2 of=$W/mnt/victim bs=1M conv=notrunc,fsync oflag=direct status=none
echo "rewrite over bad blocks: $(el "$T")"
AFTER=$(ctl status u1 --json | json v.remappedBlocks)
WERR=$(ctl status u1 --json | json v.writeErrors)
echo "remappedBlocks $BEFORE -> $AFTER, writeErrors $WERR"
[ "$AFTER" -ge $((BEFORE + BAD)) ] && pass remaps-counted "$BEFORE -> $AFTER (>= +$BAD)" || fail remaps-counted "$BEFORE -> $AFTER, expected +$BAD"
echo 3 >/proc/sys/vm/drop_caches
check victim-reads-back cmp $W/victim.v2 $W/mnt/victim
check umount-dm umount $W/mnt
check fsck-dm e2fsck -fn "$DEV"
check remount-dm mount "$DEV" $W/mnt
check verify-dm sh -c "cd $W/mnt && sha256sum -c --quiet $W/sums-g && cmp $W/victim.v2 victim"
check umount-dm2 umount $W/mnt
ctl status u1
T=$(up)
check remove-dm ctl remove u1
echo "remove: $(el "$T")"
[ -e /sys/class/ublk-char/ublkc$ID ] && fail ublkc-gone-dm "ublkc$ID still exists" || pass ublkc-gone-dm ""
check dm-remove dmsetup remove dmrmain
losetup -d "$LOOP"

# ------------------------------------------------------------ 2b: fast path
# Plain reads and writes of unmarked blocks are served by the queue threads
# straight on main (docs/UBLK.md "Fast path"). A manual remap marks its
# blocks, waits for the fast writes that missed the mark, then copies: fio
# writes every block of 32 MiB (4 passes, each verified) while every 8th
# block is remapped; a write lost to the copy fails the verify.
section "ublk fast path: remaps racing fast writes"
truncate -s 64M $W/fmain.img
truncate -s 16M $W/fspare.img
OUT=$(ctl add u4 --main $W/fmain.img --spare $W/fspare.img --format --ublk 2>&1)
DEV=$(echo "$OUT" | tail -n1)
case "$DEV" in /dev/ublkb*) pass add-fast "$DEV" ;; *) fail add-fast "$OUT" ;; esac
T=$(up)
(ctl remap u4 $(seq 0 8 8191) >$W/remap-race.out 2>&1; echo "remap exit $? at $(el "$T")" >>$W/remap-race.out) &
RPID=$!
check fast-race-fio fio --name=race --filename="$DEV" --rw=randwrite --bs=4k --size=32M --loops=4 --iodepth=16 --ioengine=libaio --direct=1 \
	--verify=crc32c --verify_fatal=1 --output=$W/fio-race.log
echo "fio done at $(el "$T")"
wait $RPID
tail -n1 $W/remap-race.out
grep -q "remap exit 0" $W/remap-race.out && pass fast-race-remap "" || fail fast-race-remap "$(tail -n3 $W/remap-race.out)"
REMAPPED=$(ctl status u4 --json | json 'v.remappedBlocks')
[ "${REMAPPED:-0}" -ge 1024 ] && pass fast-race-remapped "$REMAPPED" || fail fast-race-remapped "$REMAPPED"
check fast-race-reverify fio --name=race --filename="$DEV" --rw=randwrite --bs=4k --size=32M --iodepth=16 --ioengine=libaio --direct=1 \
	--verify=crc32c --verify_fatal=1 --verify_only --output=$W/fio-reverify.log
check remove-fast ctl remove u4
LINE=$(grep '"ublk-detached"' $W/daemon.log | tail -n1)
echo "$LINE"
FW=$(echo "$LINE" | sed -n 's/.*"fastWrites":\([0-9]*\).*/\1/p')
FR=$(echo "$LINE" | sed -n 's/.*"fastReads":\([0-9]*\).*/\1/p')
[ "${FW:-0}" -gt 10000 ] && [ "${FR:-0}" -gt 10000 ] && pass fast-path-used "fastWrites $FW fastReads $FR" || fail fast-path-used "fastWrites ${FW:-none} fastReads ${FR:-none}"

# ------------------------------------------------------------ 2c: queues and depth
# `--ublk-queues 2 --ublk-depth 64` (docs/UBLK.md "Queues"): the kernel's
# blk-mq has 2 hardware queues of 64 tags, status and devices.json say so,
# and fio verify with 2 jobs (the guest has 2 vCPUs, so both queues may carry I/O).
section "ublk queues and depth (2 x 64)"
truncate -s 64M $W/qmain.img
truncate -s 16M $W/qspare.img
OUT=$(ctl add u5 --main $W/qmain.img --spare $W/qspare.img --format --ublk --ublk-queues 2 --ublk-depth 64 2>&1)
DEV=$(echo "$OUT" | tail -n1)
case "$DEV" in /dev/ublkb*) pass add-queues "$DEV" ;; *) fail add-queues "$OUT" ;; esac
ID=${DEV#/dev/ublkb}
grep '"ublk-attached"' $W/daemon.log | tail -n1
NQ=$(ls /sys/block/ublkb$ID/mq/ 2>/dev/null | wc -l)
[ "$NQ" -eq 2 ] && pass queues-mq "$(ls /sys/block/ublkb$ID/mq/ | tr '\n' ' ')" || fail queues-mq "mq entries: $NQ ($(ls /sys/block/ublkb$ID/mq/ 2>&1 | tr '\n' ' '))"
TAGS=$(cat /sys/block/ublkb$ID/mq/0/nr_tags /sys/block/ublkb$ID/mq/1/nr_tags 2>/dev/null | tr '\n' ' ')
[ "$TAGS" = "64 64 " ] && pass queues-nr-tags "$TAGS" || fail queues-nr-tags "nr_tags: '$TAGS'"
QS=$(ctl status u5 --json | json 'v.ublk.device+" "+v.ublk.queues+" "+v.ublk.depth')
[ "$QS" = "$DEV 2 64" ] && pass queues-status "$QS" || fail queues-status "status ublk: '$QS'"
SPEC=$(json 'JSON.stringify(v.devices.filter(d=>d.name==="u5").map(d=>[d.ublk,d.ublkQueues,d.ublkDepth]))' <$W/state/devices.json)
[ "$SPEC" = '[[true,2,64]]' ] && pass queues-spec "devices.json $SPEC" || fail queues-spec "devices.json u5: '$SPEC'"
check queues-fio fio --name=q --filename="$DEV" --rw=randwrite --bs=4k --size=16M --numjobs=2 --offset_increment=16M --iodepth=32 \
	--ioengine=libaio --direct=1 --verify=crc32c --verify_fatal=1 --group_reporting --output=$W/fio-queues.log
grep -E 'IOPS|err=' $W/fio-queues.log | head -n 3
check remove-queues ctl remove u5
[ -e /sys/class/ublk-char/ublkc$ID ] && fail ublkc-gone-queues "ublkc$ID still exists" || pass ublkc-gone-queues ""

# ------------------------------------------------------------ 2d: the main disappears
# `dmsetup remove --force` of the main under fio writes swaps its table for
# `error` (it stays open, so it cannot go yet): every I/O then fails with EIO,
# as media errors do. No remap storm: the engine probes main before the
# first remap, finds nothing answering, and fails the device (docs/ENGINE.md).
section "ublk: the main disappears under writes (dmsetup remove --force)"
truncate -s 128M $W/vmain.img
truncate -s 16M $W/vspare.img
VLOOP=$(losetup -f --show $W/vmain.img)
check dm-create-vanish dmsetup create dmrvanish --table "0 $(blockdev --getsz "$VLOOP") linear $VLOOP 0"
dmsetup mknodes dmrvanish
OUT=$(ctl add uv --main /dev/mapper/dmrvanish --spare $W/vspare.img --format --ublk 2>&1)
VDEV=$(echo "$OUT" | tail -n1)
case "$VDEV" in /dev/ublkb*) pass add-vanish "$VDEV" ;; *) fail add-vanish "$OUT" ;; esac
fio --name=vanish --filename="$VDEV" --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio --direct=1 --time_based --runtime=8 \
	--size=64M --output=$W/fio-vanish.log >/dev/null 2>&1 &
FPID=$!
sleep 2
T=$(up)
dmsetup remove --force dmrvanish >$W/dm-vanish.out 2>&1
echo "dmsetup remove --force: $(tr '\n' ' ' <$W/dm-vanish.out)($(el "$T"))"
wait $FPID
echo "fio exit $? (errors expected)"
ctl status uv --json >$W/vanish.json
echo "status: $(json '"state "+v.state+", remapped "+v.remappedBlocks+", pending "+v.pendingBlocks+", spare used "+v.spareBlocksUsed+", writeErrors "+v.stats.writeErrors+": "+v.failReason' <$W/vanish.json)"
[ "$(json v.state <$W/vanish.json)" = failed ] && pass vanish-failed "" || fail vanish-failed "$(json v.state <$W/vanish.json)"
[ "$(json v.remappedBlocks <$W/vanish.json)" = 0 ] && [ "$(json v.pendingBlocks <$W/vanish.json)" = 0 ] && pass vanish-no-remap-storm "" \
	|| fail vanish-no-remap-storm "remapped $(json v.remappedBlocks <$W/vanish.json) pending $(json v.pendingBlocks <$W/vanish.json)"
json v.failReason <$W/vanish.json | grep -q "looks dead" && pass vanish-reason "" || fail vanish-reason "$(json v.failReason <$W/vanish.json)"
grep -q '"event":"device-failed"' $W/daemon.log && pass vanish-logged "" || fail vanish-logged ""
T=$(up)
check remove-vanish ctl remove uv --timeout 3000
echo "remove: $(el "$T")"
check dm-gone-vanish sh -c "dmsetup remove dmrvanish 2>/dev/null; ! dmsetup info dmrvanish >/dev/null 2>&1"
losetup -d "$VLOOP"

# ------------------------------------------------------------ 3: throughput, both copy modes
section "ublk throughput (USER_COPY, then per-tag buffers)"
truncate -s 256M $W/tmain.img
truncate -s 16M $W/tspare.img
ddrate() { # LABEL MIB DD-ARGS...: prints MB/s and IOPS from dd's wall time
	label=$1
	mib=$2
	shift 2
	t=$(up)
	dd "$@" status=none || return 1
	awk -v l="$label" -v m="$mib" -v a="$t" -v b="$(up)" -v args="$*" 'BEGIN{bs=index(args,"bs=4k")?4096:1048576; printf "THROUGHPUT %s %.1f MiB/s %.0f IOPS (%.2fs)\n", l, m/(b-a), m*1048576/bs/(b-a), b-a}'
}
OUT=$(ctl add u2 --main $W/tmain.img --spare $W/tspare.img --format --ublk 2>&1)
DEV=$(echo "$OUT" | tail -n1)
check tp-write-usercopy ddrate usercopy-write 64 if=/dev/zero of="$DEV" bs=1M count=64 oflag=direct
check tp-read-usercopy ddrate usercopy-read 64 if="$DEV" of=/dev/null bs=1M count=64 iflag=direct
check tp-read4k-usercopy ddrate usercopy-read-4k-qd1 8 if="$DEV" of=/dev/null bs=4k count=2048 iflag=direct
check remove-tp ctl remove u2
kill "$DPID" && wait "$DPID"
echo "daemon exit $?"
DM_REMAPD_UBLK_COPY=buffers DM_REMAPD_UBLK_RING=plain node "$PROJECT/dist/src/daemon/main.js" --state-dir $W/state3 --control-socket "$SOCK" >$W/daemon3.log 2>&1 &
DPID=$!
i=0
while ! ctl list >/dev/null 2>&1 && [ $i -lt 300 ] && kill -0 $DPID 2>/dev/null; do i=$((i + 1)); sleep 0.1; done
OUT=$(ctl add u3 --main $W/tmain.img --spare $W/tspare.img --ublk 2>&1)
DEV=$(echo "$OUT" | tail -n1)
grep -q '"userCopy":false' $W/daemon3.log && pass per-tag-buffers-used "" || fail per-tag-buffers-used "$(grep ublk-attached $W/daemon3.log)"
check tp-write-buffers ddrate buffers-write 64 if=/dev/zero of="$DEV" bs=1M count=64 oflag=direct
check tp-read-buffers ddrate buffers-read 64 if="$DEV" of=/dev/null bs=1M count=64 iflag=direct
check tp-read4k-buffers ddrate buffers-plainring-read-4k-qd1 8 if="$DEV" of=/dev/null bs=4k count=2048 iflag=direct
head -c 8M /dev/urandom >$W/pat2
check buffers-roundtrip sh -c "dd if=$W/pat2 of=$DEV bs=1M oflag=direct conv=fsync status=none && dd if=$DEV of=$W/back2 bs=1M count=8 iflag=direct status=none && cmp $W/pat2 $W/back2"
check mkfs-buffers mkfs.ext4 -q -F -b 4096 "$DEV"
check fsck-buffers e2fsck -fn "$DEV"
check remove-buffers ctl remove u3

section daemon
kill "$DPID" && wait "$DPID"
echo "daemon exit $?"
DPID=
check no-ublkc sh -c '! ls /sys/class/ublk-char/ 2>/dev/null | grep -q ublkc'
check modprobe-r-ublk unload ublk_drv
echo "daemon warnings: $(grep -c '"level":40' $W/daemon.log), errors: $(grep -cE '"level":(50|60)' $W/daemon.log)"
grep -E '"level":(40|50|60)' $W/daemon.log | tail -n 20
section "dmesg (filtered)"
dmesg | grep -iE 'ublk|device-mapper|ext4|error|warn|call trace|hung' | tail -n 30
finish
