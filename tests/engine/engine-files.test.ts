import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { RemapError } from '../../src/errors.js';
import { allocAligned } from '../../src/native/backing.js';
import { BS, captureLogger, offlineState, open, pattern, readBack, sparseFile, tempDir } from './fixtures.js';

describe('engine on plain files', () => {
  let dir: string;
  let cleanup: () => void;
  let mainPath: string;
  let sparePath: string;
  beforeEach(() => {
    ({ dir, cleanup } = tempDir('engine'));
    mainPath = sparseFile(join(dir, 'main.img'), 64 * 1024 * 1024);
    sparePath = sparseFile(join(dir, 'spare.img'), 32 * 1024 * 1024);
  });
  afterEach(() => cleanup());

  it('refuses a spare without metadata unless asked to format, and never reformats', async () => {
    await expect(open({ mainPath, sparePath })).rejects.toThrow(/no dm-remapd metadata.*--format/);
    const e = await open({ mainPath, sparePath, format: true });
    const w = pattern(2, 1);
    await e.submit({ op: 'write', offset: 10 * BS, length: 2 * BS, buffer: w });
    await e.remapBlocks([10]);
    await e.close();
    // format again: existing metadata is kept, not replaced by an empty table
    const e2 = await open({ mainPath, sparePath, format: true });
    expect(e2.status().remappedBlocks).toBe(1);
    await e2.close();
  });

  it('round-trips reads and writes, flush, FUA, discard and write-zeroes', async () => {
    const e = await open({ mainPath, sparePath, format: true });
    expect(e.openMode).toBe('direct');
    expect(e.sizeBytes).toBe(64 * 1024 * 1024);
    const w = pattern(64, 7);
    await e.submit({ op: 'write', offset: 100 * BS, length: 64 * BS, buffer: w });
    expect((await readBack(e, 100 * BS, 64 * BS)).equals(w)).toBe(true);
    await e.submit({ op: 'write', offset: 0, length: BS, buffer: pattern(1, 9), fua: true });
    await e.submit({ op: 'flush', offset: 0, length: 0 });
    await e.submit({ op: 'writeZeroes', offset: 110 * BS, length: 4 * BS });
    const z = await readBack(e, 110 * BS, 4 * BS);
    expect(z.every((b) => b === 0)).toBe(true);
    await e.submit({ op: 'discard', offset: 120 * BS, length: 8 * BS });
    expect((await readBack(e, 120 * BS, 8 * BS)).every((b) => b === 0)).toBe(true);
    // untouched neighbours survive
    expect((await readBack(e, 100 * BS, 10 * BS)).equals(w.subarray(0, 10 * BS))).toBe(true);
    expect((await readBack(e, 128 * BS, 36 * BS)).equals(w.subarray(28 * BS))).toBe(true);
    await e.close();
  });

  it('rejects misaligned, out-of-range and buffer-less requests with the right errno', async () => {
    const e = await open({ mainPath, sparePath, format: true });
    const b = allocAligned(2 * BS);
    await expect(e.submit({ op: 'read', offset: 512, length: BS, buffer: b })).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(e.submit({ op: 'read', offset: e.sizeBytes - BS, length: 2 * BS, buffer: b })).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(e.submit({ op: 'write', offset: e.sizeBytes - BS, length: 2 * BS, buffer: b })).rejects.toMatchObject({ code: 'ENOSPC' });
    await expect(e.submit({ op: 'write', offset: 0, length: 2 * BS })).rejects.toMatchObject({ code: 'EINVAL' });
    const err = await e.submit({ op: 'read', offset: 3, length: BS, buffer: b }).catch((x: unknown) => x);
    expect(err).toBeInstanceOf(RemapError);
    expect(String((err as Error).message)).toMatch(/device test/);
    await e.close();
  });

  it('manual remap keeps the data, serves it from the spare, and survives reopen', async () => {
    const { logger, lines } = captureLogger();
    const e = await open({ mainPath, sparePath, format: true, logger });
    const w = pattern(8, 3);
    await e.submit({ op: 'write', offset: 200 * BS, length: 8 * BS, buffer: w });
    const res = await e.remapBlocks([202, 205, 202]);
    expect(res.map((r) => r.result)).toEqual(['remapped', 'remapped', 'already-remapped']);
    expect(e.lookup(202)).toBeGreaterThanOrEqual(0);
    expect(e.lookup(205)).not.toBe(e.lookup(202));
    expect((await readBack(e, 200 * BS, 8 * BS)).equals(w)).toBe(true);
    // a write now goes to the spare block: main keeps the old bytes
    const w2 = pattern(8, 4);
    await e.submit({ op: 'write', offset: 200 * BS, length: 8 * BS, buffer: w2 });
    expect((await readBack(e, 200 * BS, 8 * BS)).equals(w2)).toBe(true);
    expect(lines.some((l) => l.event === 'remap' && l.block === 202 && l.device === 'test')).toBe(true);
    const seq = e.status().metadataSeq;
    await e.close();

    const off = await offlineState(sparePath);
    expect(off.doubleMapped).toEqual([]);
    expect([...off.state.remaps.keys()].sort()).toEqual([202, 205]);
    expect(off.metadata.seq).toBe(seq);

    const e2 = await open({ mainPath, sparePath });
    expect(e2.status().remappedBlocks).toBe(2);
    expect((await readBack(e2, 200 * BS, 8 * BS)).equals(w2)).toBe(true);
    expect(e2.status().metadataSeq).toBe(seq);
    const r = await e2.remapBlocks([e2.blocks]);
    expect(r[0]).toMatchObject({ result: 'failed', errno: 22 });
    await e2.close();
  });

  it('works with the spare in a tail region of main', async () => {
    const e = await open({ mainPath, spareTailBytes: 16 * 1024 * 1024, format: true });
    expect(e.sizeBytes).toBe(48 * 1024 * 1024);
    const w = pattern(4, 11);
    await e.submit({ op: 'write', offset: e.sizeBytes - 4 * BS, length: 4 * BS, buffer: w });
    await e.remapBlocks([e.blocks - 1]);
    expect((await readBack(e, e.sizeBytes - 4 * BS, 4 * BS)).equals(w)).toBe(true);
    await e.close();
    const e2 = await open({ mainPath, spareTailBytes: 16 * 1024 * 1024 });
    expect(e2.status().remappedBlocks).toBe(1);
    expect((await readBack(e2, e2.sizeBytes - 4 * BS, 4 * BS)).equals(w)).toBe(true);
    await e2.close();
  });

  it('refuses a spare that belongs to another main, naming both, unless overridden', async () => {
    const e = await open({ mainPath, sparePath, format: true });
    await e.close();
    const other = sparseFile(join(dir, 'other.img'), 64 * 1024 * 1024);
    const err = await open({ mainPath: other, sparePath }).catch((x: unknown) => x as RemapError);
    expect(err).toBeInstanceOf(RemapError);
    expect((err as RemapError).message).toMatch(new RegExp(`recorded file dev \\d+ inode ${statSync(mainPath).ino}.*found file dev \\d+ inode ${statSync(other).ino}`));
    const e2 = await open({ mainPath: other, sparePath, allowIdentityChange: true });
    await e2.close();
  });

  it('refuses the main as its own spare, and a block size mismatch', async () => {
    await expect(open({ mainPath, sparePath: mainPath, format: true })).rejects.toThrow(/is the main/);
    const e = await open({ mainPath, sparePath, format: true });
    await e.close();
    await expect(open({ mainPath, sparePath, blockSize: 512 })).rejects.toThrow(/differs from the 4096/);
  });

  it('gives ENOSPC when the spare is exhausted, and says so in status', async () => {
    const tiny = sparseFile(join(dir, 'tiny.img'), 0);
    // smallest spare that holds both metadata copies plus a few data blocks
    const { computeLayout } = await import('../../src/metadata/layout.js');
    let bytes = 2 * 1024 * 1024;
    for (;;) { try { const l = computeLayout(0, bytes, BS, { journalBytes: 64 * 1024 }); if (l.dataBlocks >= 3) break; } catch { /* too small */ } bytes += BS; }
    sparseFile(tiny, bytes);
    const e = await open({ mainPath, sparePath: tiny, format: true, journalBytes: 64 * 1024 });
    const total = e.status().spareBlocksTotal;
    const blocks = Array.from({ length: total + 1 }, (_, i) => 1000 + i);
    const res = await e.remapBlocks(blocks);
    expect(res.slice(0, total).every((r) => r.result === 'remapped')).toBe(true);
    expect(res[total]).toMatchObject({ result: 'failed', errno: 28 });
    const st = e.status();
    expect(st.spareExhausted).toBe(true);
    expect(st.spareBlocksUsed).toBe(total);
    await e.close();
  });
});
