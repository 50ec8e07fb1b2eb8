/**
 * Real-kernel tests in a QEMU guest (tests/vm/vm.sh, docs/VM.md): the kernel
 * NBD client and ublk (/dev/ublkbN) on dm-remapd devices, bad blocks injected
 * with device-mapper.
 * Skips (loudly) only when QEMU cannot run on this machine at all.
 */
import { spawn } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = join(HERE, '..', '..');
const ENABLED = process.env.DMR_VM === '1';

function runGuest(script: string, timeoutS = 280): Promise<{ code: number; out: string }> {
  return new Promise((resolve) => {
    const p = spawn('bash', [join(HERE, 'vm.sh'), 'run', join(ROOT, script.includes('/') ? script : join('tests', 'vm', script))], {
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

describe.skipIf(!ENABLED)('VM guest (set DMR_VM=1)', () => {
  it('kernel NBD attach: ext4 cycle, dm error segments remapped, modules unload', async (ctx) => {
    const r = await runGuest('guest-nbd.sh');
    if (r.code === 77) {
      console.warn(`\n*** VM TEST SKIPPED: QEMU cannot run on this machine ***\n${r.out}`);
      ctx.skip();
      return;
    }
    const logLine = /log (\S+console\.log)/.exec(r.out)?.[1] ?? '(no log)';
    const results = r.out.split('\n').filter((l) => /^(VM-TIMING|vm\.sh:|RESULT|VMTEST)/.test(l));
    console.log(results.join('\n'));
    if (r.code !== 0) console.log(`guest console: ${logLine}`);
    expect(r.code, `guest exit code (98: guest died without reporting); console log: ${logLine}`).toBe(0);
  }, 300_000);

  it('ublk: /dev/ublkbN ext4 cycle, discard/zeroes, dm error segments remapped, delete leaves no ublkc, module unloads', async (ctx) => {
    const r = await runGuest('guest-ublk.sh');
    if (r.code === 77) {
      console.warn(`\n*** VM TEST SKIPPED: QEMU cannot run on this machine ***\n${r.out}`);
      ctx.skip();
      return;
    }
    const logLine = /log (\S+console\.log)/.exec(r.out)?.[1] ?? '(no log)';
    const results = r.out.split('\n').filter((l) => /^(VM-TIMING|vm\.sh:|RESULT|VMTEST)/.test(l));
    console.log(results.join('\n'));
    if (r.code !== 0) console.log(`guest console: ${logLine}`);
    expect(r.code, `guest exit code (98: guest died without reporting); console log: ${logLine}`).toBe(0);
  }, 300_000);

  it('ublk crash recovery: kill -9 and SIGTERM under fio on a mounted /dev/ublkb0, same device recovered, verify passes, fsck clean; without recovery no orphan ublkc', async (ctx) => {
    // 8 daemon starts (node over 9p: 8-40 s each under TCG) and two fio runs: 290-430 s of guest on a loaded 2-core host.
    const r = await runGuest('guest-ublk-recovery.sh', 600);
    if (r.code === 77) {
      console.warn(`\n*** VM TEST SKIPPED: QEMU cannot run on this machine ***\n${r.out}`);
      ctx.skip();
      return;
    }
    const logLine = /log (\S+console\.log)/.exec(r.out)?.[1] ?? '(no log)';
    const results = r.out.split('\n').filter((l) => /^(VM-TIMING|vm\.sh:|RESULT|VMTEST)/.test(l));
    console.log(results.join('\n'));
    if (r.code !== 0) console.log(`guest console: ${logLine}`);
    expect(r.code, `guest exit code (98: guest died without reporting); console log: ${logLine}`).toBe(0);
  }, 620_000);

  // tests/vm/guest-matrix.sh, once per frontend: fio verify, openers refused, removal during a
  // metadata write and during error recovery, remove --force, add/remove cycles with flat figures
  for (const kind of ['ublk', 'nbd'] as const) {
    it(`matrix on ${kind === 'ublk' ? '/dev/ublkbN' : '/dev/nbdN'}: fio verify=crc32c, openers named, removal mid-metadata-write and mid-recovery, --force, cycles flat, module unloads`, async (ctx) => {
      const t0 = Date.now();
      const r = await runGuest(`guest-matrix-${kind}.sh`, 480);
      if (r.code === 77) {
        console.warn(`\n*** VM TEST SKIPPED: QEMU cannot run on this machine ***\n${r.out}`);
        ctx.skip();
        return;
      }
      const logLine = /log (\S+console\.log)/.exec(r.out)?.[1] ?? '(no log)';
      console.log(r.out.split('\n').filter((l) => /^(VM-TIMING|vm\.sh:|RESULT|VMTEST|CYCLES|=====)/.test(l)).join('\n'));
      console.log(`guest-matrix-${kind}.sh: ${((Date.now() - t0) / 1000).toFixed(1)} s; console: ${logLine}`);
      expect(r.out.match(/^RESULT \S+ FAIL.*$/gm) ?? [], `failed checks; console log: ${logLine}`).toEqual([]);
      expect(r.code, `guest exit code (98: guest died without reporting); console log: ${logLine}`).toBe(0);
    }, 500_000); // ~150 s on an idle host, 310 s measured with a load average of 11
  }

  // tests/vm/guest-crash.sh (docs/RELIABILITY.md): main and spare on one dm-log-writes log, the
  // log replayed at every FLUSH/FUA point and random (torn) subsets after each
  it('crash consistency with dm-log-writes: every replayed state valid in remapctl inspect and the engine, acknowledged remaps and data present', async (ctx) => {
    const r = await runGuest('guest-crash.sh', 480);
    if (r.code === 77) {
      console.warn(`\n*** VM TEST SKIPPED: QEMU cannot run on this machine ***\n${r.out}`);
      ctx.skip();
      return;
    }
    const logLine = /log (\S+console\.log)/.exec(r.out)?.[1] ?? '(no log)';
    console.log(r.out.split('\n').filter((l) => /^(VM-TIMING|vm\.sh:|RESULT|VMTEST|FAIL|crash consistency:)/.test(l)).join('\n'));
    expect(r.out.match(/^RESULT \S+ FAIL.*$/gm) ?? [], `failed checks; console log: ${logLine}`).toEqual([]);
    expect(r.code, `guest exit code (98: guest died without reporting); console log: ${logLine}`).toBe(0);
  }, 500_000);

  // Stable names and the mount-namespace self-deadlock (docs/OPERATION.md, "Stable names, boot
  // order and mount namespaces"): tests/vm/guest-names.sh and guest-mntns.sh
  for (const [script, what] of [
    ['guest-names.sh', 'stable names: /dev/disk/by-remap links for ublk and nbd, across a restart, stale ones dropped; the udev rule (database, partitions)'],
    ['guest-mntns.sh', 'mount namespaces: no warning in the initial one; a private one warns, detaches its mounts at SIGTERM and exits in time; without the detach the exit hangs until a new daemon recovers the device'],
  ] as const) {
    it(what, async (ctx) => {
      const r = await runGuest(script, 480);
      if (r.code === 77) {
        console.warn(`\n*** VM TEST SKIPPED: QEMU cannot run on this machine ***\n${r.out}`);
        ctx.skip();
        return;
      }
      const logLine = /log (\S+console\.log)/.exec(r.out)?.[1] ?? '(no log)';
      console.log(r.out.split('\n').filter((l) => /^(VM-TIMING|vm\.sh:|RESULT|VMTEST|HAZARD|\*\*\*)/.test(l)).join('\n'));
      expect(r.out.match(/^RESULT \S+ FAIL.*$/gm) ?? [], `failed checks; console log: ${logLine}`).toEqual([]);
      expect(r.code, `guest exit code (98: guest died without reporting); console log: ${logLine}`).toBe(0);
    }, 500_000);
  }
});
