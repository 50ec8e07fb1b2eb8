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

function runGuest(script: string): Promise<{ code: number; out: string }> {
  return new Promise((resolve) => {
    const p = spawn('bash', [join(HERE, 'vm.sh'), 'run', join(HERE, script)], {
      cwd: ROOT,
      env: { ...process.env, DMR_VM_TIMEOUT: '280' },
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
});
