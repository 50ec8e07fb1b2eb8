/**
 * The engine methods import-dmr4 uses (remapBlocksWithData, markLost) on
 * real files: imported data, lost blocks unreadable until rewritten, both
 * persisted across a reopen.
 */
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BS, offlineState, open, pattern, readBack, sparseFile, tempDir } from '../engine/fixtures.js';

describe('engine import methods', () => {
  let t: { dir: string; cleanup: () => void };
  beforeAll(() => {
    t = tempDir('import');
  });
  afterAll(() => t.cleanup());

  it('remapBlocksWithData imports data; markLost blocks (one commit per group) read EIO until rewritten, not resurrected by a manual remap; both survive a reopen', async () => {
    const mainPath = sparseFile(join(t.dir, 'main.img'), 16 << 20);
    const sparePath = sparseFile(join(t.dir, 'spare.img'), 8 << 20);
    const e = await open({ mainPath, sparePath, format: true });
    const main = pattern(64, 1);
    await e.submit({ op: 'write', offset: 0, length: 64 * BS, buffer: main });
    const items = [3, 7, 8, 20, 40].map((block, i) => ({ block, data: pattern(1, 100 + i) }));
    const placed = await e.remapBlocksWithData(items.map((x) => ({ ...x, seen: -1 })));
    expect(placed.map((p) => p.result)).toEqual(['remapped', 'remapped', 'remapped', 'remapped', 'remapped']);
    for (const it2 of items) expect((await readBack(e, it2.block * BS, BS)).equals(it2.data)).toBe(true);

    const seq0 = e.status().metadataSeq;
    await e.markLost([10, 11, 12], { groupSize: 2 });
    expect(e.status().metadataSeq - seq0).toBe(2); // one commit per group: 2 + 1
    await expect(e.markLost([3])).rejects.toMatchObject({ code: 'EEXIST' });
    await expect(e.markLost([e.blocks])).rejects.toMatchObject({ code: 'EINVAL' });
    expect(e.isPending(10)).toBe(true);
    expect(e.status().badSpareBlocks).toBe(3);
    await expect(readBack(e, 10 * BS, BS)).rejects.toMatchObject({ code: 'EIO', context: { block: 10 } });
    await expect(readBack(e, 8 * BS, 4 * BS)).rejects.toMatchObject({ code: 'EIO' });
    // a manual remap does not resurrect a lost block from its (bad) spare block
    expect((await e.remapBlocks([11]))[0]).toMatchObject({ block: 11, result: 'pending' });
    // neighbours unaffected
    expect((await readBack(e, 9 * BS, BS)).equals(main.subarray(9 * BS, 10 * BS))).toBe(true);
    await e.close();

    const off = await offlineState(sparePath);
    expect(off.state.pending).toEqual(new Set([10, 11, 12]));
    expect(off.doubleMapped).toEqual([]);

    const e2 = await open({ mainPath, sparePath });
    for (const it2 of items) expect((await readBack(e2, it2.block * BS, BS)).equals(it2.data)).toBe(true);
    await expect(readBack(e2, 11 * BS, BS)).rejects.toMatchObject({ code: 'EIO' });
    const w = pattern(1, 55);
    await e2.submit({ op: 'write', offset: 11 * BS, length: BS, buffer: w });
    expect(e2.isPending(11)).toBe(false);
    expect((await readBack(e2, 11 * BS, BS)).equals(w)).toBe(true);
    await expect(readBack(e2, 10 * BS, BS)).rejects.toMatchObject({ code: 'EIO' });
    await e2.close();
  });
});
