import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { RemapTable } from '../../src/remap/remap-table.js';

type Op =
  | { op: 'set'; key: number; value: number }
  | { op: 'delete'; key: number }
  | { op: 'get'; key: number }
  | { op: 'next'; from: number; span: number };

// Mostly small keys, so sets and deletes collide; a few near 2^53 for
// exactness and a few around 2^32 (the hash index holds 32-bit keys and
// values, larger ones go to its overflow map).
const AROUND_2_32 = fc.integer({ min: 2 ** 32 - 3, max: 2 ** 32 + 2 });
const key = fc.oneof(
  { weight: 8, arbitrary: fc.nat(300) },
  { weight: 1, arbitrary: fc.integer({ min: Number.MAX_SAFE_INTEGER - 20, max: Number.MAX_SAFE_INTEGER }) },
  { weight: 1, arbitrary: AROUND_2_32 },
);
const value = fc.oneof(fc.nat(1000), fc.constant(Number.MAX_SAFE_INTEGER), AROUND_2_32);
const op: fc.Arbitrary<Op> = fc.oneof(
  { weight: 5, arbitrary: fc.record({ op: fc.constant('set' as const), key, value }) },
  { weight: 3, arbitrary: fc.record({ op: fc.constant('delete' as const), key }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('get' as const), key }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('next' as const), from: key, span: fc.nat(50) }) },
);

function modelNext(model: Map<number, number>, from: number, to: number): number {
  let best = -1;
  for (const k of model.keys()) if (k >= from && k < to && (best === -1 || k < best)) best = k;
  return best;
}

function sortedModel(model: Map<number, number>): [number, number][] {
  return [...model.entries()].sort((a, b) => a[0] - b[0]);
}

describe('RemapTable against a Map model', () => {
  for (const chunkCapacity of [4, 8, 512]) {
    it(`random operation sequences (chunkCapacity ${chunkCapacity})`, () => {
      fc.assert(
        fc.property(fc.array(op, { maxLength: 400 }), (ops) => {
          const table = new RemapTable({ chunkCapacity });
          const model = new Map<number, number>();
          for (const o of ops) {
            switch (o.op) {
              case 'set':
                expect(table.set(o.key, o.value)).toBe(model.get(o.key) ?? -1);
                model.set(o.key, o.value);
                break;
              case 'delete':
                expect(table.delete(o.key)).toBe(model.delete(o.key));
                break;
              case 'get':
                expect(table.get(o.key)).toBe(model.get(o.key) ?? -1);
                expect(table.has(o.key)).toBe(model.has(o.key));
                break;
              case 'next':
                expect(table.nextInRange(o.from, o.from + o.span)).toBe(modelNext(model, o.from, o.from + o.span));
                break;
            }
            expect(table.size).toBe(model.size);
          }
          table.checkInvariants();
          const want = sortedModel(model);
          expect([...table.entries()]).toEqual(want);
          const seen: [number, number][] = [];
          table.forEach((l, s) => seen.push([l, s]));
          expect(seen).toEqual(want);
          for (const [k, v] of want) expect(table.get(k)).toBe(v);
        }),
        { numRuns: chunkCapacity === 512 ? 100 : 300 },
      );
    });
  }

  for (const chunkCapacity of [4, 8, 512]) {
    it(`copyEntries() equals entries() and is unaffected by later changes (chunkCapacity ${chunkCapacity})`, () => {
      fc.assert(
        fc.property(fc.array(op, { maxLength: 400 }), fc.array(op, { maxLength: 50 }), (ops, later) => {
          const table = new RemapTable({ chunkCapacity });
          for (const o of ops) {
            if (o.op === 'set') table.set(o.key, o.value);
            else if (o.op === 'delete') table.delete(o.key);
          }
          const want = [...table.entries()];
          const { keys, values } = table.copyEntries();
          expect(keys).toBeInstanceOf(Float64Array);
          expect(values).toBeInstanceOf(Float64Array);
          // Hash order: compare as a set of pairs.
          const pairs = Array.from(keys, (k, i) => [k, values[i]] as [number, number]).sort((a, b) => a[0] - b[0]);
          expect(pairs).toEqual(want);
          expect(Array.from(table.copyKeys())).toEqual(want.map(([k]) => k));
          for (const o of later) {
            if (o.op === 'set') table.set(o.key, o.value);
            else if (o.op === 'delete') table.delete(o.key);
          }
          // a point-in-time copy: later changes do not show through
          const after = Array.from(keys, (k, i) => [k, values[i]] as [number, number]).sort((a, b) => a[0] - b[0]);
          expect(after).toEqual(want);
        }),
        { numRuns: chunkCapacity === 512 ? 100 : 300 },
      );
    });
  }

  it('copyEntries() of 1M entries is a few ms', () => {
    const n = 1_000_000;
    const table = new RemapTable();
    for (let i = 0; i < n; i++) table.set(i * 3 + 1, i);
    for (let i = 0; i < n; i += 7) table.delete(i * 3 + 1); // partly filled chunks
    let best = Infinity;
    let copy = table.copyEntries();
    for (let r = 0; r < 5; r++) {
      const t0 = performance.now();
      copy = table.copyEntries();
      best = Math.min(best, performance.now() - t0);
    }
    expect(copy.keys.length).toBe(table.size);
    for (let i = 0; i < copy.keys.length; i += 9973) expect(table.get(copy.keys[i])).toBe(copy.values[i]);
    const sortedKeys = Float64Array.from(copy.keys).sort();
    expect(sortedKeys[0]).toBe(4);
    expect(Math.max(...copy.values.subarray(0, 1000))).toBeLessThan(n);
    expect(copy.values.reduce((m, v) => Math.max(m, v), 0)).toBe(n - 2);
    console.log(`[remap perf] copyEntries() of ${table.size} entries: ${best.toFixed(2)} ms`);
    // its time is printed, not asserted (see bench:engine for speed figures)
  });

  it('keeps its invariants through bulk inserts and deletes in random order', () => {
    fc.assert(
      fc.property(fc.uniqueArray(fc.nat(5000), { minLength: 1, maxLength: 1500 }), fc.boolean(), (keys, ascending) => {
        const table = new RemapTable({ chunkCapacity: 16 });
        const insertOrder = ascending ? [...keys].sort((a, b) => a - b) : keys;
        for (const k of insertOrder) table.set(k, k * 2);
        table.checkInvariants();
        expect(table.size).toBe(keys.length);
        // Delete every other key in insertion order, then the rest in reverse.
        const half = keys.filter((_, i) => i % 2 === 0);
        for (const k of half) expect(table.delete(k)).toBe(true);
        table.checkInvariants();
        const rest = keys.filter((_, i) => i % 2 === 1).reverse();
        for (const k of rest) {
          expect(table.get(k)).toBe(k * 2);
          expect(table.delete(k)).toBe(true);
        }
        table.checkInvariants();
        expect(table.size).toBe(0);
        expect(table.get(keys[0])).toBe(-1);
      }),
      { numRuns: 60 },
    );
  });

  it('stays equal to the model while a built table is torn down in any order', () => {
    // Ascending builds leave full chunks, so deletes exercise both merging and
    // refilling a small chunk from a full neighbour, on either side.
    fc.assert(
      fc.property(
        fc.uniqueArray(fc.nat(3000), { minLength: 1, maxLength: 600 }).chain((keys) =>
          fc.tuple(
            fc.constant(keys),
            fc.oneof(
              fc.shuffledSubarray(keys),
              // A contiguous range, deleted upwards or downwards: this empties
              // chunks next to full ones.
              fc.tuple(fc.nat(keys.length), fc.nat(keys.length), fc.boolean()).map(([a, b, up]) => {
                const range = [...keys].sort((x, y) => x - y).slice(Math.min(a, b), Math.max(a, b));
                return up ? range : range.reverse();
              }),
            ),
            fc.boolean(),
            fc.constantFrom(4, 8, 16),
          ),
        ),
        ([keys, doomed, ascending, chunkCapacity]) => {
          const table = new RemapTable({ chunkCapacity });
          for (const k of ascending ? [...keys].sort((a, b) => a - b) : keys) table.set(k, k + 1);
          const model = new Map(keys.map((k) => [k, k + 1]));
          for (const [n, k] of doomed.entries()) {
            expect(table.delete(k)).toBe(true);
            model.delete(k);
            if (n % 50 === 0) {
              table.checkInvariants();
              expect([...table.entries()]).toEqual(sortedModel(model));
            }
          }
          table.checkInvariants();
          expect([...table.entries()]).toEqual(sortedModel(model));
        },
      ),
      { numRuns: 150 },
    );
  });

  it('refills a small first chunk from its full neighbour', () => {
    const table = new RemapTable({ chunkCapacity: 8 });
    for (let k = 0; k < 24; k++) table.set(k, 100 + k); // chunks [0..7] [8..15] [16..23]
    for (let k = 0; k < 7; k++) table.delete(k); // [7] next to a full [8..15]
    table.checkInvariants();
    expect([...table.entries()]).toEqual(Array.from({ length: 17 }, (_, i) => [i + 7, 107 + i]));
  });

  it('refills a small last chunk from its full neighbour', () => {
    const table = new RemapTable({ chunkCapacity: 8 });
    for (let k = 0; k < 18; k++) table.set(k, 100 + k); // chunks [0..7] [8..15] [16 17]
    table.delete(17); // the last chunk drops to 1 entry; 8 + 1 is too many to merge
    table.checkInvariants();
    expect([...table.entries()]).toEqual(Array.from({ length: 17 }, (_, k) => [k, 100 + k]));
  });

  it('forEachInRange visits exactly the mappings in [from, to) in order', () => {
    fc.assert(
      fc.property(
        fc.uniqueArray(fc.nat(2000), { maxLength: 300 }),
        fc.nat(2100),
        fc.nat(400),
        (keys, from, span) => {
          const table = RemapTable.fromEntries(keys.map((k) => [k, k + 7] as const), { chunkCapacity: 8 });
          const got: [number, number][] = [];
          table.forEachInRange(from, from + span, (l, s) => got.push([l, s]));
          const want = keys.filter((k) => k >= from && k < from + span).sort((a, b) => a - b).map((k) => [k, k + 7]);
          expect(got).toEqual(want);
        },
      ),
    );
  });

  it('answers -1 on an empty table and for empty or inverted ranges', () => {
    const table = new RemapTable();
    expect(table.get(0)).toBe(-1);
    expect(table.nextInRange(0, 100)).toBe(-1);
    table.set(5, 1);
    expect(table.nextInRange(5, 5)).toBe(-1);
    expect(table.nextInRange(6, 2)).toBe(-1);
    expect(table.nextInRange(5, 6)).toBe(5);
    expect(table.get(Number.NaN)).toBe(-1);
  });

  it('rejects keys and values that are not non-negative safe integers', () => {
    const table = new RemapTable();
    for (const bad of [-1, 1.5, Number.NaN, Infinity, 2 ** 53]) {
      expect(() => table.set(bad, 0)).toThrow(RangeError);
      expect(() => table.set(0, bad)).toThrow(RangeError);
    }
    expect(table.size).toBe(0);
  });

  it('refuses to iterate over a table that changes', () => {
    const table = RemapTable.fromEntries([[1, 1], [2, 2], [3, 3]]);
    expect(() => {
      for (const [l] of table.entries()) table.delete(l);
    }).toThrow(/modified during iteration/);
    expect(() => table.forEach((l) => table.set(l + 100, 0))).toThrow(/modified during iteration/);
  });

  it('clear() empties it', () => {
    const table = RemapTable.fromEntries([[1, 1], [2, 2]]);
    table.clear();
    expect(table.size).toBe(0);
    expect(table.get(1)).toBe(-1);
    table.set(3, 4);
    expect([...table]).toEqual([[3, 4]]);
  });
});
