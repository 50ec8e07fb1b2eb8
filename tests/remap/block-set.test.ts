import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { BlockSet } from '../../src/remap/block-set.js';

type Op = { op: 'add' | 'delete' | 'has'; block: number } | { op: 'next'; from: number; span: number };

const block = fc.oneof(
  { weight: 8, arbitrary: fc.nat(300) },
  { weight: 1, arbitrary: fc.integer({ min: Number.MAX_SAFE_INTEGER - 20, max: Number.MAX_SAFE_INTEGER }) },
);
const op: fc.Arbitrary<Op> = fc.oneof(
  { weight: 5, arbitrary: fc.record({ op: fc.constant('add' as const), block }) },
  { weight: 3, arbitrary: fc.record({ op: fc.constant('delete' as const), block }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('has' as const), block }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('next' as const), from: block, span: fc.nat(50) }) },
);

describe('BlockSet against a Set model', () => {
  for (const chunkCapacity of [4, 8, 512]) {
    it(`random operation sequences (chunkCapacity ${chunkCapacity})`, () => {
      fc.assert(
        fc.property(fc.array(op, { maxLength: 400 }), (ops) => {
          const set = new BlockSet({ chunkCapacity });
          const model = new Set<number>();
          for (const o of ops) {
            switch (o.op) {
              case 'add':
                expect(set.add(o.block)).toBe(!model.has(o.block));
                model.add(o.block);
                break;
              case 'delete':
                expect(set.delete(o.block)).toBe(model.delete(o.block));
                break;
              case 'has':
                expect(set.has(o.block)).toBe(model.has(o.block));
                break;
              case 'next': {
                const to = o.from + o.span;
                const inRange = [...model].filter((b) => b >= o.from && b < to);
                expect(set.nextInRange(o.from, to)).toBe(inRange.length === 0 ? -1 : Math.min(...inRange));
                break;
              }
            }
            expect(set.size).toBe(model.size);
          }
          set.checkInvariants();
          const want = [...model].sort((a, b) => a - b);
          expect([...set.values()]).toEqual(want);
          const seen: number[] = [];
          set.forEach((b) => seen.push(b));
          expect(seen).toEqual(want);
        }),
        { numRuns: chunkCapacity === 512 ? 100 : 300 },
      );
    });
  }

  for (const chunkCapacity of [4, 8, 512]) {
    it(`copyKeys() equals values() and is unaffected by later changes (chunkCapacity ${chunkCapacity})`, () => {
      fc.assert(
        fc.property(fc.array(op, { maxLength: 400 }), fc.array(op, { maxLength: 50 }), (ops, later) => {
          const set = new BlockSet({ chunkCapacity });
          for (const o of ops) {
            if (o.op === 'add') set.add(o.block);
            else if (o.op === 'delete') set.delete(o.block);
          }
          const want = [...set.values()];
          const copy = set.copyKeys();
          expect(copy).toBeInstanceOf(Float64Array);
          expect(Array.from(copy)).toEqual(want);
          for (const o of later) {
            if (o.op === 'add') set.add(o.block);
            else if (o.op === 'delete') set.delete(o.block);
          }
          expect(Array.from(copy)).toEqual(want);
        }),
        { numRuns: chunkCapacity === 512 ? 100 : 300 },
      );
    });
  }

  it('rejects blocks that are not non-negative safe integers', () => {
    const set = new BlockSet();
    for (const bad of [-1, 0.5, Number.NaN, 2 ** 53]) expect(() => set.add(bad)).toThrow(RangeError);
    expect(set.has(-1)).toBe(false);
    expect(set.delete(-1)).toBe(false);
  });

  it('costs about 8 bytes per block', () => {
    const set = BlockSet.from(Array.from({ length: 100_000 }, (_, i) => i * 3));
    expect(set.size).toBe(100_000);
    expect(set.memoryBytes() / set.size).toBeLessThan(16);
  });
});
