import { SortedChunks, checkBlockNumber, lowerBound, upperBound, type SortedChunksOptions } from './sorted-chunks.js';

/**
 * Logical block -> spare block index, ordered by logical block.
 *
 * get() is the per-request hot path: two binary searches over typed arrays,
 * no allocation, and a constant-time answer for an empty table (the normal
 * state of a healthy disk). Not safe to mutate while iterating: entries()
 * and forEach() throw if the table changes under them.
 */
export class RemapTable extends SortedChunks {
  /** Chunk of the last get(); only a guess, checked against `mins` before use. */
  private hintChunk = 0;

  constructor(options: SortedChunksOptions = {}) {
    super('RemapTable', true, options);
  }

  /**
   * Builds a table from [logical, spare] pairs; a later pair for the same
   * logical block wins. Ascending input fills chunks completely.
   */
  static fromEntries(entries: Iterable<readonly [number, number]>, options: SortedChunksOptions = {}): RemapTable {
    const table = new RemapTable(options);
    for (const [logical, spare] of entries) table.set(logical, spare);
    return table;
  }

  /** Spare index of `logical`, or -1 when it is not remapped. */
  get(logical: number): number {
    const n = this.nChunks;
    if (n === 0) return -1;
    // Requests cluster (sequential I/O, a filesystem's hot blocks): try the
    // chunk of the previous lookup before searching the top level.
    const mins = this.mins;
    let c = this.hintChunk;
    if (!(c < n && mins[c] <= logical && (c + 1 === n || logical < mins[c + 1]))) {
      c = upperBound(mins, n, logical) - 1;
      if (c < 0) return -1;
      this.hintChunk = c;
    }
    const keys = this.keys[c];
    const len = this.lens[c];
    const i = lowerBound(keys, len, logical);
    return i < len && keys[i] === logical ? this.vals[c][i] : -1;
  }

  has(logical: number): boolean {
    return this.get(logical) !== -1;
  }

  /** Maps `logical` to `spare`; returns the previous spare index or -1. */
  set(logical: number, spare: number): number {
    checkBlockNumber('logical block', logical);
    checkBlockNumber('spare block index', spare);
    if (this.seek(logical)) {
      const vals = this.vals[this.seekChunk];
      const prev = vals[this.seekIndex];
      vals[this.seekIndex] = spare;
      this.mods++;
      return prev;
    }
    this.insertAt(this.seekChunk, this.seekIndex, logical, spare);
    return -1;
  }

  /** Removes the mapping of `logical`; false if there was none. */
  delete(logical: number): boolean {
    if (!this.seek(logical)) return false;
    this.removeAt(this.seekChunk, this.seekIndex);
    return true;
  }

  /**
   * Calls `cb(logical, spare)` for every mapping with logical in [from, to),
   * in ascending order. O(log n + k); the table must not change meanwhile.
   */
  forEachInRange(from: number, to: number, cb: (logical: number, spare: number) => void): void {
    if (this.nChunks === 0 || !(from < to)) return;
    const mods = this.mods;
    this.seek(from);
    for (let c = this.seekChunk, i = this.seekIndex; c < this.nChunks; c++, i = 0) {
      const keys = this.keys[c];
      const vals = this.vals[c];
      const len = this.lens[c];
      for (; i < len; i++) {
        const key = keys[i];
        if (!(key < to)) return;
        cb(key, vals[i]);
        if (this.mods !== mods) throw this.modifiedDuringIteration();
      }
    }
  }

  /** Calls `cb(logical, spare)` for every mapping in ascending order, without allocating. */
  forEach(cb: (logical: number, spare: number) => void): void {
    const mods = this.mods;
    for (let c = 0; c < this.nChunks; c++) {
      const keys = this.keys[c];
      const vals = this.vals[c];
      const len = this.lens[c];
      for (let i = 0; i < len; i++) {
        cb(keys[i], vals[i]);
        if (this.mods !== mods) throw this.modifiedDuringIteration();
      }
    }
  }

  /**
   * Every mapping as two parallel arrays (logical ascending, and its spare
   * index): a point-in-time copy, unaffected by later changes. A few ms at
   * 1M entries; see SortedChunks.copyKeys().
   */
  copyEntries(): { keys: Float64Array; values: Float64Array } {
    return { keys: this.copyFrom(this.keys), values: this.copyFrom(this.vals) };
  }

  /** [logical, spare] pairs in ascending logical order. */
  *entries(): IterableIterator<[number, number]> {
    const mods = this.mods;
    for (let c = 0; c < this.nChunks; c++) {
      const len = this.lens[c];
      for (let i = 0; i < len; i++) {
        if (this.mods !== mods) throw this.modifiedDuringIteration();
        yield [this.keys[c][i], this.vals[c][i]];
      }
    }
  }

  [Symbol.iterator](): IterableIterator<[number, number]> {
    return this.entries();
  }
}
