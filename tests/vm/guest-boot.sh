#!/bin/sh
# dmr-vm-append: dmr.mode=systemd systemd.unit=dmr-boot-test.target systemd.show_status=error systemd.log_color=0
# Guest test: a real systemd boot mounts an fstab entry on a remapped device
# (docs/OPERATION.md, "Boot: the unit, udev and fstab"; docs/VM.md).
#
# Phase 1 (this script, chrooted by tests/vm/init as every guest script):
# the daemon on /var/lib/dm-remapd (a tmpfs, as the unit's StateDirectory),
# `remapctl add data --ublk`, ext4 on /dev/disk/by-remap/data with a file of
# known sha256; the daemon stops with DM_REMAPD_UBLK_STOP=remove, so the
# device is gone but devices.json keeps it; ublk_drv is unloaded. Then the
# host root gets what systemd as PID 1 needs (tmpfs or binds over the
# read-only 9p root): /etc/fstab with one entry on /dev/disk/by-remap/data,
# /etc/systemd/system with the project's unit (only ExecStart changed, in a
# drop-in) enabled by `systemctl enable`, a test target and units,
# /etc/udev/rules.d with the project's rule, /etc/modules-load.d with the
# project's file, /lib/modules with the guest kernel's modules.
# Phase 2: init switch_roots to /lib/systemd/systemd (kernel command line
# dmr.mode=systemd systemd.unit=dmr-boot-test.target). The target pulls in
# local-fs.target; tests/vm/guest-boot-check.sh runs after it, prints RESULT
# lines and VMTEST_EXIT=<failures> on the console and powers off.
#
# DMR_GUEST_BOOT_DEADLINE: phase 2's own deadline (150 s), then VMTEST_EXIT=97.
# DMR_GUEST_BOOT_VARIANT (negative control, by hand; docs/VM.md):
#   not-enabled the unit installed but not enabled, fstab without
#               x-systemd.requires= (device timeout 20 s)
. "$(dirname "$0")/lib.sh"
VARIANT=${DMR_GUEST_BOOT_VARIANT:-}
B=/tmp/dmr-boot
ctl() { node "$PROJECT/dist/src/cli/remapctl.js" "$@"; }
mkdir -p $B

section "phase 1: the device, ext4 and a file"
check modprobe modules ublk_drv ext4
# /var/lib: writable for the daemon here and for systemd's StateDirectory= later
check tmpfs-var-lib mount -t tmpfs -o mode=755 tmpfs /var/lib
truncate -s 256M $B/main.img
truncate -s 32M $B/spare.img
DM_REMAPD_UBLK_STOP=remove node "$PROJECT/dist/src/daemon/main.js" >$B/daemon1.log 2>&1 &
DPID=$!
wait_ctl() { i=0; while ! ctl list >/dev/null 2>&1; do i=$((i + 1)); [ $i -gt 300 ] && return 1; kill -0 $DPID 2>/dev/null || return 1; sleep 0.1; done; }
check daemon-start wait_ctl
DEV=$(ctl add data --main $B/main.img --spare $B/spare.img --format --ublk 2>&1 | tail -n1)
echo "data = $DEV"
check add-ublk sh -c "case '$DEV' in /dev/ublkb*) [ -b '$DEV' ] ;; *) false ;; esac"
check link [ "$(readlink -f /dev/disk/by-remap/data)" = "$DEV" ]
check mkfs mkfs.ext4 -q -F /dev/disk/by-remap/data
mkdir -p $B/mnt
check mount mount /dev/disk/by-remap/data $B/mnt
head -c 4M /dev/urandom >$B/mnt/payload
check write-file sh -c "sync && sha256sum <$B/mnt/payload | cut -d' ' -f1 >$B/payload.sha256"
echo "payload sha256 $(cat $B/payload.sha256)"
check umount umount $B/mnt
kill -TERM $DPID
wait $DPID
DRC=$?
check daemon-stop-exit-0 [ "$DRC" = 0 ]
check ublk-deleted sh -c "[ ! -e /sys/block/${DEV#/dev/} ] && ! ls /sys/class/ublk-char/ 2>/dev/null | grep -q ublkc"
check devices-json-keeps-data grep -q '"data"' /var/lib/dm-remapd/devices.json
check link-gone [ ! -e /dev/disk/by-remap/data ]
# systemd-modules-load must load it at boot
check rmmod-ublk unload ublk_drv
check ublk-unloaded [ ! -e /sys/module/ublk_drv ]
rm -rf /run/dm-remapd

section "phase 1: the root for systemd"
S=/etc/systemd/system
check tmpfs-systemd-system mount -t tmpfs -o mode=755 tmpfs $S
cp "$PROJECT/systemd/dm-remapd.service" $S/
if [ "$VARIANT" = not-enabled ]; then
	OPTS=defaults,x-systemd.device-timeout=20s
else
	OPTS=defaults,x-systemd.requires=dm-remapd.service,x-systemd.device-timeout=60s
fi
mkdir -p $S/dm-remapd.service.d
cat >$S/dm-remapd.service.d/test.conf <<EOF
# the guest has no /usr/local/bin/dm-remapd: the built tree of the checkout
[Service]
ExecStart=
ExecStart=$(command -v node) $PROJECT/dist/src/daemon/main.js
EOF
cat >$S/dmr-boot-test.target <<'EOF'
[Unit]
Description=dm-remapd boot test
Wants=local-fs.target systemd-journald.socket dmr-boot-test.service dmr-boot-watchdog.service
AllowIsolate=yes
EOF
cat >$S/dmr-boot-test.service <<EOF
[Unit]
Description=dm-remapd boot test: checks after local-fs.target
DefaultDependencies=no
After=local-fs.target
SuccessAction=poweroff-force
FailureAction=poweroff-force
[Service]
Type=oneshot
Environment=DMR_VM_KROOT=$KROOT DMR_VM_RUN=${DMR_VM_RUN:-} DMR_BOOT_DIR=$B DMR_GUEST_BOOT_VARIANT=$VARIANT
ExecStart=/bin/sh $PROJECT/tests/vm/guest-boot-check.sh
StandardOutput=tty
StandardError=tty
TTYPath=/dev/console
EOF
# a guest-side deadline for phase 2 (VMTEST_EXIT=97), well before the host's
# timeout kills QEMU (DMR_GUEST_BOOT_DEADLINE seconds after the unit starts)
cat >$S/dmr-boot-watchdog.service <<EOF
[Unit]
Description=dm-remapd boot test: deadline
DefaultDependencies=no
SuccessAction=poweroff-force
[Service]
ExecStart=/bin/sh -c 'sleep ${DMR_GUEST_BOOT_DEADLINE:-150}; echo "VMTEST: phase 2 deadline (${DMR_GUEST_BOOT_DEADLINE:-150} s) passed"; systemctl list-jobs --no-pager; echo VMTEST_EXIT=97'
StandardOutput=tty
TTYPath=/dev/console
EOF
# an emergency shell would wait on the console for ever: a failed
# local-fs.target must let the check run and report instead
for u in emergency.target emergency.service rescue.target rescue.service; do ln -s /dev/null $S/$u; done
if [ "$VARIANT" != not-enabled ]; then
	check systemctl-enable systemctl enable dm-remapd.service
fi
ls -lR $S
echo "/dev/disk/by-remap/data /srv/data ext4 $OPTS 0 2" >$B/fstab
cat $B/fstab
check bind-fstab mount --bind $B/fstab /etc/fstab
mkdir -p $B/rules.d $B/modules-load.d
cp "$PROJECT/udev/99-dm-remapd.rules" $B/rules.d/
cp "$PROJECT/systemd/dm-remapd-modules.conf" $B/modules-load.d/dm-remapd.conf
check bind-udev-rules mount --bind $B/rules.d /etc/udev/rules.d
check bind-modules-load mount --bind $B/modules-load.d /etc/modules-load.d
check bind-lib-modules mount --bind "$KROOT/lib/modules" /lib/modules
check tmpfs-srv sh -c "mount -t tmpfs -o mode=755 tmpfs /srv && mkdir /srv/data"
check modprobe-finds-ublk modprobe -n ublk_drv
finish
