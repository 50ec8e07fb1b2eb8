import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { describe, expect, it } from 'vitest';
import { planRange } from '../../src/remap/planner.js';
import { RemapTable } from '../../src/remap/remap-table.js';

// A real gc() lets the heap measurement below mean something.
setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

function heapBytes(): number {
  gc();
  gc();
  const m = process.memoryUsage();
  return m.heapUsed + m.arrayBuffers;
}

/** Distinct random keys below 2^40 (a 4 PiB disk of 4 KiB blocks), deterministic. */
function randomKeys(n: number, seed: number): Float64Array {
  let s = seed >>> 0;
  const next = (): number => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s;
  };
  const keys = new Float64Array(n);
  for (let i = 0; i < n; i++) keys[i] = (next() % 256) * 2 ** 32 + next();
  // Keys drawn this way collide with probability ~n^2 / 2^41; dedupe anyway.
  const sorted = Float64Array.from(keys).sort();
  for (let i = 1; i < n; i++) if (sorted[i] === sorted[i - 1]) throw new Error('duplicate key; change the seed');
  return keys;
}

/** Per-lookup ns of `batches` batches of 1000 get() calls, each batch timed alone. */
function timeLookups(table: RemapTable, batch: (b: number) => Float64Array, batches: number): number[] {
  const out: number[] = [];
  let sink = 0;
  for (let b = 0; b < batches; b++) {
    const probes = batch(b);
    const s = process.hrtime.bigint();
    for (let i = 0; i < 1000; i++) sink += table.get(probes[i]);
    out.push(Number(process.hrtime.bigint() - s) / 1000);
  }
  if (sink === Number.MIN_VALUE) console.log(sink); // keep the loop observable
  return out;
}

function timePlans(table: RemapTable, offsetOf: (key: number) => number): number[] {
  const keys = Float64Array.from(table.entries(), ([k]) => k).filter((k) => k > 1000);
  const out: number[] = [];
  for (let b = 0; b < 100; b++) {
    const s = process.hrtime.bigint();
    for (let i = 0; i < 1000; i++) planRange(table, offsetOf(keys[b * 1000 + i]), 1 << 20, 4096);
    out.push(Number(process.hrtime.bigint() - s) / 1000);
  }
  return out;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[s.length >> 1];
}

describe('RemapTable at 1M entries', () => {
  it('builds 1M entries in random order at <= 32 bytes per entry and looks them up correctly (speed is reported)', () => {
    const N = 1_000_000;
    const keys = randomKeys(N, 12345);
    const before = heapBytes();

    const t0 = performance.now();
    const table = new RemapTable();
    for (let i = 0; i < N; i++) table.set(keys[i], i);
    const buildMs = performance.now() - t0;

    const measured = heapBytes() - before;
    const estimated = table.memoryBytes();
    expect(table.size).toBe(N);

    // get(): batches of 1000 lookups; the median of the per-lookup averages.
    // Random present keys: each batch touches fresh parts of the ~19 MB
    // table, so this is bound by memory latency, not by the search itself.
    const hitNs = timeLookups(table, (b) => keys.subarray((b * 7919) % (N - 1000)), 300);
    const warmKeys = keys.subarray(0, 1000).map((k) => k + 0.5);
    const missNs = timeLookups(table, () => warmKeys, 200); // the same absent keys: a warm working set
    // Consecutive blocks from random starts, as a sequential read walks the disk.
    const seqNs = timeLookups(table, (b) => Float64Array.from({ length: 1000 }, (_, i) => keys[b * 31] + i), 200);
    const emptyNs = timeLookups(new RemapTable(), () => warmKeys, 200);
    expect(table.get(warmKeys[0])).toBe(-1);

    // Planning 1 MiB requests: the common case (no remap in range), and one
    // remapped block in the middle (main / spare / main).
    const planNs = timePlans(table, (k) => (k + 1) * 4096);
    const planHitNs = timePlans(table, (k) => (k - 100) * 4096);
    expect(planRange(table, (keys[0] - 100) * 4096, 1 << 20, 4096).map((e) => e.target)).toEqual(['main', 'spare', 'main']);

    const sortedKeys = Float64Array.from(keys).sort();
    const t1 = performance.now();
    const ascending = new RemapTable();
    for (let i = 0; i < N; i++) ascending.set(sortedKeys[i], i);
    const ascendingMs = performance.now() - t1;

    const report = {
      entries: N,
      randomInsertMs: Math.round(buildMs),
      ascendingInsertMs: Math.round(ascendingMs),
      bytesPerEntryEstimated: +(estimated / N).toFixed(2),
      bytesPerEntryMeasured: +(measured / N).toFixed(2),
      bytesPerEntryAscending: +(ascending.memoryBytes() / N).toFixed(2),
      getHitMedianNs: +median(hitNs).toFixed(1),
      getWarmMissMedianNs: +median(missNs).toFixed(1),
      getSequentialMedianNs: +median(seqNs).toFixed(1),
      getEmptyMedianNs: +median(emptyNs).toFixed(1),
      plan1MiBNoRemapMedianNs: +median(planNs).toFixed(1),
      plan1MiBOneRemapMedianNs: +median(planHitNs).toFixed(1),
    };
    console.log(JSON.stringify(report));

    expect(estimated / N).toBeLessThanOrEqual(32);
    expect(measured / N).toBeLessThanOrEqual(32);
    expect(Math.abs(measured - estimated) / measured).toBeLessThan(0.15);
    // Speed is measured by `npm run bench:engine`, not asserted here: a
    // loaded CI machine makes any time bound flaky. The report above prints it.
    expect(table.get(keys[0])).toBe(0);
    expect(table.get(keys[N - 1])).toBe(N - 1);
    expect(table.get(keys[0] + 0.5)).toBe(-1);
    table.checkInvariants();
  });
});
