#!/bin/sh
# Phase 2 of tests/vm/guest-boot.sh: run by dmr-boot-test.service (ordered
# after local-fs.target) with systemd as PID 1. Prints RESULT lines and
# VMTEST_EXIT=<failures> on the console; the unit then powers off.
. "$(dirname "$0")/lib.sh"
B=${DMR_BOOT_DIR:?}
MNT=srv-data.mount
DEVU='dev-disk-by\x2dremap-data.device'
prop() { systemctl show -P "$2" "$1"; }
# microseconds since boot -> seconds
sec() { awk -v u="$1" 'BEGIN{printf "%.2f", u/1e6}'; }
ge() { [ "$1" -gt 0 ] && [ "$2" -gt 0 ] && [ "$1" -ge "$2" ]; }

section "phase 2: systemd boot${DMR_GUEST_BOOT_VARIANT:+ (variant $DMR_GUEST_BOOT_VARIANT)}"
echo "VMTEST: phase 2 check at $(up)s"
check pid1-is-systemd [ "$(cat /proc/1/comm)" = systemd ]
check mounted findmnt -n /srv/data
SRC=$(findmnt -n -o SOURCE /srv/data)
LINK=$(readlink -f /dev/disk/by-remap/data)
echo "/srv/data from ${SRC:-nothing}; /dev/disk/by-remap/data -> ${LINK:-nothing}"
check mount-on-ublk sh -c "case '$SRC' in /dev/ublkb*) true ;; *) false ;; esac"
check mount-is-by-remap-data sh -c "[ -n '$SRC' ] && [ '$SRC' = '$LINK' ]"
check mount-unit-from-fstab sh -c "systemctl cat $MNT | grep -qx 'What=/dev/disk/by-remap/data'"
[ -z "${DMR_GUEST_BOOT_VARIANT:-}" ] && check mount-requires-daemon sh -c "systemctl show -P Requires $MNT | tr ' ' '\n' | grep -qx dm-remapd.service"
check mount-unit-active [ "$(prop $MNT ActiveState)" = active ]
check udev-db-link sh -c "udevadm info -q symlink -n '$SRC' | tr ' ' '\n' | grep -qx disk/by-remap/data"
check device-unit-active [ "$(prop "$DEVU" ActiveState)" = active ]
check payload-sha256 [ "$(sha256sum </srv/data/payload | cut -d' ' -f1)" = "$(cat $B/payload.sha256)" ]
check ublk-loaded-at-boot [ -e /sys/module/ublk_drv ]
check modules-load-ran [ "$(prop systemd-modules-load.service ActiveState)/$(prop systemd-modules-load.service Result)" = active/success ]
check daemon-type-notify [ "$(prop dm-remapd.service Type)" = notify ]
check daemon-running [ "$(prop dm-remapd.service ActiveState)/$(prop dm-remapd.service SubState)" = active/running ]
check daemon-no-restarts [ "$(prop dm-remapd.service NRestarts)" = 0 ]
check remapctl-list-data sh -c "node '$PROJECT/dist/src/cli/remapctl.js' list | grep -w data"

# The order, from systemd's own timestamps (monotonic, microseconds):
# a Type=notify service is active once it sent READY=1.
ML=$(prop systemd-modules-load.service ActiveEnterTimestampMonotonic)
UD=$(prop systemd-udevd.service ActiveEnterTimestampMonotonic)
DS=$(prop dm-remapd.service InactiveExitTimestampMonotonic)
DR=$(prop dm-remapd.service ActiveEnterTimestampMonotonic)
PRE=$(prop local-fs-pre.target ActiveEnterTimestampMonotonic)
DV=$(prop "$DEVU" ActiveEnterTimestampMonotonic)
MS=$(prop $MNT InactiveExitTimestampMonotonic)
MU=$(prop $MNT ActiveEnterTimestampMonotonic)
LF=$(prop local-fs.target ActiveEnterTimestampMonotonic)
echo "BOOT-TIMING modules-load done $(sec "$ML")s, udevd up $(sec "$UD")s, dm-remapd started $(sec "$DS")s, ready $(sec "$DR")s, local-fs-pre.target $(sec "$PRE")s, by-remap/data device $(sec "$DV")s, mount started $(sec "$MS")s, mounted $(sec "$MU")s, local-fs.target $(sec "$LF")s (0: never)"
check daemon-after-modules-load ge "$DS" "$ML"
check daemon-after-udevd ge "$DS" "$UD"
check daemon-ready-before-local-fs-pre ge "$PRE" "$DR"
check daemon-ready-before-mount-starts ge "$MS" "$DR"
check local-fs-after-mount ge "$LF" "$MU"
check local-fs-target-active [ "$(prop local-fs.target ActiveState)" = active ]
# The unit's CapabilityBoundingSet has no CAP_SYS_PTRACE, so the daemon
# cannot read /proc/1/ns/mnt and logs "initial": null (EACCES): checked is
# that it logged its namespace and no mount-namespace-private warning.
journalctl -b -u dm-remapd.service -o cat --no-pager >$B/daemon2.log 2>&1
grep '"event":"mount-namespace' $B/daemon2.log | cut -c1-300
check daemon-mount-namespace-not-private sh -c "grep -q '\"event\":\"mount-namespace\"' $B/daemon2.log && ! grep -q '\"event\":\"mount-namespace-private\"' $B/daemon2.log"

section "phase 2: diagnostics"
systemctl --failed --no-pager --plain 2>&1 | head -n 20
systemctl list-dependencies --no-pager --plain $MNT 2>&1 | head -n 20
echo "dm-remapd.service log (warnings $(grep -c '"level":40' $B/daemon2.log), errors $(grep -cE '"level":(50|60)' $B/daemon2.log)):"
cut -c1-240 $B/daemon2.log | tail -n 25
journalctl -b -u $MNT -o short-monotonic --no-pager 2>&1 | tail -n 8
section summary
echo "fails=$FAILS t=$(up)s"
echo "VMTEST_EXIT=$FAILS"
exit 0
