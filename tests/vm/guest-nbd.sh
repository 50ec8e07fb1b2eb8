#!/bin/sh
# Guest test: dm-remapd devices served to the kernel NBD client (/dev/nbdN).
#  1. file-backed main + spare: mkfs.ext4, mount, write, umount, fsck, remount,
#     verify; remove; `modprobe -r nbd` succeeds.
#  2. main = loop device under a device-mapper linear table; an `error` segment
#     is loaded live (suspend/load/resume) under a file's blocks; rewriting the
#     file through /dev/nbdN succeeds, `remapctl status --json` counts the
#     remaps, the data reads back, fsck stays clean.
#  3. main and spare as dm devices over overlapping parts of one loop device
#     (dm-linear, dm-delay, dm-flakey): refused, exit 2, the loop device and
#     both byte ranges named, nothing written; disjoint ones accepted, and
#     refused to a second device (exit 5) while the first has them.
#  4. nbd attached through the ioctls instead of netlink.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/guest-daemon.sh"

section modules
check modprobe modules nbd dm-mod loop ext4

start_daemon

# ------------------------------------------------------------ 1: files
section "nbd over files"
truncate -s 256M $W/main.img
truncate -s 32M $W/spare.img
T=$(up)
OUT=$(ctl add d0 --main $W/main.img --spare $W/spare.img --format --nbd-device auto 2>&1)
echo "$OUT"
DEV=$(echo "$OUT" | tail -n1)
case "$DEV" in /dev/nbd*) pass add-nbd "$DEV in $(el "$T")" ;; *) fail add-nbd "no device printed"; tail -20 $W/daemon.log; finish ;; esac
echo "size $(blockdev --getsize64 "$DEV") bs $(blockdev --getbsz "$DEV") ro $(blockdev --getro "$DEV")"

write_files() { # DIR COUNT PREFIX
	n=0
	while [ $n -lt "$2" ]; do
		head -c $((256 * 1024 + n * 4096)) /dev/urandom >"$1/$3$n.bin" || return 1
		n=$((n + 1))
	done
	(cd "$1" && sha256sum ./*.bin >$W/sums-$3)
}
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
T=$(up)
check remove ctl remove d0
[ -e /sys/block/${DEV#/dev/}/pid ] && fail nbd-disconnected "$DEV still has a client" || pass nbd-disconnected ""
check modprobe-r-nbd unload nbd
grep -q '^nbd ' /proc/modules && fail nbd-unloaded "nbd still loaded" || pass nbd-unloaded ""
check modprobe-nbd-again modules nbd

# ------------------------------------------------------------ 2: device-mapper bad blocks
section "nbd over dm with error segments"
truncate -s 256M $W/dmain.img
truncate -s 32M $W/dspare.img
LOOP=$(losetup -f --show $W/dmain.img)
SECTORS=$(blockdev --getsz "$LOOP")
check dm-create dmsetup create dmrmain --table "0 $SECTORS linear $LOOP 0"
dmsetup mknodes dmrmain # no udev in the guest
T=$(up)
OUT=$(ctl add d1 --main /dev/mapper/dmrmain --spare $W/dspare.img --format --nbd-device auto 2>&1)
echo "$OUT"
DEV=$(echo "$OUT" | tail -n1)
case "$DEV" in /dev/nbd*) pass add-nbd-dm "$DEV in $(el "$T")" ;; *) fail add-nbd-dm "no device printed"; tail -20 $W/daemon.log; finish ;; esac
check mkfs-dm mkfs.ext4 -q -F -b 4096 "$DEV"
check mount-dm mount "$DEV" $W/mnt
check write-files-dm write_files $W/mnt 8 g
head -c 4M /dev/urandom >$W/victim.v1
cp $W/victim.v1 $W/mnt/victim && sync
# the victim's first extent (4 KiB blocks = dm-remapd blocks, no offset: separate spare)
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
T=$(up)
check dm-suspend dmsetup suspend dmrmain
check dm-load sh -c "printf '%s\n' '$TABLE' | dmsetup load dmrmain"
check dm-resume dmsetup resume dmrmain
dmsetup table dmrmain
echo "error segment live in $(el "$T")"
BEFORE=$(ctl status d1 --json | json v.remappedBlocks)
head -c 4M /dev/urandom >$W/victim.v2
T=$(up)
check rewrite-over-bad dd if=$W/victim.v2 of=$W/mnt/victim bs=1M conv=notrunc,fsync oflag=direct status=none
echo "rewrite over bad blocks: $(el "$T")"
AFTER=$(ctl status d1 --json | json v.remappedBlocks)
WERR=$(ctl status d1 --json | json v.writeErrors)
echo "remappedBlocks $BEFORE -> $AFTER, writeErrors $WERR"
[ "$AFTER" -ge $((BEFORE + BAD)) ] && pass remaps-counted "$BEFORE -> $AFTER (>= +$BAD)" || fail remaps-counted "$BEFORE -> $AFTER, expected +$BAD"
echo 3 >/proc/sys/vm/drop_caches
check victim-reads-back cmp $W/victim.v2 $W/mnt/victim
check umount-dm umount $W/mnt
check fsck-dm e2fsck -fn "$DEV"
check remount-dm mount "$DEV" $W/mnt
check verify-dm sh -c "cd $W/mnt && sha256sum -c --quiet $W/sums-g && cmp $W/victim.v2 victim"
check umount-dm2 umount $W/mnt
ctl status d1
check remove-dm ctl remove d1
check dm-remove dmsetup remove dmrmain
losetup -d "$LOOP"
check modprobe-r-nbd-end unload nbd

# ------------------------------------------------------------ 3: overlap through dm
# Two dm devices over overlapping parts of one loop device both open O_EXCL
# (dm holds the loop device once, for both): stack-overlap.ts reads their
# tables and refuses the pair (exit 2, EINVAL) before anything is written.
section "overlap through dm"
check modprobe-dm-targets modules dm-delay dm-flakey
truncate -s 64M $W/ov.img
OVL=$(losetup -f --show $W/ov.img)
# sectors of $OVL: a = 0..32767, b = 16384..49151 (the second half of a), c = 32768..65535 (after a)
check dm-ov-create sh -c "dmsetup create dmrova --table '0 32768 linear $OVL 0' && dmsetup create dmrovb --table '0 32768 linear $OVL 16384' && dmsetup create dmrovc --table '0 32768 linear $OVL 32768'"
dmsetup mknodes
echo "dmrovb: $(dmsetup table --major "$(dmsetup info -c --noheadings -o major dmrovb | tr -d ' ')" --minor "$(dmsetup info -c --noheadings -o minor dmrovb | tr -d ' ')")"
# expect_refused NAME EXIT TEXT ctl-args...: remapctl exits EXIT and prints TEXT
expect_refused() {
	local name=$1 want=$2 text=$3 out rc
	shift 3
	out=$(ctl "$@" 2>&1)
	rc=$?
	echo "$name: exit $rc: $out"
	case "$out" in
	*"$text"*) [ $rc -eq "$want" ] && pass "$name" "exit $rc" || fail "$name" "exit $rc, expected $want" ;;
	*) fail "$name" "exit $rc, no \"$text\" in: $out" ;;
	esac
}
expect_refused dm-overlap-refused 2 "spare /dev/mapper/dmrovb overlaps the main /dev/mapper/dmrova: both are stored on $OVL (bytes 8388608..25165824 and 0..16777216)" \
	add ov1 --main /dev/mapper/dmrova --spare /dev/mapper/dmrovb --format
check dm-overlap-nothing-written cmp -n $((64 << 20)) $OVL /dev/zero
ctl inspect /dev/mapper/dmrovb >/dev/null 2>&1 && fail dm-overlap-no-metadata "inspect found metadata on the spare" || pass dm-overlap-no-metadata ""
[ "$(ctl list --json | json v.length)" = 0 ] && pass dm-overlap-not-listed "" || fail dm-overlap-not-listed "$(ctl list)"
T=$(up)
check dm-disjoint-accepted ctl add ov2 --main /dev/mapper/dmrova --spare /dev/mapper/dmrovc --format
echo "disjoint dm-linear main/spare accepted in $(el "$T")"
# another device on b (over a's second half) while ov2 has a: the daemon's cross-device check
truncate -s 16M $W/ov3-spare.img
expect_refused dm-overlap-other-device 5 "/dev/mapper/dmrovb overlaps /dev/mapper/dmrova, used by device \"ov2\": both are stored on $OVL" \
	add ov3 --main /dev/mapper/dmrovb --spare $W/ov3-spare.img --format
check dm-disjoint-removed ctl remove ov2
# a spare that is a delay / flakey device over a part of a (reads of a dm-linear main's bytes through another target)
check dm-ov-create-delay-flakey sh -c "dmsetup create dmrovd --table '0 16384 delay $OVL 24576 0' && dmsetup create dmrovf --table '0 16384 flakey $OVL 8192 1 0'"
dmsetup mknodes
expect_refused dm-overlap-delay-refused 2 "spare /dev/mapper/dmrovd overlaps the main /dev/mapper/dmrova: both are stored on $OVL (bytes 12582912..20971520 and 0..16777216)" \
	add ov4 --main /dev/mapper/dmrova --spare /dev/mapper/dmrovd --format
expect_refused dm-overlap-flakey-refused 2 "spare /dev/mapper/dmrovf overlaps the main /dev/mapper/dmrova: both are stored on $OVL (bytes 4194304..12582912 and 0..16777216)" \
	add ov5 --main /dev/mapper/dmrova --spare /dev/mapper/dmrovf --format
[ "$(ctl list --json | json v.length)" = 0 ] && pass dm-overlap-none-left "" || fail dm-overlap-none-left "$(ctl list)"
check dm-ov-remove dmsetup remove dmrova dmrovb dmrovc dmrovd dmrovf
losetup -d "$OVL"

section daemon
kill "$DPID" && wait "$DPID"
echo "daemon exit $?"
DPID=

# ------------------------------------------------------------ 4: the ioctl fallback
section "nbd attach through the ioctls"
check modprobe-nbd-ioctl modules nbd
SOCK=$W/control2.sock
DM_REMAPD_NBD_ATTACH=ioctl node "$PROJECT/dist/src/daemon/main.js" --state-dir $W/state2 --control-socket "$SOCK" >$W/daemon2.log 2>&1 &
DPID=$!
i=0
while ! ctl list >/dev/null 2>&1 && [ $i -lt 300 ] && kill -0 $DPID 2>/dev/null; do i=$((i + 1)); sleep 0.1; done
truncate -s 64M $W/imain.img
truncate -s 16M $W/ispare.img
OUT=$(ctl add d2 --main $W/imain.img --spare $W/ispare.img --format --nbd-device /dev/nbd3 2>&1)
echo "$OUT"
DEV=$(echo "$OUT" | tail -n1)
grep -q '"method":"ioctl"' $W/daemon2.log && pass ioctl-used "" || fail ioctl-used "daemon did not attach with the ioctls"
[ "$DEV" = /dev/nbd3 ] && pass add-nbd-ioctl "$DEV" || fail add-nbd-ioctl "got '$DEV'"
head -c 8M /dev/urandom >$W/pat
check ioctl-dd sh -c "dd if=$W/pat of=$DEV bs=1M oflag=direct conv=fsync status=none && dd if=$DEV of=$W/back bs=1M count=8 iflag=direct status=none && cmp $W/pat $W/back"
check remove-ioctl ctl remove d2
[ -e /sys/block/nbd3/pid ] && fail ioctl-disconnected "/dev/nbd3 still has a client" || pass ioctl-disconnected ""
kill "$DPID" && wait "$DPID"
DPID=
check modprobe-r-nbd-ioctl unload nbd
echo "daemon warnings: $(grep -c '"level":40' $W/daemon.log), errors: $(grep -cE '"level":(50|60)' $W/daemon.log)"
grep -E '"level":(50|60)' $W/daemon.log | tail -n 20
section "dmesg (filtered)"
dmesg | grep -iE 'nbd|device-mapper|ext4|error|warn|call trace' | tail -n 30
finish
