/**
 * Removal of a device whose main hangs: one deadline for the whole removal,
 * answered within it plus 1 s, saying what was cancelled; the daemon still
 * exits 0 on SIGTERM afterwards.
 */
import { truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cleanupAll, makeTempDir, requireTools, startFaultDisk, type FaultDisk } from '../helpers/faultdisk.js';
import { raw, request, startDaemon, type Daemon } from './helpers.js';

requireTools('nbdkit', 'nbdkit-python', 'nbdfuse', 'fusermount3', '/dev/fuse');

describe('remove with a hung main', () => {
  let dir: string;
  let disk: FaultDisk;
  let d: Daemon;
  beforeAll(async () => {
    dir = await makeTempDir('dmr-hang');
    disk = await startFaultDisk({ dir, name: 'main', sizeBytes: 16 << 20 });
    d = await startDaemon(dir);
  });
  afterAll(async () => {
    await disk?.setHang(false).catch(() => undefined);
    if (d !== undefined) await d.stop();
    await cleanupAll();
  });

  it('returns within the deadline + 1 s and reports what was cancelled; SIGTERM still exits 0', async () => {
    const spare = join(dir, 'spare.img');
    writeFileSync(spare, '');
    truncateSync(spare, 4 << 20);
    const add = await request(d.sock, 'add', { name: 'h', main: disk.path, spare, format: true });
    expect(add.ok).toBe(true);
    await disk.setHang(true);
    // A manual remap reads the block from main: it hangs there.
    const remap = raw(d.sock, `${JSON.stringify({ id: 'r', cmd: 'remap', args: { name: 'h', blocks: [3] } })}\n`, 1, 15_000);
    await disk.waitBlocked(1);
    const t0 = Date.now();
    const rm = await request(d.sock, 'remove', { name: 'h', timeoutMs: 1000 });
    const wall = Date.now() - t0;
    expect(rm.ok).toBe(true);
    expect(wall).toBeLessThanOrEqual(2000);
    const rep = rm.result as { elapsedMs: number; requestsAbandoned: number; cancelled: string[]; synced: boolean };
    expect(rep.requestsAbandoned).toBeGreaterThanOrEqual(1);
    expect(rep.synced).toBe(false);
    expect(rep.cancelled.join('; ')).toMatch(/request\(s\) abandoned/);
    expect((await request(d.sock, 'list')).result).toEqual([]);
    await disk.setHang(false);
    const answered = await remap;
    expect(answered[0]?.id).toBe('r');
    expect(await d.stop('SIGTERM')).toBe(0);
  });
});
