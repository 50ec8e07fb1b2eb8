/**
 * Real-kernel tests in a QEMU guest (tests/vm/vm.sh, docs/VM.md): the kernel
 * NBD client and ublk (/dev/ublkbN) on dm-remapd devices, bad blocks injected
 * with device-mapper, crash consistency with dm-log-writes.
 * They run by default (the README's test command and .ci/run run this file
 * last and alone); DMR_VM=0 skips them. They skip, loudly, only when QEMU
 * cannot run on this machine at all (vm.sh exit 77).
 */
import { spawn } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = join(HERE, '..', '..');
const ENABLED = process.env.DMR_VM !== '0';

function runGuest(script: string, timeoutS: number): Promise<{ code: number; out: string }> {
  return new Promise((resolve) => {
    const p = spawn('bash', [join(HERE, 'vm.sh'), 'run', join(HERE, script)], {
      cwd: ROOT,
      env: { ...process.env, DMR_VM_TIMEOUT: String(timeoutS) },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    p.stdout.on('data', (d: Buffer) => { out += d.toString(); });
    p.stderr.on('data', (d: Buffer) => { out += d.toString(); });
    p.on('close', (code) => resolve({ code: code ?? 98, out }));
  });
}

/**
 * One guest script, one boot: its RESULT lines and timings are printed, and
 * the test fails on any failed check or a non-zero guest exit (98: the guest
 * died or hit the host timeout without reporting).
 */
function guestCase(what: string, script: string, timeoutS: number, extra: RegExp | null = null): void {
  it(what, async (ctx) => {
    const t0 = Date.now();
    const r = await runGuest(script, timeoutS);
    if (r.code === 77) {
      console.warn(`\n*** VM TEST SKIPPED: QEMU cannot run on this machine ***\n${r.out}`);
      ctx.skip();
      return;
    }
    const logLine = /log (\S+console\.log)/.exec(r.out)?.[1] ?? '(no log)';
    const shown = r.out.split('\n').filter((l) => /^(VM-TIMING|vm\.sh:|RESULT|VMTEST|=====)/.test(l) || (extra?.test(l) ?? false));
    console.log(`${shown.join('\n')}\n${script}: ${((Date.now() - t0) / 1000).toFixed(1)} s; console: ${logLine}`);
    expect(r.out.match(/^RESULT \S+ FAIL.*$/gm) ?? [], `failed checks; console log: ${logLine}`).toEqual([]);
    expect(r.code, `guest exit code (98: guest died without reporting); console log: ${logLine}`).toBe(0);
  }, (timeoutS + 30) * 1000);
}

describe.skipIf(!ENABLED)('VM guest (DMR_VM=0 skips)', () => {
  // Boot times on the 2-core TCG host, idle: 35-105 s each, ~8 min in all (docs/VM.md).
  guestCase('kernel NBD attach: ext4 cycle, dm error segments remapped, modules unload', 'guest-nbd.sh', 400);
  guestCase('ublk: /dev/ublkbN ext4 cycle, discard/zeroes, dm error segments remapped, fast path under live remaps, delete leaves no ublkc, module unloads',
    'guest-ublk.sh', 420, /^THROUGHPUT/);
  guestCase('ublk crash recovery: kill -9 and SIGTERM under fio on a mounted /dev/ublkb0, same device recovered, verify passes, fsck clean; without recovery no orphan ublkc',
    'guest-ublk-recovery.sh', 600);
  // guest-matrix.sh once per frontend: fio verify, openers refused, removal during a metadata
  // write and during error recovery, remove --force, add/remove cycles with flat figures.
  for (const kind of ['ublk', 'nbd'] as const) {
    guestCase(`matrix on ${kind === 'ublk' ? '/dev/ublkbN' : '/dev/nbdN'}: fio verify=crc32c, openers named, removal mid-metadata-write and mid-recovery, --force, cycles flat, module unloads`,
      `guest-matrix-${kind}.sh`, 480, /^CYCLES/);
  }
  // Main and spare on one dm-log-writes log, replayed at every FLUSH/FUA point and random (torn) subsets after each.
  guestCase('crash consistency with dm-log-writes: every replayed state valid in remapctl inspect and the engine, acknowledged remaps and data present',
    'guest-crash.sh', 480, /^(FAIL|crash consistency:)/);
  // Stable names and the mount-namespace self-deadlock (docs/OPERATION.md, "Stable names, boot order and mount namespaces").
  guestCase('stable names: /dev/disk/by-remap links for ublk and nbd, across a restart, stale ones dropped; the udev rule (database, partitions)',
    'guest-names.sh', 480, /^\*\*\*/);
  // systemd as PID 1 (phase 2 of one boot): the unit, the udev rule and an fstab entry on /dev/disk/by-remap/data.
  guestCase('boot: systemd as PID 1 mounts an fstab entry on /dev/disk/by-remap/data after dm-remapd.service is ready; the file written before the boot reads back',
    'guest-boot.sh', 300, /^BOOT-TIMING/);
  guestCase('mount namespaces: no warning in the initial one; a private one warns, detaches its mounts at SIGTERM and exits in time; without the detach the exit hangs until a new daemon recovers the device',
    'guest-mntns.sh', 480, /^(HAZARD|\*\*\*)/);
});
