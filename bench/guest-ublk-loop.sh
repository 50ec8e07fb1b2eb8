#!/bin/sh
# Guest benchmark (`npm run bench:ublk` boots it in the test VM, docs/VM.md):
# fio 4 KiB random read and random write at QD32 on /dev/ublkbN (dm-remapd)
# vs a kernel loop device (`losetup --direct-io=on`) on the same file, in one
# boot. TCG makes absolute figures meaningless: the ratio ublk/loop is the
# figure (goal >= 0.90x).
#
# The file lives on ext4 on a RAM disk (brd), so both sides really do O_DIRECT
# (tmpfs has none). Both copy modes of the ublk frontend are measured: USER_COPY
# (the default where the kernel has it) and per-tag buffers
# (DM_REMAPD_UBLK_COPY=buffers). Each ublk run sits between loop runs; its
# ratio is against the mean of the loop runs of the same workload.
#
# DMR_GUEST_BENCH_RUNTIME (s per fio run, 8), DMR_GUEST_BENCH_DEPTH (32).
DMR_PROJECT=$(cd "$(dirname "$0")/.." && pwd)
. "$DMR_PROJECT/tests/vm/lib.sh"
. "$DMR_PROJECT/tests/vm/guest-daemon.sh"
RUNTIME=${DMR_GUEST_BENCH_RUNTIME:-8}
QD=${DMR_GUEST_BENCH_DEPTH:-32}
SIZE_MB=256

cd $W # fio keeps state files in the working folder (the host root is read-only)
section modules
check modprobe modules ublk_drv loop ext4
check brd modprobe -d "$KROOT" brd rd_nr=1 rd_size=$(((SIZE_MB + 128) * 1024))
echo "kernel $(uname -r), $(nproc) vCPUs, TCG"

section "files on ext4 on /dev/ram0"
B=$W/bench
mkdir -p $B
check mkfs mkfs.ext4 -q -F /dev/ram0
check mount mount /dev/ram0 $B
T=$(up)
check fill dd if=/dev/zero of=$B/main.img bs=1M count=$SIZE_MB oflag=direct status=none
truncate -s 32M $B/spare.img
echo "main.img written (${SIZE_MB} MiB, allocated blocks) in $(el "$T")"
LOOP=$(losetup -f --show --direct-io=on $B/main.img)
L=${LOOP#/dev/}
DIO=$(cat /sys/block/$L/loop/dio)
[ "$DIO" = 1 ] && pass loop-direct-io "$LOOP dio=1" || fail loop-direct-io "$LOOP dio=$DIO"

# fio_iops DEV RW LABEL: one time-based run; prints "<iops> <clat p99 us> <usr+sys cpu %>"
fio_iops() {
	fio --name="$3" --filename="$1" --ioengine=libaio --direct=1 --rw="$2" --bs=4k --iodepth=$QD --size=${SIZE_MB}M \
		--time_based --runtime=$RUNTIME --ramp_time=1 --randrepeat=0 --norandommap --eta=never --output-format=json --output=$W/fio-$3.json >/dev/null 2>&1 || return 1
	k=read
	[ "$2" = randwrite ] && k=write
	json "Math.round(v.jobs[0].$k.iops)+' '+Math.round(((v.jobs[0].$k.clat_ns.percentile||{})['99.000000']||0)/1000)+' '+(v.jobs[0].usr_cpu+v.jobs[0].sys_cpu).toFixed(0)" <$W/fio-$3.json
}
cpu_ticks() { awk '{print $14 + $15}' /proc/$DPID/stat; }
RESULTS=$W/bench.txt
: >$RESULTS
# run KIND MODE DEV RW: one fio run, recorded as "KIND MODE RW IOPS P99 FIOCPU DAEMONCPU_US_PER_IO"
run() {
	c0=0
	[ "$1" = ublk ] && c0=$(cpu_ticks)
	r=$(fio_iops "$3" "$4" "$1-$2-$4") || { fail "fio-$1-$2-$4" "$(tail -5 $W/fio-$1-$2-$4.json)"; return; }
	d="-"
	if [ "$1" = ublk ]; then
		ticks=$(($(cpu_ticks) - c0))
		d=$(awk -v t="$ticks" -v i="${r%% *}" -v s="$RUNTIME" 'BEGIN{printf "%.0f", t * 10000 / (i * (s + 1))}')
	fi
	echo "$1 $2 $4 $r $d" >>$RESULTS
	echo "BENCH $1 ($2) $4 4k QD$QD: ${r%% *} IOPS (clat p99 $(echo "$r" | cut -d' ' -f2) us, fio cpu $(echo "$r" | cut -d' ' -f3)%, daemon cpu $d us/IO)"
}

ublk_phase() { # MODE [ENV...]: daemon with ENV, device added, read and write runs between loop runs
	mode=$1
	shift
	section "ublk ($mode) vs loop"
	env "$@" node "$PROJECT/dist/src/daemon/main.js" --state-dir $W/state-$mode --control-socket "$SOCK" >$W/daemon-$mode.log 2>&1 &
	DPID=$!
	wait_ctl
	U=$(ctl add bu --main $B/main.img --spare $B/spare.img --format --ublk 2>&1 | tail -n1)
	case "$U" in /dev/ublkb*) pass "add-$mode" "$U" ;; *) fail "add-$mode" "$U"; tail $W/daemon-$mode.log; return ;; esac
	grep '"ublk-attached"' $W/daemon-$mode.log | json '"userCopy "+v.userCopy+", queues "+v.queues+", depth "+v.depth+", maxIo "+v.maxIo' 2>/dev/null
	echo "engine open mode: $(ctl status bu --json | json v.openMode)"
	for rw in randread randwrite; do
		run loop "$mode" "$LOOP" $rw
		run ublk "$mode" "$U" $rw
		run loop "$mode" "$LOOP" $rw
	done
	check "remove-$mode" ctl remove bu
	kill $DPID && wait $DPID
	DPID=
}
wait_ctl() {
	i=0
	while ! ctl list >/dev/null 2>&1 && [ $i -lt 300 ] && kill -0 $DPID 2>/dev/null; do i=$((i + 1)); sleep 0.1; done
}

ublk_phase usercopy DM_REMAPD_UBLK_COPY=auto
ublk_phase buffers DM_REMAPD_UBLK_COPY=buffers
# Every request through the engine (no native fast path): what the fast path buys.
ublk_phase engine-only DM_REMAPD_UBLK_COPY=auto DM_REMAPD_UBLK_FAST=0

section "summary: ublk / loop, 4 KiB random, QD$QD, ${RUNTIME} s runs (goal >= 0.90x)"
awk '
	$1 == "loop" { ls[$2" "$3] += $4; ln[$2" "$3]++ }
	$1 == "ublk" { u[$2" "$3] = $4; p99[$2" "$3] = $5; cpu[$2" "$3] = $7; order[++n] = $2" "$3 }
	END {
		printf "%-10s %-10s %12s %12s %8s %5s %14s %16s\n", "mode", "workload", "ublk IOPS", "loop IOPS", "ratio", "goal", "ublk p99 us", "daemon us/IO"
		for (k = 1; k <= n; k++) {
			key = order[k]; split(key, a, " ")
			l = ls[key] / ln[key]; r = u[key] / l
			printf "%-10s %-10s %12d %12d %7.3fx %5s %14d %16s\n", a[1], a[2], u[key], l, r, (r >= 0.9 ? "PASS" : "MISS"), p99[key], cpu[key]
			printf "BENCH-RATIO %s %s %.3f\n", a[1], a[2], r > "/dev/stderr"
		}
	}' $RESULTS 2>&1
losetup -d "$LOOP"
umount $B
finish
