/**
 * Spare pool (issue 6): the global index mapper, the spare label codec, and
 * the engine with more than one spare on real files.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ERRNO, RemapError } from '../../src/errors.js';
import { BackingDevice, allocAligned } from '../../src/native/backing.js';
import { RecordType } from '../../src/metadata/records.js';
import {
  LABEL_BYTES, SparePool, decodeLabel, encodeLabel, locateSpare, poolRoom, splitSpareRun, type SpareLabel,
} from '../../src/engine/spare-pool.js';
import type { BlockEngine } from '../../src/engine/engine.js';
import { BS, captureLogger, open, offlineState, pattern, readBack, sparseFile, tempDir } from './fixtures.js';

/** Metadata room for extra spares, at format. */
const POOL = 2 * 1024 * 1024;

const sizesArb = fc.array(fc.integer({ min: 1, max: 50 }), { minLength: 1, maxLength: 8 });

function basesOf(sizes: number[]): { bases: number[]; total: number } {
  const bases: number[] = [];
  let total = 0;
  for (const n of sizes) {
    bases.push(total);
    total += n;
  }
  return { bases, total };
}

describe('spare index mapper', () => {
  it('locateSpare agrees with a linear walk over the concatenated spares', () => {
    fc.assert(fc.property(sizesArb, fc.nat(), (sizes, pick) => {
      const { bases, total } = basesOf(sizes);
      const index = pick % total;
      let k = 0;
      let rest = index;
      while (rest >= sizes[k]) rest -= sizes[k++];
      expect(locateSpare(bases, total, index)).toEqual({ spare: k, local: rest });
    }));
  });

  it('locateSpare refuses indices outside the pool', () => {
    fc.assert(fc.property(sizesArb, fc.oneof(fc.integer({ max: -1 }), fc.nat()), (sizes, off) => {
      const { bases, total } = basesOf(sizes);
      const index = off < 0 ? off : total + off;
      expect(() => locateSpare(bases, total, index)).toThrow(RangeError);
    }));
    expect(() => locateSpare([0], 4, 1.5)).toThrow(RangeError);
  });

  it('splitSpareRun covers the run in order, each piece on one spare', () => {
    fc.assert(fc.property(sizesArb, fc.nat(), fc.nat(), (sizes, a, b) => {
      const { bases, total } = basesOf(sizes);
      const first = a % total;
      const count = 1 + (b % (total - first));
      const pieces = splitSpareRun(bases, total, first, count);
      let skip = 0;
      for (const p of pieces) {
        expect(p.skip).toBe(skip);
        expect(p.blocks).toBeGreaterThan(0);
        expect(p.local + p.blocks).toBeLessThanOrEqual(sizes[p.spare]); // never crosses the spare's end
        // every block of the piece maps back to this spare
        expect(locateSpare(bases, total, first + skip)).toEqual({ spare: p.spare, local: p.local });
        expect(locateSpare(bases, total, first + skip + p.blocks - 1)).toEqual({ spare: p.spare, local: p.local + p.blocks - 1 });
        skip += p.blocks;
      }
      expect(skip).toBe(count);
      // adjacent pieces are on consecutive spares (a split only at a spare boundary)
      for (let i = 1; i < pieces.length; i++) {
        expect(pieces[i].spare).toBe(pieces[i - 1].spare + 1);
        expect(pieces[i].local).toBe(0);
      }
    }));
  });

  it('poolRoom is the most extra blocks whose worst case still fits a checkpoint', () => {
    fc.assert(fc.property(fc.nat({ max: 1 << 24 }), fc.integer({ min: 1, max: 1 << 20 }), fc.nat({ max: 1000 }), (cap, d, k) => {
      const e = poolRoom(cap, d, k);
      expect(Number.isInteger(e) && e >= 0).toBe(true);
      if (e > 0) expect(2 * (d + e) + d + k).toBeLessThanOrEqual(cap);
      expect(2 * (d + e + 1) + d + k).toBeGreaterThan(cap);
    }));
  });

  it('splitSpareRun refuses a run past the end', () => {
    expect(() => splitSpareRun([0, 4], 8, 6, 3)).toThrow(RangeError);
    expect(() => splitSpareRun([0, 4], 8, 0, 0)).toThrow(RangeError);
  });
});

const labelArb: fc.Arbitrary<SpareLabel> = fc.record({
  deviceUuid: fc.uuid(),
  ordinal: fc.integer({ min: 1, max: 0xffff_ffff }),
  blockSize: fc.constantFrom(512, 4096),
  dataOffset: fc.nat({ max: 1000 }).map((n) => LABEL_BYTES + n * 4096),
  dataBlocks: fc.nat({ max: Number.MAX_SAFE_INTEGER }),
  createdAtMs: fc.nat({ max: Number.MAX_SAFE_INTEGER }),
});

describe('spare label codec', () => {
  it('round-trips', () => {
    fc.assert(fc.property(labelArb, (l) => {
      const r = decodeLabel(encodeLabel(l));
      expect(r.ok).toBe(true);
      if (r.ok) expect(r.label).toEqual({ ...l, deviceUuid: l.deviceUuid.toLowerCase() });
    }));
  });

  it('any flipped bit is detected', () => {
    fc.assert(fc.property(labelArb, fc.nat({ max: LABEL_BYTES * 8 - 1 }), (l, bit) => {
      const b = encodeLabel(l);
      b[bit >>> 3] ^= 1 << (bit & 7);
      const r = decodeLabel(b);
      expect(r.ok).toBe(false);
    }));
  });

  it('random and mutated input never throws', () => {
    fc.assert(fc.property(fc.uint8Array({ minLength: 0, maxLength: LABEL_BYTES + 8 }), (b) => {
      const r = decodeLabel(b);
      expect(typeof r.ok).toBe('boolean');
    }));
    fc.assert(fc.property(labelArb, fc.array(fc.tuple(fc.nat({ max: LABEL_BYTES - 1 }), fc.nat({ max: 255 })), { maxLength: 8 }), (l, edits) => {
      const b = encodeLabel(l);
      for (const [i, v] of edits) b[i] = v;
      const r = decodeLabel(b);
      if (r.ok) expect(r.label.ordinal).toBeGreaterThan(0);
    }));
  });

  it('dm-remapd metadata is told apart from a blank disk', () => {
    const b = new Uint8Array(LABEL_BYTES);
    expect(decodeLabel(b)).toMatchObject({ ok: false, magic: false, metadata: false });
    b.set(new TextEncoder().encode('dmremapd'));
    expect(decodeLabel(b)).toMatchObject({ ok: false, magic: false, metadata: true });
  });
});

describe('SparePool I/O across a spare boundary', () => {
  let t: ReturnType<typeof tempDir>;
  beforeEach(() => { t = tempDir('pool-io'); });
  afterEach(() => t.cleanup());

  it('a run over the end of one spare is split between the two files', async () => {
    const a = BackingDevice.open(sparseFile(join(t.dir, 'a'), 8 * BS), { direct: true });
    const b = BackingDevice.open(sparseFile(join(t.dir, 'b'), 8 * BS), { direct: true });
    try {
      const pool = new SparePool(BS, { ordinal: 0, dev: a, path: a.info.path, dataOffset: 2 * BS, blocks: 3, labelCrc: 0 });
      pool.add({ ordinal: 1, dev: b, path: b.info.path, dataOffset: LABEL_BYTES, blocks: 5, labelCrc: 1 });
      expect(pool.total).toBe(8);
      const data = pattern(3, 42);
      expect(await pool.io(1, data, 2, 3 * BS)).toBe(3 * BS); // indices 2 (a) and 3, 4 (b)
      expect(await pool.sync()).toBe(0);
      const fa = readFileSync(join(t.dir, 'a'));
      const fb = readFileSync(join(t.dir, 'b'));
      expect(fa.subarray(4 * BS, 5 * BS).equals(data.subarray(0, BS))).toBe(true);
      expect(fb.subarray(LABEL_BYTES, LABEL_BYTES + 2 * BS).equals(data.subarray(BS, 3 * BS))).toBe(true);
      const back = allocAligned(3 * BS);
      expect(await pool.io(0, back, 2, 3 * BS)).toBe(3 * BS);
      expect(back.equals(data)).toBe(true);
      expect(pool.offsetOf(3)).toBe(LABEL_BYTES);
      expect(() => pool.offsetOf(8)).toThrow(RangeError);
    } finally {
      await a.close();
      await b.close();
    }
  });

  it('allocation takes the spare with the most free blocks', () => {
    const fake = { info: { path: 'x' } } as unknown as BackingDevice;
    const pool = new SparePool(BS, { ordinal: 0, dev: fake, path: 'p', dataOffset: 0, blocks: 4, labelCrc: 0 });
    pool.add({ ordinal: 1, dev: fake, path: 'q', dataOffset: LABEL_BYTES, blocks: 6, labelCrc: 0 });
    const got = Array.from({ length: 10 }, () => pool.allocate());
    // q (6 free) first until both have 4, then alternating p, q; all distinct
    expect(got.slice(0, 2).every((i) => i >= 4)).toBe(true);
    expect(new Set(got).size).toBe(10);
    expect(pool.allocate()).toBe(-1);
    expect(pool.info().map((s) => s.used)).toEqual([4, 6]);
  });
});

describe('engine with a spare pool (real files)', () => {
  let t: ReturnType<typeof tempDir>;
  let engine: BlockEngine | null = null;
  let mainPath: string;
  let sparePath: string;
  beforeEach(() => {
    t = tempDir('pool');
    mainPath = sparseFile(join(t.dir, 'main'), 4 * 1024 * 1024);
    sparePath = sparseFile(join(t.dir, 'spare'), 1024 * 1024);
  });
  afterEach(async () => {
    if (engine !== null) await engine.close();
    engine = null;
    t.cleanup();
  });

  async function fill(blocks: number, seed: number): Promise<Buffer> {
    const data = pattern(blocks, seed);
    await (engine as BlockEngine).submit({ op: 'write', offset: 0, length: blocks * BS, buffer: data });
    return data;
  }

  it('a full primary spare plus an added spare: remaps continue on the new spare, data reads back, reopen keeps every remap', async () => {
    engine = await open({ mainPath, sparePath, format: true, poolReserveBytes: POOL });
    const primary = engine.status().spareBlocksTotal;
    expect(primary).toBeGreaterThan(10);
    const n = primary + 40;
    const data = await fill(n, 7);
    const first = await engine.remapBlocks(Array.from({ length: primary }, (_, i) => i));
    expect(first.every((r) => r.result === 'remapped')).toBe(true);
    expect(engine.status().spareBlocksUsed).toBe(primary);
    const refused = await engine.remapBlocks([primary]);
    expect(refused[0]).toMatchObject({ result: 'failed', errno: ERRNO.ENOSPC });
    expect(engine.status().spareExhausted).toBe(true);

    const extraPath = sparseFile(join(t.dir, 'extra'), LABEL_BYTES + 64 * BS);
    await expect(engine.addSpare(extraPath)).rejects.toMatchObject({ errno: ERRNO.ENODATA }); // blank: only with format
    const info = await engine.addSpare(extraPath, { format: true });
    expect(info).toMatchObject({ ordinal: 1, path: extraPath, blocks: 64, used: 0, firstIndex: primary });
    expect(engine.status()).toMatchObject({ spareBlocksTotal: primary + 64, spareExhausted: false });

    const more = await engine.remapBlocks(Array.from({ length: 40 }, (_, i) => primary + i));
    for (const r of more) {
      expect(r.result).toBe('remapped');
      if (r.result === 'remapped') expect(r.spare).toBeGreaterThanOrEqual(primary);
    }
    expect(engine.spareInfo().map((s) => s.used)).toEqual([primary, 40]);
    expect((await readBack(engine, 0, n * BS)).equals(data)).toBe(true);
    // a write to a block on the new spare lands there and reads back
    const fresh = pattern(1, 99);
    await engine.submit({ op: 'write', offset: (primary + 3) * BS, length: BS, buffer: fresh });
    const spareIdx = engine.lookup(primary + 3);
    const onDisk = readFileSync(extraPath).subarray(engine.spareOffset(spareIdx), engine.spareOffset(spareIdx) + BS);
    expect(onDisk.equals(fresh)).toBe(true);
    data.set(fresh, (primary + 3) * BS);
    const mapping = new Map(Array.from({ length: n }, (_, i) => [i, engine!.lookup(i)]));
    await engine.close();
    engine = null;

    // the metadata describes the added spare
    const off = await offlineState(sparePath);
    expect(off.metadata.records.some((r) => r.type === RecordType.SPARE_ADD && r.logical === 1 && r.spare === 64)).toBe(true);
    expect(off.doubleMapped).toEqual([]);

    engine = await open({ mainPath, sparePath, extraSpares: [extraPath] });
    expect(engine.spareInfo().map((s) => [s.ordinal, s.blocks, s.used])).toEqual([[0, primary, primary], [1, 64, 40]]);
    for (const [l, s] of mapping) expect(engine.lookup(l)).toBe(s);
    expect((await readBack(engine, 0, n * BS)).equals(data)).toBe(true);
  });

  it('a checkpoint keeps the spare: reopen after many commits', async () => {
    engine = await open({ mainPath, sparePath, format: true, poolReserveBytes: POOL, journalBytes: 64 * 1024 });
    const extraPath = sparseFile(join(t.dir, 'extra'), LABEL_BYTES + 300 * BS);
    await engine.addSpare(extraPath, { format: true });
    const data = await fill(200, 3);
    // one commit per remap: enough to go round the 16-block journal several times (checkpoints)
    for (let i = 0; i < 200; i++) expect((await engine.remapBlocks([i]))[0].result).toBe('remapped');
    const used = engine.spareInfo().map((s) => s.used);
    expect(used[1]).toBeGreaterThan(0);
    await engine.close();
    engine = null;
    const off = await offlineState(sparePath);
    expect(off.metadata.checkpoint.seq).toBeGreaterThan(0);
    engine = await open({ mainPath, sparePath, extraSpares: [extraPath] });
    expect(engine.spareInfo().map((s) => s.used)).toEqual(used);
    expect((await readBack(engine, 0, 200 * BS)).equals(data)).toBe(true);
  });

  it('allocation spreads over the spares', async () => {
    engine = await open({ mainPath, sparePath, format: true, poolReserveBytes: POOL });
    const primary = engine.status().spareBlocksTotal;
    const extraPath = sparseFile(join(t.dir, 'extra'), LABEL_BYTES + primary * BS);
    await engine.addSpare(extraPath, { format: true });
    await fill(100, 1);
    const r = await engine.remapBlocks(Array.from({ length: 100 }, (_, i) => i));
    expect(r.every((x) => x.result === 'remapped')).toBe(true);
    const [a, b] = engine.spareInfo().map((s) => s.used);
    expect(a + b).toBe(100);
    expect(Math.abs(a - b)).toBeLessThanOrEqual(1);
  });

  it('an extent over the end of one spare and the start of the next reads and writes both', async () => {
    engine = await open({ mainPath, sparePath, format: true, poolReserveBytes: POOL });
    const primary = engine.status().spareBlocksTotal;
    const data = await fill(primary + 1, 5);
    // the primary keeps only its last block free
    expect((await engine.remapBlocks(Array.from({ length: primary - 1 }, (_, i) => i))).every((x) => x.result === 'remapped'));
    const extraPath = sparseFile(join(t.dir, 'extra'), LABEL_BYTES + BS); // one block: a tie, the primary goes first
    await engine.addSpare(extraPath, { format: true });
    const L = primary - 1;
    const r = await engine.remapBlocksWithData([{ block: L, data: data.subarray(L * BS, (L + 1) * BS) }, { block: L + 1, data: data.subarray((L + 1) * BS, (L + 2) * BS) }]);
    expect(r).toEqual([{ block: L, result: 'remapped', spare: primary - 1 }, { block: L + 1, result: 'remapped', spare: primary }]);
    expect((await readBack(engine, (L - 1) * BS, 3 * BS)).equals(data.subarray((L - 1) * BS, (L + 2) * BS))).toBe(true);
    const fresh = pattern(2, 77);
    await engine.submit({ op: 'write', offset: L * BS, length: 2 * BS, buffer: fresh, fua: true });
    expect(readFileSync(sparePath).subarray(engine.spareOffset(primary - 1), engine.spareOffset(primary - 1) + BS).equals(fresh.subarray(0, BS))).toBe(true);
    expect(readFileSync(extraPath).subarray(LABEL_BYTES, LABEL_BYTES + BS).equals(fresh.subarray(BS))).toBe(true);
    await engine.submit({ op: 'writeZeroes', offset: L * BS, length: 2 * BS });
    expect((await readBack(engine, L * BS, 2 * BS)).every((x) => x === 0)).toBe(true);
    await engine.submit({ op: 'flush', offset: 0, length: 0 });
  });

  it('a missing or different spare stops the device from opening, naming the spare and the errno', async () => {
    engine = await open({ mainPath, sparePath, format: true, poolReserveBytes: POOL });
    const extraPath = sparseFile(join(t.dir, 'extra'), LABEL_BYTES + 16 * BS);
    await engine.addSpare(extraPath, { format: true });
    await fill(4, 2);
    await engine.remapBlocks([0, 1, 2, 3]);
    await engine.close();
    engine = null;

    const noPath = await open({ mainPath, sparePath }).catch((e: unknown) => e);
    expect(noPath).toBeInstanceOf(RemapError);
    expect(noPath).toMatchObject({ errno: ERRNO.ENOENT });
    expect(String((noPath as Error).message)).toMatch(/spare 1 \(16 blocks\) missing/);

    const gone = await open({ mainPath, sparePath, extraSpares: [join(t.dir, 'nope')] }).catch((e: unknown) => e);
    expect(gone).toMatchObject({ errno: ERRNO.ENOENT });
    expect(String((gone as Error).message)).toMatch(/spare 1 .*nope: it does not exist \(ENOENT\)/);

    // another file in its place: blank, then labelled for another device
    const other = sparseFile(join(t.dir, 'other'), LABEL_BYTES + 16 * BS);
    const blank = await open({ mainPath, sparePath, extraSpares: [other] }).catch((e: unknown) => e);
    expect(blank).toMatchObject({ errno: ERRNO.EMEDIUMTYPE });
    expect(String((blank as Error).message)).toMatch(/spare 1 .*other: it is not the recorded spare: no spare label/);
    writeFileSync(other, encodeLabel({ deviceUuid: '00000000-0000-4000-8000-000000000001', ordinal: 1, blockSize: BS, dataOffset: LABEL_BYTES, dataBlocks: 16, createdAtMs: 1 }));
    const foreign = await open({ mainPath, sparePath, extraSpares: [other] }).catch((e: unknown) => e);
    expect(foreign).toMatchObject({ errno: ERRNO.EMEDIUMTYPE });
    expect(String((foreign as Error).message)).toMatch(/spare of another device/);

    // the right one opens
    engine = await open({ mainPath, sparePath, extraSpares: [extraPath] });
    expect(engine.status().remappedBlocks).toBe(4);
  });

  it('an add whose commit never landed: its label is ignored at open (warning) and reused by the next add', async () => {
    engine = await open({ mainPath, sparePath, format: true, poolReserveBytes: POOL });
    await engine.close();
    engine = null;
    const uuid = (await offlineState(sparePath)).metadata.identity.deviceUuid;
    const extraPath = sparseFile(join(t.dir, 'extra'), LABEL_BYTES + 16 * BS);
    // the label as spare add writes it, without the SPARE_ADD commit (a crash in between)
    writeFileSync(extraPath, encodeLabel({ deviceUuid: uuid, ordinal: 1, blockSize: BS, dataOffset: LABEL_BYTES, dataBlocks: 16, createdAtMs: 5 }), { flag: 'r+' });
    const { logger, lines } = captureLogger();
    engine = await open({ mainPath, sparePath, extraSpares: [extraPath], logger });
    expect(engine.spareInfo()).toHaveLength(1);
    expect(lines.some((l) => l.event === 'spare-unrecorded' && l.spare === extraPath && l.device === 'test')).toBe(true);
    const info = await engine.addSpare(extraPath); // no --format needed: the label is this device's, with the next ordinal
    expect(info).toMatchObject({ ordinal: 1, blocks: 16 });
    expect(lines.some((l) => l.event === 'spare-label-reused')).toBe(true);
    await engine.close();
    engine = await open({ mainPath, sparePath, extraSpares: [extraPath] });
    expect(engine.spareInfo()).toHaveLength(2);
  });

  it('two extra spares given in the wrong order are refused; in order they open', async () => {
    engine = await open({ mainPath, sparePath, format: true, poolReserveBytes: POOL });
    const x1 = sparseFile(join(t.dir, 'x1'), LABEL_BYTES + 16 * BS);
    const x2 = sparseFile(join(t.dir, 'x2'), LABEL_BYTES + 16 * BS);
    await engine.addSpare(x1, { format: true });
    await engine.addSpare(x2, { format: true });
    // a spare of this device cannot be added twice, nor relabelled as another ordinal
    await expect(engine.addSpare(x1, { format: true })).rejects.toMatchObject({ errno: ERRNO.EBUSY });
    await engine.close();
    engine = null;
    const swapped = await open({ mainPath, sparePath, extraSpares: [x2, x1] }).catch((e: unknown) => e);
    expect(swapped).toMatchObject({ errno: ERRNO.EMEDIUMTYPE });
    expect(String((swapped as Error).message)).toMatch(/spare 1 .*x2: it is spare 2 of this device, not spare 1: give the paths in the order the spares were added/);
    const twice = await open({ mainPath, sparePath, extraSpares: [x1, x1] }).catch((e: unknown) => e);
    expect(twice).toBeInstanceOf(RemapError); // the same file twice: held already (exclusive open) or shares storage
    engine = await open({ mainPath, sparePath, extraSpares: [x1, x2] });
    expect(engine.spareInfo().map((s) => [s.ordinal, s.firstIndex])).toEqual([[0, 0], [1, engine.spareInfo()[0].blocks], [2, engine.spareInfo()[0].blocks + 16]]);
  });

  it('a primary spare in the tail of main, with 512-byte blocks, plus an extra spare', async () => {
    engine = await open({ mainPath, spareTailBytes: 1024 * 1024, blockSize: 512, format: true, poolReserveBytes: 64 * 1024 });
    const primary = engine.spareInfo()[0].blocks;
    const extraPath = sparseFile(join(t.dir, 'extra'), LABEL_BYTES + 128 * 512);
    const info = await engine.addSpare(extraPath, { format: true });
    expect(info.blocks).toBe(128);
    // fill the primary, so that the next remaps land on the extra spare
    const n = primary + 8;
    const data = allocAligned(n * 512);
    for (let i = 0; i < data.length; i++) data[i] = (i * 13 + (i >> 9)) & 0xff;
    await engine.submit({ op: 'write', offset: 0, length: data.length, buffer: data });
    const r = await engine.remapBlocks(Array.from({ length: n }, (_, i) => i));
    expect(r.every((x) => x.result === 'remapped')).toBe(true);
    expect(engine.spareInfo().map((s) => s.used)).toEqual([primary - 60, 68]); // most free first: 68 on the extra leave 60 free on each
    await engine.submit({ op: 'flush', offset: 0, length: 0 });
    await engine.close();
    engine = await open({ mainPath, spareTailBytes: 1024 * 1024, extraSpares: [extraPath] });
    expect(engine.spareInfo().map((s) => s.used)).toEqual([primary - 60, 68]);
    const back = allocAligned(data.length);
    await engine.submit({ op: 'read', offset: 0, length: data.length, buffer: back });
    expect(back.equals(data)).toBe(true);
  });

  it('the metadata bounds the pool: no room without a pool reserve, a spare larger than the room is truncated', async () => {
    engine = await open({ mainPath, sparePath, format: true });
    const small = sparseFile(join(t.dir, 'small'), LABEL_BYTES + 4096 * BS);
    const room = engine.spareRoom() as number;
    expect(room).toBeLessThan(100); // rounding slack only
    if (room > 0) {
      expect((await engine.addSpare(small, { format: true })).blocks).toBe(room);
      expect(engine.spareRoom()).toBe(0);
    }
    const more = sparseFile(join(t.dir, 'more'), LABEL_BYTES + 16 * BS);
    await expect(engine.addSpare(more, { format: true })).rejects.toMatchObject({ errno: ERRNO.ENOSPC, message: expect.stringMatching(/no room for more spare blocks.*--pool-reserve/) });
    await engine.close();
    engine = null;

    sparseFile(sparePath, 1024 * 1024); // a blank primary again
    sparseFile(small, LABEL_BYTES + 4096 * BS);
    const { logger, lines } = captureLogger();
    engine = await open({ mainPath, sparePath, format: true, poolReserveBytes: 256 * BS, logger });
    const room2 = engine.spareRoom() as number;
    expect(room2).toBeGreaterThanOrEqual(256);
    expect(room2).toBeLessThan(4096);
    const info = await engine.addSpare(small, { format: true });
    expect(info.blocks).toBe(room2);
    expect(lines.some((l) => l.event === 'spare-truncated' && l.blocks === room2 && l.physicalBlocks === 4096)).toBe(true);
    // the worst case fits a checkpoint: every block remapped and bad, plus the pending reserve
    const { metadata } = await offlineState(sparePath);
    const d = metadata.layout.dataBlocks;
    expect(2 * (d + room2) + d + 1).toBeLessThanOrEqual(metadata.layout.checkpointCapacity);
  });

  it('spare add refuses the label of another device, metadata, and parts of this device', async () => {
    const other = await open({ name: 'other', mainPath: sparseFile(join(t.dir, 'main2'), 1024 * 1024), sparePath: sparseFile(join(t.dir, 'spare2'), 1024 * 1024), format: true, poolReserveBytes: POOL });
    const theirs = sparseFile(join(t.dir, 'theirs'), LABEL_BYTES + 8 * BS);
    await other.addSpare(theirs, { format: true });
    await other.close();
    engine = await open({ mainPath, sparePath, format: true, poolReserveBytes: POOL });
    const before = readFileSync(theirs);
    await expect(engine.addSpare(theirs, { format: true })).rejects.toMatchObject({ errno: ERRNO.EEXIST, message: expect.stringMatching(/spare 1 of another device/) });
    expect(readFileSync(theirs).equals(before)).toBe(true);
    await expect(engine.addSpare(join(t.dir, 'spare2'), { format: true })).rejects.toMatchObject({ errno: ERRNO.EEXIST, message: expect.stringMatching(/dm-remapd metadata/) });
    await expect(engine.addSpare(mainPath, { format: true })).rejects.toMatchObject({ errno: ERRNO.EBUSY });
    await expect(engine.addSpare(join(t.dir, 'missing'), { format: true })).rejects.toMatchObject({ errno: ERRNO.ENOENT });
    const tiny = sparseFile(join(t.dir, 'tiny'), LABEL_BYTES);
    await expect(engine.addSpare(tiny, { format: true })).rejects.toMatchObject({ errno: ERRNO.ENOSPC });
    expect(engine.spareInfo()).toHaveLength(1);
  });
});
