import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { computeLayout, spareBlockOffset, RECORDS_PER_BLOCK } from '../../src/metadata/layout.js';
import { RemapError } from '../../src/errors.js';

describe('computeLayout', () => {
  it('is deterministic and keeps metadata out of the data range', () => {
    fc.assert(
      fc.property(
        fc.nat({ max: 1 << 20 }),
        fc.integer({ min: 200 * 4096, max: 2 ** 40 }),
        fc.constantFrom(512, 4096),
        fc.integer({ min: 16, max: 4096 }),
        fc.option(fc.nat({ max: 100000 }), { nil: undefined }),
        (offBlocks, areaBytes, blockSize, jBlocks, maxPending) => {
          const areaOffset = offBlocks * 4096;
          const opts = { journalBytes: jBlocks * 4096, maxPending };
          let l;
          try {
            l = computeLayout(areaOffset, areaBytes, blockSize, opts);
          } catch (e) {
            expect((e as RemapError).code).toBe('ENOSPC');
            return;
          }
          expect(computeLayout(areaOffset, areaBytes, blockSize, opts)).toEqual(l);
          const [c0, c1] = l.copies;
          expect(c0.superblock).toBe(areaOffset);
          expect(c1.superblock).toBe(areaOffset + l.areaBytes - 4096);
          expect(c1.end).toBe(areaOffset + l.areaBytes);
          expect(l.areaBytes).toBe(Math.floor(areaBytes / 4096) * 4096);
          const dataEnd = l.dataOffset + l.dataBlocks * blockSize;
          expect(l.dataOffset).toBeGreaterThanOrEqual(c0.end);
          expect(dataEnd).toBeLessThanOrEqual(c1.start);
          expect(l.dataOffset % 4096).toBe(0);
          expect(l.checkpointCapacity).toBeGreaterThanOrEqual(2 * l.dataBlocks + l.maxPending);
          expect(l.checkpointBlocks).toBe(Math.max(1, Math.ceil((2 * l.dataBlocks + l.maxPending) / RECORDS_PER_BLOCK)));
          if (maxPending === undefined) expect(l.maxPending).toBe(l.dataBlocks);
          // maximal: one more data block would not fit
          const more = l.dataBlocks + 1;
          const ck = Math.max(1, Math.ceil((2 * more + (maxPending ?? more)) / RECORDS_PER_BLOCK));
          const need = 2 * 4096 * (1 + 2 * ck + jBlocks) + Math.ceil((more * blockSize) / 4096) * 4096;
          expect(need).toBeGreaterThan(l.areaBytes);
          expect(spareBlockOffset(l, 0)).toBe(l.dataOffset);
          expect(spareBlockOffset(l, l.dataBlocks - 1) + blockSize).toBe(dataEnd);
        },
      ),
      { numRuns: 500 },
    );
  });

  it('rejects an area too small, naming the numbers', () => {
    try {
      computeLayout(0, 100 * 4096, 4096, {});
      throw new Error('no error');
    } catch (e) {
      expect(e).toBeInstanceOf(RemapError);
      const err = e as RemapError;
      expect(err.code).toBe('ENOSPC');
      expect(err.message).toContain('409600 bytes');
      expect(err.message).toContain('journal 8388608');
      expect(err.message).toMatch(/need at least \d+ bytes/);
    }
  });

  it('rejects bad arguments', () => {
    expect(() => computeLayout(100, 1 << 30, 4096)).toThrow(/offset/);
    expect(() => computeLayout(0, 1 << 30, 1024)).toThrow(/512 or 4096/);
    expect(() => computeLayout(0, 1 << 30, 4096, { journalBytes: 5000 })).toThrow(/journal/);
    const l = computeLayout(0, 1 << 30, 4096);
    expect(() => spareBlockOffset(l, l.dataBlocks)).toThrow(/outside/);
  });

  it('default layout of a 1 GiB spare file', () => {
    const l = computeLayout(0, 1 << 30, 4096);
    expect(l.journalBlocks).toBe(2048);
    // worst-case checkpoint sizing (2 x 3 records per data block per copy) + 2 x 8 MiB journal: about 8% overhead
    expect(l.dataBlocks).toBe(240842);
  });
});
