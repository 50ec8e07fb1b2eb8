#!/bin/sh
# Guest test: crash consistency with dm-log-writes (issue 5, docs/RELIABILITY.md).
#  1. One data loop device under one dm-log-writes target (log on a second
#     loop device); main (4 MiB, with dm `error` segments over some blocks)
#     and spare (8 MiB) are dm-linear segments of it, so the log orders every
#     write of both.
#  2. crash-workload.mjs runs the engine on them: random tagged writes (some
#     FUA), flushes (a log mark `flush-N` after each), manual remaps; writes
#     into the error segments remap.
#  3. The target is torn down and crash-check.mjs replays the log: the prefix
#     up to every FLUSH/FUA entry, and random subsets (some torn) of the
#     writes after each; every state through remapctl inspect and the engine.
# Sizes: DMR_GUEST_CC_WRITES (acknowledged writes of the workload, 600),
# DMR_GUEST_CC_SUBSETS (random
# subsets per point, 1), DMR_GUEST_CC_CLI (states also inspected by a
# remapctl process, 2, plus the whole log), DMR_GUEST_CC_SEED; DMR_GUEST_CC_SABOTAGE=journal|data
# (negative control: the replay drops journal commits or main writes, and
# the check must fail).
. "$(dirname "$0")/lib.sh"
HERE="$PROJECT/tests/vm"
W=/tmp/dmrcc
mkdir -p $W
WRITES=${DMR_GUEST_CC_WRITES:-600}
SEED=${DMR_GUEST_CC_SEED:-$(date +%s)}
MAIN=$((4 * 1024 * 1024))
SPARE=$((8 * 1024 * 1024))
BLOCKS=$((MAIN / 4096))
# main blocks under `error` segments (single blocks and runs)
ERR="17,18,19,64,130,131,200,256,257,258,259,333,400,512,513,600,701,702,777,850,901,960,1000,1023"
echo "seed $SEED, workload $WRITES writes, subsets ${DMR_GUEST_CC_SUBSETS:-1}, cli ${DMR_GUEST_CC_CLI:-2}"

section modules
check modprobe modules dm-mod dm-log-writes loop
if ! dmsetup targets | grep -q '^log-writes'; then
	fail dm-log-writes "no log-writes target after modprobe dm-log-writes: $(dmsetup targets | tr '\n' ' ')"
	finish
fi
pass dm-log-writes-target "$(dmsetup targets | grep '^log-writes')"

section "log-writes stack"
truncate -s $((MAIN + SPARE)) $W/data.img
truncate -s 1G $W/log.img
LDATA=$(losetup -f --show $W/data.img)
LLOG=$(losetup -f --show $W/log.img)
echo "data $LDATA ($(blockdev --getss "$LDATA")-byte sectors, write cache $(cat /sys/block/${LDATA#/dev/}/queue/write_cache)), log $LLOG"
check dm-log-writes-create dmsetup create dmrcc-log --table "0 $(((MAIN + SPARE) / 512)) log-writes $LDATA $LLOG"
dmsetup mknodes
TABLE=$W/main.table
: >$TABLE
start=0
for b in $(echo "$ERR" | tr ',' '\n' | sort -n); do
	[ "$b" -gt "$start" ] && echo "$((start * 8)) $(((b - start) * 8)) linear /dev/mapper/dmrcc-log $((start * 8))" >>$TABLE
	echo "$((b * 8)) 8 error" >>$TABLE
	start=$((b + 1))
done
[ "$start" -lt "$BLOCKS" ] && echo "$((start * 8)) $(((BLOCKS - start) * 8)) linear /dev/mapper/dmrcc-log $((start * 8))" >>$TABLE
check dm-main-create sh -c "dmsetup create dmrcc-main <$TABLE"
check dm-spare-create dmsetup create dmrcc-spare --table "0 $((SPARE / 512)) linear /dev/mapper/dmrcc-log $((MAIN / 512))"
dmsetup mknodes
for d in dmrcc-log dmrcc-main dmrcc-spare; do
	s=$(dmsetup info -c --noheadings -o blkdevname $d)
	echo "$d ($s): write cache $(cat /sys/block/$s/queue/write_cache), fua $(cat /sys/block/$s/queue/fua 2>/dev/null)"
done
echo "main table: $(wc -l <$TABLE) segments, $(echo "$ERR" | tr ',' '\n' | wc -l) error blocks"

section workload
T=$(up)
if node "$HERE/crash-workload.mjs" /dev/mapper/dmrcc-main /dev/mapper/dmrcc-spare $W/work.log "$WRITES" "$SEED" dmrcc-log "$ERR"; then
	pass workload "$(el "$T"), $(wc -l <$W/work.log) log lines"
else
	fail workload "rc=$? after $(el "$T")"
	tail -5 $W/work.log
fi
STATUS=$(dmsetup status dmrcc-log)
echo "dm-log-writes status: $STATUS"
case "$STATUS" in *logging_disabled*) fail log-complete "the log device filled up or failed: $STATUS" ;; *) pass log-complete "" ;; esac
# highest log sector in use (+ what the teardown adds: the unflushed writes and an end mark)
LOGBYTES=$(( ($(echo "$STATUS" | awk '{print $5}') + 1) * 512 + 16 * 1024 * 1024 ))
check dm-remove dmsetup remove dmrcc-main dmrcc-spare
check dm-remove-log dmsetup remove dmrcc-log
losetup -d "$LDATA" "$LLOG"

# DMR_GUEST_CC_KEEP=1: the workload log and the used part of the dm-log-writes
# log go to the run folder, to rerun crash-check.mjs on the host
if [ "${DMR_GUEST_CC_KEEP:-0}" = 1 ] && [ -n "${DMR_VM_RUN:-}" ]; then
	cp $W/work.log "$DMR_VM_RUN/work.log"
	head -c "$LOGBYTES" $W/log.img >"$DMR_VM_RUN/log.img"
	echo "kept: $DMR_VM_RUN/work.log, $DMR_VM_RUN/log.img (errors $ERR)"
fi

section replay
T=$(up)
DMR_CC_SUBSETS=${DMR_GUEST_CC_SUBSETS:-1} DMR_CC_CLI=${DMR_GUEST_CC_CLI:-2} DMR_CC_SEED=$SEED DMR_CC_SABOTAGE=${DMR_GUEST_CC_SABOTAGE:-} \
	node "$HERE/crash-check.mjs" $W/log.img $W/work.log $MAIN $SPARE "$ERR" $W "$LOGBYTES" >$W/check.out 2>&1
RC=$?
cat $W/check.out
FIG=$(grep '^crash consistency:' $W/check.out)
if [ $RC -eq 0 ] && [ -n "$FIG" ]; then pass crash-states "$(el "$T"); ${FIG#crash consistency: }"; else fail crash-states "rc=$RC after $(el "$T")"; fi
finish
