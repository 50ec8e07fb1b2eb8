import { closeSync, openSync, readFileSync, readSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { constants as os } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { RemapError } from '../../src/errors.js';
import { BackingDevice, BackingOp, IO_FUA, allocAligned } from '../../src/native/backing.js';
import { fill, makePatternFile, makeTempDir } from './fixtures.js';

const E = os.errno;
const MiB = 1024 * 1024;

let tmp: ReturnType<typeof makeTempDir>;
const open: BackingDevice[] = [];
function openDev(path: string, opts?: Parameters<typeof BackingDevice.open>[1]): BackingDevice {
  const d = BackingDevice.open(path, opts);
  open.push(d);
  return d;
}

beforeAll(() => {
  tmp = makeTempDir();
});
afterEach(async () => {
  await Promise.all(open.splice(0).map((d) => d.close(1000)));
});
afterAll(() => tmp.cleanup());

function readBack(path: string, offset: number, length: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const b = Buffer.alloc(length);
    readSync(fd, b, 0, length, offset);
    return b;
  } finally {
    closeSync(fd);
  }
}

describe('BackingDevice on a file (O_DIRECT)', () => {
  it('reports geometry, identity and open mode', () => {
    const p = join(tmp.dir, 'geo.img');
    makePatternFile(p, 4 * MiB);
    const d = openDev(p);
    const st = statSync(p);
    expect(d.info).toMatchObject({
      path: p,
      sizeBytes: 4 * MiB,
      isBlockDevice: false,
      openMode: 'direct',
      readOnly: false,
      ino: st.ino,
      dev: st.dev,
    });
    expect([512, 1024, 2048, 4096]).toContain(d.info.logicalBlockSize);
    expect(d.info.physicalBlockSize).toBeGreaterThanOrEqual(512);
    expect(['defer_taskrun', 'coop_taskrun', 'plain']).toContain(d.info.ringSetup);
  });

  it('round-trips writes and reads at various offsets and sizes', async () => {
    const p = join(tmp.dir, 'rt.img');
    makePatternFile(p, 8 * MiB);
    const d = openDev(p);
    const cases: [number, number][] = [
      [0, 4096],
      [4096, 4096],
      [512, 512],
      [3 * 512, 7 * 512],
      [MiB - 4096, 8192], // crosses 1 MiB
      [8 * MiB - 65536, 65536], // last 64 KiB
      [2 * MiB, MiB],
    ];
    for (const [i, [off, len]] of cases.entries()) {
      const w = fill(allocAligned(len), i + 1);
      expect(await d.write(w, off)).toBe(len);
      const r = allocAligned(len);
      expect(await d.read(r, off)).toBe(len);
      expect(Buffer.compare(r, w)).toBe(0);
      expect(Buffer.compare(readBack(p, off, len), w)).toBe(0);
    }
    // Untouched data around a write survives.
    const around = allocAligned(512);
    expect(await d.read(around, 4 * MiB)).toBe(512);
    expect(around[0]).toBe(((4 * MiB) / 512) % 255 + 1);
  });

  it('FUA write and fdatasync succeed and the data is there', async () => {
    const p = join(tmp.dir, 'fua.img');
    makePatternFile(p, MiB);
    const d = openDev(p);
    const w = fill(allocAligned(8192), 99);
    expect(await d.write(w, 16384, true)).toBe(8192);
    expect(await d.io(BackingOp.WRITE, w, 32768, 4096, IO_FUA)).toBe(4096);
    expect(await d.fdatasync()).toBe(0);
    expect(Buffer.compare(readBack(p, 16384, 8192), w)).toBe(0);
    expect(Buffer.compare(readBack(p, 32768, 4096), w.subarray(0, 4096))).toBe(0);
  });

  it('discard punches a hole that reads back as zeros, size unchanged', async () => {
    const p = join(tmp.dir, 'discard.img');
    makePatternFile(p, 4 * MiB);
    const d = openDev(p);
    const blocksBefore = statSync(p).blocks;
    expect(await d.discard(MiB, MiB)).toBe(0);
    const r = allocAligned(MiB);
    r.fill(0xaa);
    expect(await d.read(r, MiB)).toBe(MiB);
    expect(r.every((b) => b === 0)).toBe(true);
    expect(statSync(p).size).toBe(4 * MiB);
    expect(statSync(p).blocks).toBeLessThan(blocksBefore);
    // Neighbours intact.
    const n = allocAligned(512);
    expect(await d.read(n, MiB - 512)).toBe(512);
    expect(n[0]).not.toBe(0);
  });

  it('writeZeroes zeroes the range, size unchanged', async () => {
    const p = join(tmp.dir, 'wz.img');
    makePatternFile(p, 2 * MiB);
    const d = openDev(p);
    expect(await d.writeZeroes(4096, 3 * 4096)).toBe(0);
    const r = allocAligned(5 * 4096);
    expect(await d.read(r, 0)).toBe(5 * 4096);
    expect(r.subarray(0, 4096).every((b) => b !== 0)).toBe(true);
    expect(r.subarray(4096, 4 * 4096).every((b) => b === 0)).toBe(true);
    expect(r.subarray(4 * 4096).every((b) => b !== 0)).toBe(true);
    expect(statSync(p).size).toBe(2 * MiB);
  });

  it('sends every op queued in one tick down in ONE native call', async () => {
    const p = join(tmp.dir, 'batch.img');
    makePatternFile(p, 4 * MiB);
    const d = openDev(p, { queueDepth: 128 });
    const before = d.stats();
    const bufs = Array.from({ length: 100 }, () => allocAligned(4096));
    const ps = bufs.map((b, i) => d.read(b, ((i * 37) % 1000) * 4096));
    expect(d.inFlight).toBe(100);
    const res = await Promise.all(ps);
    expect(res.every((r) => r === 4096)).toBe(true);
    const after = d.stats();
    expect(after.submitCalls - before.submitCalls).toBe(1);
    expect(after.ops - before.ops).toBe(100);
    expect(after.completionCallbacks - before.completionCallbacks).toBeLessThanOrEqual(100);
    expect(after.completionCallbacks - before.completionCallbacks).toBeGreaterThanOrEqual(1);
    expect(d.inFlight).toBe(0);
  });

  it('queues beyond queueDepth and still completes everything', async () => {
    const p = join(tmp.dir, 'deep.img');
    makePatternFile(p, 4 * MiB);
    const d = openDev(p, { queueDepth: 8 });
    const ps = Array.from({ length: 200 }, (_, i) => d.read(allocAligned(4096), (i % 1024) * 4096));
    expect((await Promise.all(ps)).every((r) => r === 4096)).toBe(true);
    expect(d.stats().submitCalls).toBeGreaterThanOrEqual(200 / 8);
  });

  it('refuses misaligned O_DIRECT with -EINVAL (offset, length, buffer address)', async () => {
    const p = join(tmp.dir, 'mis.img');
    makePatternFile(p, MiB);
    const d = openDev(p);
    const b = allocAligned(8192);
    expect(await d.io(BackingOp.READ, b, 100, 4096)).toBe(-E.EINVAL);
    expect(await d.io(BackingOp.READ, b, 0, 100)).toBe(-E.EINVAL);
    expect(await d.read(b.subarray(1, 4097), 0)).toBe(-E.EINVAL);
    expect(await d.write(b.subarray(0, 100), 4096)).toBe(-E.EINVAL);
    // Length beyond the buffer never reaches the kernel.
    expect(await d.io(BackingOp.READ, b.subarray(0, 4096), 0, 8192)).toBe(-E.EINVAL);
    expect(await d.io(BackingOp.READ, null, 0, 4096)).toBe(-E.EFAULT);
    expect(await d.io(42 as 0, b, 0, 4096)).toBe(-E.EINVAL);
  });

  it('returns the short count at EOF', async () => {
    const p = join(tmp.dir, 'eof.img');
    makePatternFile(p, 10_000);
    const d = openDev(p);
    const b = allocAligned(16384);
    expect(await d.read(b, 0)).toBe(10_000);
    expect(await d.read(b.subarray(0, 4096), 8192)).toBe(10_000 - 8192);
    expect(await d.read(b.subarray(0, 4096), 16384)).toBe(0);
    const bd = openDev(p, { direct: false });
    expect(await bd.read(Buffer.alloc(20_000), 1)).toBe(9_999);
  });

  it('buffered mode reports openMode buffered and takes unaligned I/O', async () => {
    const p = join(tmp.dir, 'buf.img');
    makePatternFile(p, MiB);
    const d = openDev(p, { direct: false });
    expect(d.info.openMode).toBe('buffered');
    const w = Buffer.from('hello, backing');
    expect(await d.write(w, 1001)).toBe(w.length);
    const r = Buffer.alloc(w.length);
    expect(await d.read(r, 1001)).toBe(w.length);
    expect(r.toString()).toBe('hello, backing');
  });

  it('read-only devices refuse writes with -EBADF', async () => {
    const p = join(tmp.dir, 'ro.img');
    makePatternFile(p, MiB);
    const d = openDev(p, { readOnly: true });
    expect(d.info.readOnly).toBe(true);
    expect(await d.read(allocAligned(4096), 0)).toBe(4096);
    expect(await d.write(allocAligned(4096), 0)).toBe(-E.EBADF);
    expect(await d.discard(0, 4096)).toBe(-E.EBADF);
  });

  it('open failures throw RemapError with errno and context', () => {
    const p = join(tmp.dir, 'missing.img');
    let err: unknown;
    try {
      BackingDevice.open(p);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(RemapError);
    expect((err as RemapError).errno).toBe(E.ENOENT);
    expect((err as RemapError).context).toEqual({ device: p, op: 'open' });
    expect(() => BackingDevice.open(p, { queueDepth: 0 })).toThrow(RemapError);
  });

  it('an I/O error on a shrunk file is a result, not an exception', async () => {
    const p = join(tmp.dir, 'shrink.img');
    writeFileSync(p, Buffer.alloc(MiB, 1));
    const d = openDev(p);
    truncateSync(p, 0);
    expect(await d.read(allocAligned(4096), 0)).toBe(0);
    expect(readFileSync(p).length).toBe(0);
  });

  it('a throwing callback does not break the batch', async () => {
    const p = join(tmp.dir, 'throw.img');
    makePatternFile(p, MiB);
    const d = openDev(p);
    const errors: unknown[] = [];
    const handler = (e: unknown): void => {
      errors.push(e);
    };
    process.prependListener('uncaughtException', handler);
    try {
      const other = d.read(allocAligned(4096), 4096);
      d.submit(BackingOp.READ, allocAligned(4096), 0, 4096, 0, () => {
        throw new Error('boom');
      });
      expect(await other).toBe(4096);
      await new Promise((r) => setTimeout(r, 20));
    } finally {
      process.removeListener('uncaughtException', handler);
    }
    expect(errors.map((e) => (e as Error).message)).toContain('boom');
  });
});

describe('allocAligned', () => {
  it('returns zeroed buffers usable for O_DIRECT', () => {
    const b = allocAligned(3 * 4096);
    expect(b.length).toBe(3 * 4096);
    expect(b.every((x) => x === 0)).toBe(true);
    expect(allocAligned(0).length).toBe(0);
    expect(allocAligned(512, 512).length).toBe(512);
    expect(() => allocAligned(4096, 3000)).toThrow(RemapError);
    expect(() => allocAligned(-1)).toThrow(RemapError);
  });
});
