/**
 * BlockEngine.remapBlocksWithData (scan --remap-unreadable --zero): blocks
 * are remapped with the data given, durably (it survives a reopen and is
 * in the metadata), a block written meanwhile keeps its newer data, bad
 * input fails per block, and a full spare fails the blocks past its free
 * count with ENOSPC while the others are remapped.
 */
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ERRNO } from '../../src/errors.js';
import { crc32c } from '../../src/metadata/crc32c.js';
import { BS, offlineState, open, pattern, readBack, sparseFile, tempDir } from './fixtures.js';

describe('BlockEngine.remapBlocksWithData', () => {
  let dir: string;
  let cleanup: () => void;
  let mainPath: string;
  let sparePath: string;
  beforeEach(() => {
    ({ dir, cleanup } = tempDir('remap-data'));
    mainPath = sparseFile(join(dir, 'main.img'), 16 * 1024 * 1024);
    sparePath = sparseFile(join(dir, 'spare.img'), 4 * 1024 * 1024);
  });
  afterEach(() => cleanup());

  it('remaps with the given data, durably; a block that moved since `seen` keeps its data', async () => {
    const e = await open({ mainPath, sparePath, format: true });
    const old = pattern(8, 1);
    await e.submit({ op: 'write', offset: 0, length: 8 * BS, buffer: old });
    const zero = Buffer.alloc(BS); // not aligned: the engine copies it
    const given = pattern(1, 2).subarray(0, BS);
    const r = await e.remapBlocksWithData([{ block: 3, data: zero, seen: -1 }, { block: 5, data: given }, { block: 3, data: given }]);
    expect(r[0]).toMatchObject({ block: 3, result: 'remapped' });
    expect(r[1]).toMatchObject({ block: 5, result: 'remapped' });
    expect(r[2]).toMatchObject({ block: 3, result: 'already-remapped' }); // a repeat answers from the first
    expect((await readBack(e, 3 * BS, BS)).every((b) => b === 0)).toBe(true);
    expect((await readBack(e, 5 * BS, BS)).equals(given)).toBe(true);
    expect((await readBack(e, 4 * BS, BS)).equals(old.subarray(4 * BS, 5 * BS))).toBe(true);
    expect(e.status()).toMatchObject({ remappedBlocks: 2, spareBlocksUsed: 2 });
    expect(e.stats.manualRemaps).toBe(2);
    // Block 6 was moved by someone else after the caller looked (seen -1): its data stays.
    await e.remapBlocks([6]);
    const moved = await e.remapBlocksWithData([{ block: 6, data: zero, seen: -1 }]);
    expect(moved[0]).toMatchObject({ block: 6, result: 'already-remapped', spare: e.lookup(6) });
    expect((await readBack(e, 6 * BS, BS)).equals(old.subarray(6 * BS, 7 * BS))).toBe(true);
    const spare3 = e.lookup(3);
    await e.close();
    // Durable: in the metadata and after a reopen.
    const off = await offlineState(sparePath);
    expect(off.state.remaps.get(3)).toEqual({ spare: spare3, dataCrc: crc32c(Buffer.alloc(BS)) }); // the journal's CRC is of the zeroes
    const e2 = await open({ mainPath, sparePath });
    expect(e2.lookup(3)).toBe(spare3);
    expect((await readBack(e2, 3 * BS, BS)).every((b) => b === 0)).toBe(true);
    expect((await readBack(e2, 5 * BS, BS)).equals(given)).toBe(true);
    await e2.close();
  });

  it('fails bad input per block, and blocks past the free spare with ENOSPC', async () => {
    const e = await open({ mainPath, sparePath, format: true });
    const zero = Buffer.alloc(BS);
    const r = await e.remapBlocksWithData([{ block: -1, data: zero }, { block: e.blocks, data: zero }, { block: 1, data: Buffer.alloc(100) }]);
    expect(r.map((x) => x.result)).toEqual(['failed', 'failed', 'failed']);
    expect(r.map((x) => (x.result === 'failed' ? x.errno : 0))).toEqual([ERRNO.EINVAL, ERRNO.EINVAL, ERRNO.EINVAL]);
    expect(e.status().remappedBlocks).toBe(0);
    const free = e.status().spareBlocksTotal;
    const items = Array.from({ length: free + 5 }, (_, i) => ({ block: 100 + i, data: zero }));
    const all = await e.remapBlocksWithData(items);
    expect(all.filter((x) => x.result === 'remapped').length).toBe(free);
    const failed = all.filter((x) => x.result === 'failed');
    expect(failed.length).toBe(5);
    for (const f of failed) expect(f).toMatchObject({ result: 'failed', errno: ERRNO.ENOSPC });
    expect(e.status()).toMatchObject({ remappedBlocks: free, spareExhausted: true });
    await e.close();
  });
});
