// Block-device path: a loop device over a 64 MiB file. Needs root and losetup;
// skipped with a message otherwise.
import { execFileSync } from 'node:child_process';
import { existsSync, truncateSync, writeFileSync } from 'node:fs';
import { constants as os } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RemapError } from '../../src/errors.js';
import { BackingDevice, allocAligned } from '../../src/native/backing.js';
import { fill, makeTempDir } from './fixtures.js';

const E = os.errno;
const MiB = 1024 * 1024;
let tmp: ReturnType<typeof makeTempDir> | undefined;
let loopDev: string | undefined;
let skipReason = '';

beforeAll(() => {
  tmp = makeTempDir('dmr-loop-');
  const img = join(tmp.dir, 'loop.img');
  writeFileSync(img, Buffer.alloc(0));
  truncateSync(img, 64 * MiB);
  try {
    loopDev = execFileSync('losetup', ['--find', '--show', img], { encoding: 'utf8' }).trim();
    if (!existsSync(loopDev)) throw new Error(`${loopDev} did not appear`);
  } catch (e) {
    skipReason = `losetup unavailable: ${(e as Error).message.split('\n')[0]}`;
    loopDev = undefined;
  }
});

afterAll(() => {
  if (loopDev !== undefined) execFileSync('losetup', ['-d', loopDev]);
  tmp?.cleanup();
});

describe('BackingDevice on a loop block device', () => {
  it('reports block-device geometry and does I/O, BLKDISCARD and BLKZEROOUT', async (ctx) => {
    if (loopDev === undefined) {
      console.warn(`SKIP loop-device test: ${skipReason}`);
      ctx.skip();
      return;
    }
    const d = BackingDevice.open(loopDev, { exclusive: true });
    try {
      expect(d.info.isBlockDevice).toBe(true);
      expect(d.info.sizeBytes).toBe(64 * MiB);
      expect(d.info.logicalBlockSize).toBe(512);
      expect(d.info.physicalBlockSize).toBeGreaterThanOrEqual(512);
      expect(d.info.rdev).not.toBe(0);
      expect(d.info.openMode).toBe('direct');

      // O_EXCL: a second exclusive open of the same block device is refused.
      let err: unknown;
      try {
        BackingDevice.open(loopDev, { exclusive: true }).close();
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(RemapError);
      expect((err as RemapError).errno).toBe(E.EBUSY);

      const w = fill(allocAligned(MiB), 3);
      expect(await d.write(w, 8 * MiB, true)).toBe(MiB);
      expect(await d.fdatasync()).toBe(0);
      const r = allocAligned(MiB);
      expect(await d.read(r, 8 * MiB)).toBe(MiB);
      expect(Buffer.compare(r, w)).toBe(0);

      // BLKDISCARD on the worker thread: a loop device punches a hole, reads back zeros.
      expect(await d.discard(8 * MiB, 256 * 1024)).toBe(0);
      // BLKZEROOUT on the worker thread.
      expect(await d.writeZeroes(8 * MiB + 512 * 1024, 4096)).toBe(0);
      expect(await d.read(r, 8 * MiB)).toBe(MiB);
      expect(r.subarray(0, 256 * 1024).every((b) => b === 0)).toBe(true);
      expect(Buffer.compare(r.subarray(256 * 1024, 512 * 1024), w.subarray(256 * 1024, 512 * 1024))).toBe(0);
      expect(r.subarray(512 * 1024, 512 * 1024 + 4096).every((b) => b === 0)).toBe(true);
      expect(Buffer.compare(r.subarray(512 * 1024 + 4096), w.subarray(512 * 1024 + 4096))).toBe(0);

      // Misaligned ranges on a block device.
      expect(await d.read(r.subarray(0, 4096), 100)).toBe(-E.EINVAL);
      expect(await d.discard(100, 4096)).toBe(-E.EINVAL);
      // Beyond the end.
      expect(await d.read(r.subarray(0, 4096), 64 * MiB)).toBe(0);
      expect(await d.writeZeroes(64 * MiB, 4096)).toBeLessThan(0);
    } finally {
      expect(await d.close(1000)).toEqual({ cancelled: 0, abandoned: 0 });
    }
  });
});
