#!/bin/sh
# Guest test: stable names /dev/disk/by-remap/NAME (docs/OPERATION.md,
# "Stable names, boot order and mount namespaces"; docs/VM.md).
#  1. A ublk and an nbd device: the link and the udev name file while they
#     run, I/O through the link; a daemon restart (SIGTERM, start) keeps the
#     link of a ublk device the kernel keeps for recovery (docs/UBLK.md,
#     "Daemon stop"), drops the others, links the reassembled devices again
#     and drops a stale link; remove takes the links away.
#  2. With systemd-udevd running (when the host has the udev package) and
#     udev/99-dm-remapd.rules installed: udev's database has the links (what
#     systemd's .device units, and so fstab, rely on), a partition gets
#     NAME-part1, and they go at removal.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/guest-daemon.sh"
. "$(dirname "$0")/names-ns-lib.sh"

section modules
check modprobe modules ublk_drv nbd

# ------------------------------------------------------------ 1: links, restart
section "stable names (no udev)"
mkdir -p $W/a
truncate -s 128M $W/u.img $W/n.img
truncate -s 16M $W/us.img $W/ns.img
launch $W/d1.log $W/a
U=$(ctl add u0 --main $W/u.img --spare $W/us.img --format --ublk 2>&1 | tail -n1)
N=$(ctl add n0 --main $W/n.img --spare $W/ns.img --format --nbd-device auto 2>&1 | tail -n1)
echo "u0 = $U, n0 = $N"
check link-ublk link_is u0 "$U"
check link-nbd link_is n0 "$N"
ls -l $BYR
check udev-file-ublk udev_file_is u0 "$U"
check udev-file-nbd udev_file_is n0 "$N"
check by-remap-mode sh -c "[ \"\$(stat -c %a $BYR)\" = 755 ]"
head -c 4M /dev/urandom >$W/pat
check io-through-link-ublk sh -c "dd if=$W/pat of=$BYR/u0 bs=1M oflag=direct conv=fsync status=none && dd if=$U bs=1M count=4 iflag=direct status=none | cmp - $W/pat"
check io-through-link-nbd sh -c "dd if=$W/pat of=$BYR/n0 bs=1M oflag=direct conv=fsync status=none && dd if=$N bs=1M count=4 iflag=direct status=none | cmp - $W/pat"
ln -s ../../ublkb9 $BYR/ghost # left by a crash: no such device now
stop_daemon
check stop-exit-0 [ "$DRC" = 0 ]
if [ -e "/sys/block/${U#/dev/}" ]; then
	echo "$U kept by the kernel for the next daemon (quiesced)"
	check stop-ublk-link-kept link_is u0 "$U"
else
	check stop-ublk-link-gone no_link u0
fi
check stop-nbd-link-gone no_link n0
check nbd-disconnected sh -c "[ ! -e /sys/block/${N#/dev/}/pid ]"
launch $W/d2.log $W/a
U2=$(kdev u0)
N2=$(kdev n0)
echo "after restart: u0 = $U2, n0 = $N2"
grep '"event":"stable-names"' $W/d2.log | cut -c1-300
check restart-link-ublk link_is u0 "$U2"
check restart-link-nbd link_is n0 "$N2"
check restart-stale-removed no_link ghost
check restart-data-ublk sh -c "dd if=$BYR/u0 bs=1M count=4 iflag=direct status=none | cmp - $W/pat"
check restart-data-nbd sh -c "dd if=$BYR/n0 bs=1M count=4 iflag=direct status=none | cmp - $W/pat"
check remove-nbd ctl remove n0
check remove-nbd-link-gone no_link n0
check remove-nbd-udev-file-gone sh -c "[ ! -e /run/dm-remapd/udev/${N2#/dev/} ]"
check remove-ublk ctl remove u0
check remove-ublk-link-gone no_link u0
check remove-ublk-gone ublkc_gone "$U2"

# ------------------------------------------------------------ 2: the udev rule
section "udev rule"
UDEVD=
for x in /lib/systemd/systemd-udevd /usr/lib/systemd/systemd-udevd; do [ -x $x ] && UDEVD=$x && break; done
if [ -z "$UDEVD" ] || ! command -v udevadm >/dev/null; then
	echo "*** SKIPPED: no systemd-udevd on the host root (apt-get install udev): the rule is not tested ***"
else
	# (udevadm settle and control refuse to act in a chroot, as the guest
	# runs: wait on the results instead, and stop udevd by its pid.)
	mkdir -p /run/udev/rules.d
	cp "$PROJECT/udev/99-dm-remapd.rules" /run/udev/rules.d/
	$UDEVD --resolve-names=never >$W/udevd.log 2>&1 &
	UPID=$!
	wait_for 10 test -S /run/udev/control
	U=$(ctl add u1 --main $W/u.img --spare $W/us.img --ublk 2>&1 | tail -n1)
	N=$(ctl add n1 --main $W/n.img --spare $W/ns.img --nbd-device auto 2>&1 | tail -n1)
	in_db() { udevadm info -q symlink -n "$1" 2>/dev/null | tr ' ' '\n' | grep -qx "$2"; }
	not_in_db() { ! udevadm info -q symlink -n "$1" 2>/dev/null | grep -q by-remap; }
	check udev-db-ublk wait_for 10 in_db "$U" disk/by-remap/u1
	check udev-db-nbd wait_for 10 in_db "$N" disk/by-remap/n1
	echo "udev symlinks of $U: $(udevadm info -q symlink -n "$U")"
	echo "udev symlinks of $N: $(udevadm info -q symlink -n "$N")"
	check udev-link-ublk link_is u1 "$U"
	# A DOS partition table (written by hand: no sfdisk needed) with one
	# partition, in 4096-byte logical sectors: from 256 (1 MiB), 32512 long
	# (to the end of 128 MiB); then a rescan: udev names the partition.
	printf '\000\000\000\000\203\000\000\000\000\001\000\000\000\177\000\000' >$W/pte
	# (the other three entries must be zero: the kernel rejects the table otherwise)
	check write-mbr sh -c "dd if=/dev/zero of=$U bs=512 count=1 conv=notrunc status=none && dd if=$W/pte of=$U bs=1 seek=446 conv=notrunc status=none && printf '\125\252' | dd of=$U bs=1 seek=510 conv=notrunc status=none && sync && blockdev --rereadpt $U"
	grep ublk /proc/partitions
	part_link() { [ "$(readlink -f $BYR/u1-part1)" = "${U}p1" ]; }
	check udev-part-link wait_for 10 part_link
	check udev-part-db wait_for 10 in_db "${U}p1" disk/by-remap/u1-part1
	ls -l $BYR
	# udev may hold a disk open for a moment (its probes): remove refuses
	# an open device (exit 5), so try again
	remove_retry() { for _ in 1 2 3 4 5; do ctl remove "$1" && return 0; [ $? = 5 ] || return 1; sleep 1; done; return 1; }
	check udev-remove-nbd remove_retry n1
	check udev-db-nbd-gone wait_for 10 not_in_db "$N"
	check udev-link-nbd-gone no_link n1
	check udev-remove-ublk remove_retry u1
	check udev-links-ublk-gone wait_for 10 no_links u1 u1-part1
	kill $UPID && wait $UPID
	cat $W/udevd.log | tail -n 5
fi

section cleanup
stop_daemon
check no-ublkc sh -c '! ls /sys/class/ublk-char/ 2>/dev/null | grep -q ublkc'
check modprobe-r unload ublk_drv nbd
for f in d1 d2; do echo "$f: warnings $(grep -c '"level":40' $W/$f.log), errors $(grep -cE '"level":(50|60)' $W/$f.log)"; done
grep -hE '"level":(40|50|60)' $W/d1.log $W/d2.log | cut -c1-300 | tail -n 10
finish
