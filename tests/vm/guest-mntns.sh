#!/bin/sh
# Guest test: the ublk mount-namespace self-deadlock and the unit's settings
# (docs/OPERATION.md, "Mount namespaces: the ublk self-deadlock"; docs/VM.md).
# The guest has no systemd: the unit's setting (no namespace options) is the
# daemon in the initial mount namespace; what systemd sandboxing would make
# is reproduced with `unshare -m --propagation slave`.
#  1. Initial namespace: ext4 on m0 (/dev/ublkbN) mounted by its stable name;
#     SIGTERM: no namespace warning, exit within the deadline, the device is
#     kept (quiesced) under the mounted filesystem.
#  2. Restart into a private namespace (it copies m0's mount): the daemon
#     warns, recovers m0 (usable on the host), and p0 is mounted only in its
#     namespace; SIGTERM: it detaches those mounts in its namespace (p0's
#     writeback served) and exits within the deadline.
#  3. Initial namespace again: p0 is clean and holds its files, m0 is still
#     mounted and usable on the same device; all removed, module unloads.
#  4. Only with DMR_GUEST_HAZARD=1, instead of 3's cleanup: a private
#     namespace without the detach (DM_REMAPD_DETACH_OWN_MOUNTS=0), q0
#     mounted only there; SIGTERM: the hazard itself (the exit hangs in its
#     own namespace's unmount, flushing to q0, which waits for a server).
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/guest-daemon.sh"
. "$(dirname "$0")/names-ns-lib.sh"

section modules
check modprobe modules ublk_drv ext4
mkdir -p $W/s $W/mnt-ns $W/mnt2
for x in m p q; do
	truncate -s 128M $W/$x.img
	truncate -s 16M $W/${x}s.img
done

# ------------------------------------------------------------ 1: initial namespace
section "initial mount namespace (the unit's setting): mounted device, SIGTERM"
launch $W/d1.log $W/s
check initial-ns-no-warning only_initial_ns $W/d1.log
grep '"event":"mount-namespace"' $W/d1.log | cut -c1-200
M=$(ctl add m0 --main $W/m.img --spare $W/ms.img --format --ublk 2>&1 | tail -n1)
P=$(ctl add p0 --main $W/p.img --spare $W/ps.img --format --ublk 2>&1 | tail -n1)
Q=$(ctl add q0 --main $W/q.img --spare $W/qs.img --format --ublk 2>&1 | tail -n1)
echo "m0 = $M, p0 = $P, q0 = $Q"
check mkfs-m0 mkfs.ext4 -q -F -b 4096 "$BYR/m0"
check mkfs-p0 mkfs.ext4 -q -F -b 4096 "$BYR/p0"
check mkfs-q0 mkfs.ext4 -q -F -b 4096 "$BYR/q0"
check mount-m0-by-name mount "$BYR/m0" $W/mnt
check write-m0 sh -c "head -c 1M /dev/urandom >$W/mnt/f && (cd $W/mnt && sha256sum f >$W/f.sum) && sync"
stop_daemon
grep -E '"event":"(ublk-suspended|ublk-detached|ublk-del-failed|stable-name-kept)"' $W/d1.log | cut -c1-250
check initial-exit-0 [ "$DRC" = 0 ]
check initial-exit-in-time within "$STOP_S" $((DEADLINE + SLACK))
KEPT=0
if [ -e "/sys/block/${M#/dev/}" ]; then
	KEPT=1
	echo "$M kept (quiesced) under the mounted filesystem"
	check initial-link-kept link_is m0 "$M"
else
	echo "$M deleted at stop: the filesystem on it is dead; unmounting it"
	umount $W/mnt
	check initial-gone-after-umount wait_for 10 ublkc_gone "$M"
fi

# ------------------------------------------------------------ 2: private namespace, detach
section "restart into a private mount namespace (as systemd sandboxing makes): mounts held by the daemon's namespace, SIGTERM"
launch $W/d2.log $W/s unshare -m --propagation slave
check private-ns-warning has_event $W/d2.log mount-namespace-private
grep '"event":"mount-namespace-private"' $W/d2.log | cut -c1-250
if [ $KEPT = 1 ]; then
	check private-ns-copied-m0-mount in_ns "$DPID" grep -q " $W/mnt " /proc/self/mountinfo
	check m0-recovered-usable sh -c "cd $W/mnt && sha256sum -c --quiet $W/f.sum && head -c 64K /dev/urandom >f2 && sync"
fi
P=$(kdev p0)
check mount-p0-in-daemon-ns in_ns "$DPID" mount "$BYR/p0" $W/mnt-ns
check write-p0-in-daemon-ns in_ns "$DPID" sh -c "head -c 2M /dev/urandom >$W/mnt-ns/g && (cd $W/mnt-ns && sha256sum g >$W/g.sum)"
check host-ns-has-no-p0-mount sh -c "! grep -q ' $W/mnt-ns ' /proc/self/mountinfo"
stop_daemon
grep -E '"event":"(own-mount-detached|own-mount-detach-failed|ublk-suspended|ublk-detached|ublk-del-failed)"' $W/d2.log | cut -c1-250
check private-exit-0 [ "$DRC" = 0 ]
check private-exit-in-time within "$STOP_S" $((DEADLINE + SLACK))
check private-p0-mount-detached grep -q "\"event\":\"own-mount-detached\".*\"mountPoint\":\"$W/mnt-ns\"" $W/d2.log
check private-no-detach-failure no_event $W/d2.log own-mount-detach-failed

# ------------------------------------------------------------ 3: what the daemons left
section "initial mount namespace again: p0 and q0 clean, m0 still usable"
launch $W/d3.log $W/s
P2=$(kdev p0)
echo "p0: $P before, $P2 now"
check p0-link link_is p0 "$P2"
check fsck-p0 e2fsck -fn "$BYR/p0"
check data-p0 sh -c "mount $BYR/p0 $W/mnt2 && (cd $W/mnt2 && sha256sum -c --quiet $W/g.sum) && umount $W/mnt2"
check fsck-q0 e2fsck -fn "$BYR/q0"
if [ $KEPT = 1 ]; then
	check m0-same-device [ "$(kdev m0)" = "$M" ]
	check m0-still-usable sh -c "cd $W/mnt && sha256sum -c --quiet $W/f.sum && head -c 64K /dev/urandom >f3 && sync"
fi

# ------------------------------------------------------------ 4: the hazard (DMR_GUEST_HAZARD=1)
if [ "${DMR_GUEST_HAZARD:-0}" != 1 ]; then
	section cleanup
	if [ $KEPT = 1 ]; then
		check m0-umount umount $W/mnt
		check m0-fsck e2fsck -fn "$BYR/m0"
	fi
	for d in m0 p0 q0; do check remove-$d ctl remove $d; done
	check links-gone no_links m0 p0 q0
	stop_daemon
	check no-ublkc sh -c '! ls /sys/class/ublk-char/ 2>/dev/null | grep -q ublkc'
	check modprobe-r unload ublk_drv
	for f in d1 d2 d3; do [ -f $W/$f.log ] && echo "$f: warnings $(grep -c '"level":40' $W/$f.log), errors $(grep -cE '"level":(50|60)' $W/$f.log)"; done
	section "dmesg (filtered)"
	dmesg | grep -iE 'ublk|ext4|error|call trace|hung' | tail -n 20

	finish
fi
stop_daemon
section "private mount namespace without the detach (DM_REMAPD_DETACH_OWN_MOUNTS=0): the hazard"
# Opt-in: a daemon stuck in its exit cannot be killed, and its devices stay
# quiesced (measured: a new daemon does not recover them while the old one
# is still exiting), so nothing after this can be cleaned up.
launch $W/d4.log $W/s env DM_REMAPD_DETACH_OWN_MOUNTS=0 unshare -m --propagation slave
Q=$(kdev q0)
check mount-q0-in-daemon-ns in_ns "$DPID" mount "$BYR/q0" $W/mnt-ns
check write-q0-in-daemon-ns in_ns "$DPID" sh -c "head -c 1M /dev/urandom >$W/mnt-ns/h && sync"
OLD=$DPID
DPID=
T=$(up)
kill -TERM $OLD
wait_for $((DEADLINE + SLACK + 5)) gone $OLD
if gone $OLD; then
	echo "HAZARD not seen: the daemon exited after $(el "$T")"
	fail hazard-reproduced "exited"
else
	echo "HAZARD: the daemon is still exiting $(el "$T") after SIGTERM; kernel stacks:"
	cat /proc/$OLD/task/*/stack 2>/dev/null | grep -vE 'entry_SYSCALL|do_syscall' | sort | uniq -c | head -n 12
	pass hazard-reproduced "$(el "$T")"
	launch $W/d5.log $W/s
	grep -E '"event":"ublk-(attached|stale-deleted|recovery-failed)"' $W/d5.log | cut -c1-300
	wait_for 30 gone $OLD && echo "rescued: the old daemon finished $(el "$T") after SIGTERM" || echo "not rescued: the old daemon is still exiting $(el "$T") after SIGTERM"
fi
finish
