/**
 * RemapTable.get() cost at 1M entries. Lookups are timed in blocks of
 * `batch` (one clock read per block, divided by the block size) to keep the
 * timer's own cost out; the percentiles are over those block means.
 */
import { RemapTable } from '../src/remap/remap-table.js';
import { quantile, sortedCopy, xorshift32 } from './util.js';

export interface LookupFigures {
  pattern: string;
  lookups: number;
  medianNs: number;
  p99Ns: number;
  /** Fraction of lookups that found an entry. */
  hitRate: number;
}

export interface TableBenchResult {
  entries: number;
  keySpace: number;
  buildMs: number;
  rows: LookupFigures[];
  /** The same timed loop around a trivial expression: loop + clock cost per lookup. */
  loopOverheadNs: number;
}

let sink = 0;

/** table.get() called directly in the timed loop (no callback in between, so nothing extra to inline). */
function timeGets(table: RemapTable, keys: Float64Array, batch: number): { perBlockNs: Float64Array; hits: number } {
  const blocks = Math.floor(keys.length / batch);
  const perBlockNs = new Float64Array(blocks);
  let hits = 0;
  for (let b = 0; b < blocks; b++) {
    const from = b * batch;
    const to = from + batch;
    const t0 = process.hrtime.bigint();
    for (let i = from; i < to; i++) {
      if (table.get(keys[i]) >= 0) hits++;
    }
    perBlockNs[b] = Number(process.hrtime.bigint() - t0) / batch;
  }
  return { perBlockNs, hits };
}

/** The same loop with a trivial body: what the loop and the clock cost per lookup. */
function timeTrivial(keys: Float64Array, batch: number): { perBlockNs: Float64Array; hits: number } {
  const blocks = Math.floor(keys.length / batch);
  const perBlockNs = new Float64Array(blocks);
  let hits = 0;
  for (let b = 0; b < blocks; b++) {
    const from = b * batch;
    const to = from + batch;
    const t0 = process.hrtime.bigint();
    for (let i = from; i < to; i++) {
      if ((keys[i] & 1) - 1 >= 0) hits++;
    }
    perBlockNs[b] = Number(process.hrtime.bigint() - t0) / batch;
  }
  return { perBlockNs, hits };
}

export function benchRemapTable(entries = 1_000_000, lookups = 1_000_000, batch = 1000, keySpace = 2 ** 30): TableBenchResult {
  const rand = xorshift32(12345);
  // Distinct random keys, inserted in random order (as a journal replay would).
  const present = new Float64Array(entries);
  const seen = new Set<number>();
  for (let i = 0; i < entries; ) {
    const k = rand() % keySpace;
    if (seen.has(k)) continue;
    seen.add(k);
    present[i++] = k;
  }
  const t0 = performance.now();
  const table = new RemapTable();
  for (let i = 0; i < entries; i++) table.set(present[i], i);
  const buildMs = performance.now() - t0;

  const presentKeys = new Float64Array(lookups);
  for (let i = 0; i < lookups; i++) presentKeys[i] = present[rand() % entries];
  const absentKeys = new Float64Array(lookups);
  for (let i = 0; i < lookups; ) {
    const k = rand() % keySpace;
    if (!seen.has(k)) absentKeys[i++] = k;
  }
  const start = present[rand() % entries];
  const seqKeys = new Float64Array(lookups);
  for (let i = 0; i < lookups; i++) seqKeys[i] = (start + i) % keySpace;

  const sets: Array<[string, Float64Array]> = [
    ['random present keys', presentKeys],
    ['random absent keys', absentKeys],
    ['sequential keys', seqKeys],
  ];
  // Warm-up: let the JIT settle on every path before timing anything.
  for (let round = 0; round < 2; round++) {
    for (const [, keys] of sets) sink += timeGets(table, keys.subarray(0, 200_000), batch).hits;
    sink += timeTrivial(presentKeys.subarray(0, 200_000), batch).hits;
  }
  const rows: LookupFigures[] = [];
  for (const [pattern, keys] of sets) {
    const { perBlockNs, hits } = timeGets(table, keys, batch);
    const s = sortedCopy(perBlockNs);
    rows.push({ pattern, lookups: keys.length, medianNs: quantile(s, 0.5), p99Ns: quantile(s, 0.99), hitRate: hits / keys.length });
  }
  const base = sortedCopy(timeTrivial(presentKeys, batch).perBlockNs);
  if (sink === 0.5) console.log(''); // keep `sink` observable
  return { entries: table.size, keySpace, buildMs, rows, loopOverheadNs: quantile(base, 0.5) };
}
