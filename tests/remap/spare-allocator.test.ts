import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { RemapError } from '../../src/errors.js';
import { BlockSet } from '../../src/remap/block-set.js';
import { RemapTable } from '../../src/remap/remap-table.js';
import { SpareAllocator } from '../../src/remap/spare-allocator.js';

type Op = { op: 'allocate' } | { op: 'markUsed' | 'release'; index: number };

describe('SpareAllocator', () => {
  it('never hands out a used block, and returns -1 only when full (against a Set model)', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: 130 }).chain((total) =>
          fc.tuple(
            fc.constant(total),
            fc.array(
              fc.oneof(
                { weight: 4, arbitrary: fc.constant<Op>({ op: 'allocate' }) },
                ...(total === 0
                  ? []
                  : [
                      { weight: 1, arbitrary: fc.record({ op: fc.constant('markUsed' as const), index: fc.nat(total - 1) }) },
                      { weight: 2, arbitrary: fc.record({ op: fc.constant('release' as const), index: fc.nat(total - 1) }) },
                    ]),
              ),
              { maxLength: 300 },
            ),
          ),
        ),
        ([total, ops]) => {
          const alloc = new SpareAllocator(total);
          const used = new Set<number>();
          for (const o of ops) {
            if (o.op === 'allocate') {
              const cursor = alloc.cursor;
              const got = alloc.allocate();
              if (used.size === total) {
                expect(got).toBe(-1);
              } else {
                expect(got).toBeGreaterThanOrEqual(0);
                expect(got).toBeLessThan(total);
                expect(used.has(got)).toBe(false);
                // Next-fit: the first free block at or after the cursor, wrapping.
                let want = cursor;
                while (used.has(want)) want = (want + 1) % total;
                expect(got).toBe(want);
                expect(alloc.cursor).toBe((got + 1) % total);
                used.add(got);
              }
            } else if (o.op === 'markUsed') {
              expect(alloc.markUsed(o.index)).toBe(!used.has(o.index));
              used.add(o.index);
            } else {
              expect(alloc.release(o.index)).toBe(used.delete(o.index));
            }
            expect(alloc.used).toBe(used.size);
            expect(alloc.free).toBe(total - used.size);
          }
          for (let i = 0; i < total; i++) expect(alloc.isUsed(i)).toBe(used.has(i));
        },
      ),
      { numRuns: 300 },
    );
  });

  it('fills every block exactly once, then reports full', () => {
    for (const total of [1, 31, 32, 33, 64, 100]) {
      const alloc = new SpareAllocator(total);
      const got = Array.from({ length: total }, () => alloc.allocate());
      expect(got).toEqual(Array.from({ length: total }, (_, i) => i));
      expect(alloc.allocate()).toBe(-1);
      expect(alloc.free).toBe(0);
    }
  });

  it('wraps the cursor past the end and finds blocks freed behind it', () => {
    const alloc = new SpareAllocator(40);
    for (let i = 0; i < 38; i++) alloc.allocate();
    alloc.release(3);
    alloc.release(35);
    expect(alloc.allocate()).toBe(38); // next-fit: the cursor is at 38, not back at 3
    expect(alloc.allocate()).toBe(39);
    expect(alloc.cursor).toBe(0);
    expect(alloc.allocate()).toBe(3);
    expect(alloc.allocate()).toBe(35);
    expect(alloc.allocate()).toBe(-1);
  });

  it('derive() marks exactly the table targets and the unavailable blocks', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 200 }).chain((total) =>
          fc.tuple(
            fc.constant(total),
            fc.uniqueArray(fc.nat(total - 1), { maxLength: total }),
            fc.array(fc.array(fc.nat(total - 1), { maxLength: 40 }), { maxLength: 3 }),
          ),
        ),
        ([total, spares, sets]) => {
          // Logical blocks are arbitrary; their spare targets are distinct.
          const table = RemapTable.fromEntries(spares.map((s, i) => [i * 1000 + 7, s] as const));
          const unavailable = sets.map((s) => BlockSet.from(s));
          const alloc = SpareAllocator.derive(total, table, ...unavailable);
          const want = new Set<number>([...spares, ...sets.flat()]);
          for (let i = 0; i < total; i++) expect(alloc.isUsed(i)).toBe(want.has(i));
          expect(alloc.used).toBe(want.size);
          expect(alloc.cursor).toBe(0);
          // Everything it hands out afterwards is outside the derived set.
          for (let got = alloc.allocate(); got !== -1; got = alloc.allocate()) expect(want.has(got)).toBe(false);
          expect(alloc.free).toBe(0);
        },
      ),
      { numRuns: 200 },
    );
  });

  it('derive() refuses a spare block mapped twice, and targets out of range', () => {
    const twice = RemapTable.fromEntries([[10, 3], [20, 3]]);
    expect(() => SpareAllocator.derive(8, twice)).toThrow(RemapError);
    expect(() => SpareAllocator.derive(8, twice)).toThrow(/spare block 3 .*logical block 20/);
    const outside = RemapTable.fromEntries([[10, 8]]);
    expect(() => SpareAllocator.derive(8, outside)).toThrow(RangeError);
    expect(() => SpareAllocator.derive(8, new RemapTable(), BlockSet.from([9]))).toThrow(RangeError);
  });

  it('out-of-range indices throw a RangeError naming the index and the total', () => {
    const alloc = new SpareAllocator(10);
    for (const f of [alloc.isUsed, alloc.markUsed, alloc.release]) {
      expect(() => f.call(alloc, 10)).toThrow(RangeError);
      expect(() => f.call(alloc, 10)).toThrow(/index 10 .*10 blocks/);
      expect(() => f.call(alloc, -1)).toThrow(/index -1 /);
      expect(() => f.call(alloc, 1.5)).toThrow(RangeError);
    }
    expect(() => new SpareAllocator(-1)).toThrow(RangeError);
    expect(new SpareAllocator(0).allocate()).toBe(-1);
  });

  it('allocates quickly from a large, mostly full spare', () => {
    const total = 1 << 22; // 16 GiB of 4 KiB blocks
    const alloc = new SpareAllocator(total);
    for (let i = 0; i < total - 1; i++) if (i !== total >> 1) alloc.markUsed(i);
    const t0 = performance.now();
    expect(alloc.allocate()).toBe(total >> 1);
    expect(alloc.allocate()).toBe(total - 1);
    expect(alloc.allocate()).toBe(-1);
    expect(performance.now() - t0).toBeLessThan(200);
  });
});
