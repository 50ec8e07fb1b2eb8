import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { planRange, type Extent } from '../../src/remap/planner.js';
import { RemapTable } from '../../src/remap/remap-table.js';

/** The naive plan: one extent per block. */
function perBlock(table: RemapTable, first: number, blocks: number): { logical: number; spare: number }[] {
  return Array.from({ length: blocks }, (_, i) => ({ logical: first + i, spare: table.get(first + i) }));
}

/** Expands extents back into per-block targets, checking buffer offsets on the way. */
function expand(extents: Extent[], first: number, blockSize: number): { logical: number; spare: number }[] {
  const out: { logical: number; spare: number }[] = [];
  for (const e of extents) {
    expect(e.blocks).toBeGreaterThan(0);
    expect(e.bufOffset).toBe((e.logical - first) * blockSize);
    if (e.target === 'main') expect(e.spare).toBe(-1);
    for (let i = 0; i < e.blocks; i++) out.push({ logical: e.logical + i, spare: e.target === 'main' ? -1 : e.spare + i });
  }
  return out;
}

describe('planRange', () => {
  it('matches a naive per-block plan, with maximal main runs and merged spare runs', () => {
    fc.assert(
      fc.property(
        // A table over blocks 0..199, with runs of consecutive spares sometimes.
        fc.array(fc.tuple(fc.nat(199), fc.nat(1000), fc.integer({ min: 1, max: 6 })), { maxLength: 40 }),
        fc.nat(220),
        fc.nat(120),
        fc.constantFrom(512, 4096),
        fc.constantFrom(4, 512),
        (runs, first, blocks, blockSize, chunkCapacity) => {
          const table = new RemapTable({ chunkCapacity });
          for (const [logical, spare, len] of runs) for (let i = 0; i < len; i++) table.set(logical + i, spare + i);
          const extents = planRange(table, first * blockSize, blocks * blockSize, blockSize);
          // Covers the request exactly once, in order, each block to the right place.
          expect(expand(extents, first, blockSize)).toEqual(perBlock(table, first, blocks));
          for (let i = 1; i < extents.length; i++) {
            const a = extents[i - 1];
            const b = extents[i];
            // No two main extents touch (main runs are maximal) ...
            expect(a.target === 'main' && b.target === 'main').toBe(false);
            // ... and a spare extent is split only where the spare index is not consecutive.
            if (a.target === 'spare' && b.target === 'spare') expect(b.spare).not.toBe(a.spare + a.blocks);
          }
        },
      ),
      { numRuns: 500 },
    );
  });

  it('is one main extent when nothing in the range is remapped', () => {
    const table = RemapTable.fromEntries([[10, 0], [300, 1]]);
    const want: Extent[] = [{ target: 'main', logical: 11, blocks: 256, spare: -1, bufOffset: 0 }];
    expect(planRange(table, 11 * 4096, 1 << 20, 4096)).toEqual(want);
    expect(planRange(new RemapTable(), 0, 4096, 4096)).toEqual([{ target: 'main', logical: 0, blocks: 1, spare: -1, bufOffset: 0 }]);
  });

  it('moves only the remapped block of a 1 MiB request: main / spare / main', () => {
    const table = RemapTable.fromEntries([[100, 42]]);
    expect(planRange(table, 0, 1 << 20, 4096)).toEqual([
      { target: 'main', logical: 0, blocks: 100, spare: -1, bufOffset: 0 },
      { target: 'spare', logical: 100, blocks: 1, spare: 42, bufOffset: 100 * 4096 },
      { target: 'main', logical: 101, blocks: 155, spare: -1, bufOffset: 101 * 4096 },
    ]);
  });

  it('merges consecutive remaps with consecutive spares, and only those', () => {
    const table = RemapTable.fromEntries([[4, 10], [5, 11], [6, 12], [7, 20], [8, 21]]);
    expect(planRange(table, 4 * 512, 6 * 512, 512)).toEqual([
      { target: 'spare', logical: 4, blocks: 3, spare: 10, bufOffset: 0 },
      { target: 'spare', logical: 7, blocks: 2, spare: 20, bufOffset: 3 * 512 },
      { target: 'main', logical: 9, blocks: 1, spare: -1, bufOffset: 5 * 512 },
    ]);
  });

  it('plans a zero-length request to nothing', () => {
    expect(planRange(RemapTable.fromEntries([[0, 0]]), 4096, 0, 4096)).toEqual([]);
  });

  it('rejects unaligned or invalid ranges with a RangeError', () => {
    const table = new RemapTable();
    expect(() => planRange(table, 100, 4096, 4096)).toThrow(/offset 100 .*4096/);
    expect(() => planRange(table, 0, 1000, 4096)).toThrow(/length 1000 .*4096/);
    expect(() => planRange(table, -4096, 4096, 4096)).toThrow(RangeError);
    expect(() => planRange(table, 0, 4096, 0)).toThrow(RangeError);
    expect(() => planRange(table, 0, 4096, 1.5)).toThrow(RangeError);
    expect(() => planRange(table, 2 ** 53 - 1, 2, 1)).toThrow(RangeError);
  });
});
