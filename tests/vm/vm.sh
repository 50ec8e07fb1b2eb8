#!/usr/bin/env bash
# tests/vm/vm.sh: the project's real-kernel test guest (docs/VM.md).
#
#   tests/vm/vm.sh prepare          install host packages, fetch the kernel, build the initramfs
#   tests/vm/vm.sh run SCRIPT       prepare, boot the guest, run SCRIPT inside, exit with its code
#
# The guest is QEMU (TCG; KVM only with DMR_VM_ACCEL=kvm) running Debian
# bookworm-backports' 6.12 kernel, which has nbd, ublk_drv and device-mapper.
# It sees the host root read-only over 9p, so it runs the host's node, the
# built addon and dist/ with no image to build. The cache folder is shared
# read-write at its host path; each run gets a scratch folder inside it.
#
# Exit codes of `run`: the guest script's own code; 98 when the guest died or
# hit the host timeout without reporting one; 77 when QEMU cannot run here at
# all (no binary and no way to install it).
#
# Environment: DMR_VM_CACHE (default /var/tmp/dm-remapd-vm), DMR_VM_TIMEOUT
# (host-side kill, default 300 s), DMR_VM_GUEST_TIMEOUT (default: host - 20),
# DMR_VM_MEM (2G), DMR_VM_SMP (2), DMR_VM_ACCEL (tcg|kvm), DMR_VM_REFRESH=1
# (fetch the kernel again), DMR_VM_QUIET=1 (console only in the log file).
# Every DMR_GUEST_* variable is passed to the guest script (e.g.
# DMR_GUEST_CYCLES=N for guest-matrix-*.sh, 100 by default).
# A script with a line "# dmr-vm-append: ARGS" gets ARGS added to the kernel
# command line (tests/vm/guest-boot.sh: dmr.mode=systemd, systemd as PID 1
# after the script; docs/VM.md).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# The project is shared on its own too: a checkout under /tmp, /var/tmp, /root or
# /run would be hidden by the tmpfs the guest mounts there (a CI clone often is).
PROJECT_DIR=$(cd "$HERE/../.." && pwd)
CACHE=${DMR_VM_CACHE:-/var/tmp/dm-remapd-vm}
HOST_PACKAGES=(qemu-system-x86 busybox-static kmod cpio xz-utils dmsetup e2fsprogs nbd-client debian-archive-keyring udev)

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }
timing() { echo "VM-TIMING $1 $(since "$2")s${3:+ ($3)}"; }
log() { echo "vm.sh: $*" >&2; }

# ---------------------------------------------------------------- packages
ensure_packages() {
	local t missing=()
	t=$(now)
	for p in "${HOST_PACKAGES[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
	done
	if [ ${#missing[@]} -gt 0 ]; then
		if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
			log "missing host packages: ${missing[*]} (run as root on Debian to install them)"
			command -v qemu-system-x86_64 >/dev/null || exit 77
			exit 1
		fi
		log "installing ${missing[*]}"
		export DEBIAN_FRONTEND=noninteractive
		apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 ||
			{ apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; } ||
			{ log "apt-get install ${missing[*]} failed"; command -v qemu-system-x86_64 >/dev/null || exit 77; exit 1; }
	fi
	timing packages "$t" "${#missing[@]} installed"
}

# ---------------------------------------------------------------- kernel
# bookworm-backports' current kernel, through a private APT configuration:
# /etc/apt is never read for sources nor changed.
fetch_kernel() {
	local t pkg kv
	t=$(now)
	if [ -f "$CACHE/kernel/.done" ] && [ "${DMR_VM_REFRESH:-0}" != 1 ]; then
		timing kernel "$t" "cached $(cat "$CACHE/kernel/PKG")"
		return
	fi
	mkdir -p "$CACHE/apt/lists/partial" "$CACHE/apt/cache/archives/partial" "$CACHE/apt/empty.d"
	cat >"$CACHE/apt/sources.list" <<'EOF'
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main
EOF
	cat >"$CACHE/apt/apt.conf" <<EOF
Dir::Etc::SourceList "$CACHE/apt/sources.list";
Dir::Etc::SourceParts "$CACHE/apt/empty.d";
Dir::Etc::Preferences "/nonexistent";
Dir::Etc::PreferencesParts "$CACHE/apt/empty.d";
Dir::State::Lists "$CACHE/apt/lists";
Dir::Cache "$CACHE/apt/cache";
APT::Sandbox::User "root";
EOF
	export APT_CONFIG="$CACHE/apt/apt.conf"
	apt-get -q update >/dev/null
	pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
	[ -n "$pkg" ] || { log "cannot resolve linux-image-amd64 in bookworm-backports"; exit 1; }
	log "kernel package: $pkg"
	rm -rf "$CACHE/kernel.new" && mkdir -p "$CACHE/kernel.new"
	(cd "$CACHE/kernel.new" && apt-get -q download "$pkg" >/dev/null && dpkg-deb -x ./*.deb root && rm -f ./*.deb)
	unset APT_CONFIG
	kv=$(ls "$CACHE/kernel.new/root/lib/modules")
	# The Debian package has no modules.dep: the guest uses modprobe -d.
	depmod -b "$CACHE/kernel.new/root" "$kv"
	echo "$pkg" >"$CACHE/kernel.new/PKG"
	echo "$kv" >"$CACHE/kernel.new/KV"
	touch "$CACHE/kernel.new/.done"
	rm -rf "$CACHE/kernel" && mv "$CACHE/kernel.new" "$CACHE/kernel"
	rm -f "$CACHE/initramfs.cpio.gz"
	timing kernel "$t" "downloaded $pkg"
}

# ---------------------------------------------------------------- initramfs
build_initramfs() {
	local t kv key dir m f
	t=$(now)
	kv=$(cat "$CACHE/kernel/KV")
	key="$kv $(sha256sum "$HERE/init" | cut -d' ' -f1) $(sha256sum /bin/busybox | cut -d' ' -f1)"
	if [ -f "$CACHE/initramfs.cpio.gz" ] && [ "$(cat "$CACHE/initramfs.key" 2>/dev/null)" = "$key" ]; then
		timing initramfs "$t" cached
		return
	fi
	dir=$(mktemp -d "$CACHE/initramfs.XXXXXX")
	mkdir -p "$dir/bin" "$dir/lib/modules" "$dir/proc" "$dir/sys" "$dir/dev" "$dir/newroot"
	cp /bin/busybox "$dir/bin/busybox" # busybox-static
	for m in netfs 9pnet 9pnet_virtio 9p; do
		# a module built into the kernel has no file: skip it
		f=$(modprobe -d "$CACHE/kernel/root" -S "$kv" -n --show-depends "$m" 2>/dev/null | awk -v m="/$m.ko" 'index($2, m){print $2}' | tail -1)
		[ -z "$f" ] && continue
		case "$f" in
		*.xz) xz -dc "$f" >"$dir/lib/modules/$m.ko" ;;
		*) cp "$f" "$dir/lib/modules/$m.ko" ;;
		esac
	done
	cp "$HERE/init" "$dir/init" && chmod 755 "$dir/init"
	(cd "$dir" && find . | cpio -o -H newc --quiet | gzip -1 >"$CACHE/initramfs.cpio.gz.tmp")
	mv "$CACHE/initramfs.cpio.gz.tmp" "$CACHE/initramfs.cpio.gz"
	echo "$key" >"$CACHE/initramfs.key"
	rm -rf "$dir"
	timing initramfs "$t" built
}

prepare() {
	mkdir -p "$CACHE"
	ensure_packages
	# One preparer at a time (parallel test files share the cache).
	exec 9>"$CACHE/.lock"
	flock 9
	fetch_kernel
	build_initramfs
	flock -u 9
}

# ---------------------------------------------------------------- run
run_guest() {
	local script=$1 t run kv accel host_to guest_to rc log append
	case "$script" in /*) ;; *) script="$PWD/$script" ;; esac
	[ -r "$script" ] || { log "no such script: $script"; exit 2; }
	t=$(now)
	prepare
	timing prepare "$t"
	command -v qemu-system-x86_64 >/dev/null || { log "SKIP: qemu-system-x86_64 not available"; exit 77; }
	mkdir -p "$CACHE/runs"
	# keep the last 5 runs' logs, and every run of the last 2 hours (runs in
	# parallel must not delete each other's folder while their guest writes to it)
	{ ls -1dt "$CACHE"/runs/* 2>/dev/null || true; } | tail -n +6 |
		while read -r d; do [ -z "$(find "$d" -maxdepth 0 -mmin +120)" ] || rm -rf "$d"; done
	run=$(mktemp -d "$CACHE/runs/$(date +%Y%m%d-%H%M%S)-XXXX")
	chmod 755 "$run"
	# DMR_GUEST_* settings reach the guest script through the run folder (lib.sh sources it)
	for v in $(compgen -v DMR_GUEST_ || true); do printf 'export %s=%q\n' "$v" "${!v}"; done >"$run/env"
	log="$run/console.log"
	append=$(sed -n 's/^# dmr-vm-append: *//p' "$script" | head -n1)
	# systemd-modules-load and modprobe look in /lib/modules/<kernel> only: the
	# guest binds its kernel's modules there, which needs the folder on the
	# (read-only for the guest) host root
	case " $append " in *" dmr.mode=systemd "*) [ -d /lib/modules ] || mkdir -p /lib/modules ;; esac
	kv=$(cat "$CACHE/kernel/KV")
	host_to=${DMR_VM_TIMEOUT:-300}
	guest_to=${DMR_VM_GUEST_TIMEOUT:-$((host_to - 20))}
	case "${DMR_VM_ACCEL:-tcg}" in
	kvm) accel=(-accel kvm -cpu host) ;;
	*) accel=(-accel tcg,thread=multi,tb-size=512 -cpu max) ;;
	esac
	log "booting $kv (${DMR_VM_ACCEL:-tcg}), script $script, log $log"
	local attempt
	for attempt in 1 2; do
	t=$(now)
	set +e
	timeout -s KILL "$host_to" qemu-system-x86_64 \
		"${accel[@]}" -m "${DMR_VM_MEM:-2G}" -smp "${DMR_VM_SMP:-2}" \
		-nodefaults -no-user-config -display none -no-reboot \
		-serial stdio \
		-kernel "$CACHE/kernel/root/boot/vmlinuz-$kv" \
		-initrd "$CACHE/initramfs.cpio.gz" \
		-append "console=ttyS0 panic=-1 loglevel=4 dmr.work=$CACHE dmr.run=$run dmr.cmd=$script dmr.timeout=$guest_to dmr.project=$PROJECT_DIR${append:+ $append}" \
		-virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
		-virtfs "local,path=$CACHE,mount_tag=work,security_model=none,multidevs=remap" \
		-virtfs "local,path=$PROJECT_DIR,mount_tag=project,security_model=none,readonly=on,multidevs=remap" \
		</dev/null 2>&1 | if [ "${DMR_VM_QUIET:-0}" = 1 ]; then cat >"$log"; else tee "$log"; fi
	set -e
	timing guest "$t" "qemu wall time"
	# A guest kernel that dies before the script starts (seen once in ~60
	# boots: an int3 Oops while the kernel patches its own text early in boot
	# under multi-threaded TCG) ran no test: boot once more, loudly.
	if [ "$attempt" = 1 ] && ! grep -q '^VMTEST_EXIT=' "$log" && ! grep -q '^VMTEST: root ready' "$log"; then
		mv "$log" "$run/console.boot-failed.log"
		log "*** the guest died before the script started ($(grep -m1 -E 'Oops|panic|BUG' "$run/console.boot-failed.log" || echo 'no report')); booting again (log kept: $run/console.boot-failed.log) ***"
		continue
	fi
	break
	done
	rc=$(sed -n 's/^VMTEST_EXIT=\([0-9]*\).*/\1/p' "$log" | tail -n1)
	if [ -z "$rc" ]; then
		log "no VMTEST_EXIT in $log: the guest crashed or hit the ${host_to}s host timeout"
		exit 98
	fi
	log "guest script exit code $rc"
	exit "$rc"
}

case "${1:-}" in
prepare) t0=$(now); prepare; timing prepare "$t0" ;;
run) shift; run_guest "${1:?usage: vm.sh run SCRIPT}" ;;
*) echo "usage: $0 prepare | run SCRIPT" >&2; exit 2 ;;
esac
