/**
 * A scan whose main disk vanishes (the fault disk's nbdkit is SIGKILLed):
 * a non-media error is not an unreadable block. The scan stops as
 * `failed` with the errno, marks nothing pending, remapctl exits 1, and
 * the daemon stays up and removes the device within its deadline.
 */
import { spawn } from 'node:child_process';
import { truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { cleanupAll, makeTempDir, requireTools, startFaultDisk } from '../helpers/faultdisk.js';
import { REMAPCTL, ctl, startDaemon, type Daemon } from './helpers.js';

requireTools('nbdkit', 'nbdkit-python', 'nbdfuse', 'fusermount3', '/dev/fuse');

describe('scan of a vanishing disk', () => {
  let d: Daemon | undefined;
  afterAll(async () => {
    if (d !== undefined) await d.stop();
    await cleanupAll();
  });

  it('stops as failed with the errno, marks nothing pending, and the device is still removable', async () => {
    const dir = await makeTempDir('dmr-scan-vanish-');
    const disk = await startFaultDisk({ dir, name: 'main', sizeBytes: 16 << 20 });
    const spare = join(dir, 'spare.img');
    writeFileSync(spare, '');
    truncateSync(spare, 4 << 20);
    d = await startDaemon(dir);
    expect((await ctl(d.sock, 'add', 'vz', '--main', disk.path, '--spare', spare, '--format')).code).toBe(0);
    const child = spawn(process.execPath, [REMAPCTL, '--socket', d.sock, '--json', 'scan', 'vz', '--rate', '2'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.setEncoding('utf8').on('data', (c: string) => { out += c; });
    const done = new Promise<number | null>((res) => child.on('close', (code) => res(code)));
    const end = Date.now() + 15_000;
    while (!/"event":"progress".*"blocksDone":[1-9]/.test(out)) {
      if (Date.now() > end) throw new Error(`no progress: ${out}`);
      await new Promise((r) => setTimeout(r, 20));
    }
    await disk.kill();
    expect(await done).toBe(1);
    const lines = out.trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
    const res = lines[lines.length - 1] as { event: string; state: string; unreadable: number; error: { code: string; message: string; errnoName?: string } };
    console.log(`[scan vanish] ${JSON.stringify({ state: res.state, error: res.error })}`);
    expect(res).toMatchObject({ event: 'result', state: 'failed', unreadable: 0 });
    expect(res.error.errnoName).toMatch(/^E[A-Z]+$/);
    expect(res.error.errnoName).not.toBe('EIO');
    expect(res.error.message).toMatch(/^scan of vz stopped at block \d+: read on main .* failed \(device vz, read, offset \d+\): E[A-Z]+$/);
    const st = JSON.parse((await ctl(d.sock, '--json', 'status', 'vz')).stdout) as { pendingBlocks: number; state: string };
    expect(st.pendingBlocks).toBe(0);
    const fin = await d.waitLog((l) => l.event === 'scan-finished' && l.device === 'vz');
    expect(fin).toMatchObject({ state: 'failed' });
    const rm = await ctl(d.sock, '--json', 'remove', 'vz', '--timeout', '2000');
    expect(rm.code).toBeLessThanOrEqual(1); // removed; 1 only if the dead disk made it overrun its deadline
    expect((JSON.parse(rm.stdout) as { elapsedMs: number }).elapsedMs).toBeLessThan(2000 + 1000);
    expect((await ctl(d.sock, 'list')).code).toBe(0);
  });
});
