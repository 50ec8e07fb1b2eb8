/**
 * The sorted store shared by RemapTable (block -> spare index) and BlockSet
 * (blocks only).
 *
 * Layout: a list of sorted chunks, each a Float64Array of keys (and, with
 * values, a parallel Float64Array of values), plus a top-level Float64Array
 * holding each chunk's smallest key. A lookup is two binary searches (the
 * top level, then one chunk). An insert or delete moves at most one chunk's
 * worth of entries; only the top level (one slot per chunk, ~1/400 of the
 * entries) is ever shifted as a whole.
 *
 * Why not a JS Map: a Map costs well over 32 bytes per entry and is not
 * ordered by key, and the planner needs "next remapped block at or after X".
 *
 * Memory: chunk arrays grow by ~1.25x and shrink when less than 5/8 full, so
 * capacity stays under 1.6x the entries; every chunk but the first and the
 * last holds at least a quarter of `chunkCapacity` entries (deletes merge or
 * rebalance neighbours). With values that is <= ~26 bytes per entry plus
 * per-chunk object overhead, ~20 bytes per entry in practice.
 *
 * Keys and values are non-negative safe integers (< 2^53); Float64 holds
 * them exactly.
 */

/** Most entries per chunk: a chunk search takes 9 steps and an insert moves at most 4 KiB per array. */
export const DEFAULT_CHUNK_CAPACITY = 512;

/**
 * Estimated V8 cost of one typed array besides its elements (the JSTypedArray,
 * its ArrayBuffer and the backing-store record), measured on Node 20 with
 * process.memoryUsage(); see tests/remap/remap-table.perf.test.ts.
 */
export const TYPED_ARRAY_OVERHEAD_BYTES = 200;

export interface SortedChunksOptions {
  /** Most entries per chunk; an even number >= 4. Small values are for tests. */
  chunkCapacity?: number;
}

const MIN_CAPACITY = 8;

/*
 * Branch-free binary searches: the comparison feeds arithmetic instead of a
 * jump, so random keys cost no branch mispredictions (~25% faster lookups
 * on warm data in a Node 20 micro-benchmark).
 */

/** Number of elements of arr[0..len) that are <= key (arr ascending). */
export function upperBound(arr: Float64Array, len: number, key: number): number {
  let base = 0;
  let n = len;
  while (n > 1) {
    const half = n >>> 1;
    base += half & -+(arr[base + half] <= key);
    n -= half;
  }
  return n === 1 ? base + +(arr[base] <= key) : base;
}

/** Number of elements of arr[0..len) that are < key (arr ascending). */
export function lowerBound(arr: Float64Array, len: number, key: number): number {
  let base = 0;
  let n = len;
  while (n > 1) {
    const half = n >>> 1;
    base += half & -+(arr[base + half] < key);
    n -= half;
  }
  return n === 1 ? base + +(arr[base] < key) : base;
}

export function checkBlockNumber(what: string, n: number): void {
  if (!(n >= 0 && Number.isSafeInteger(n))) {
    throw new RangeError(`${what} must be a non-negative safe integer, got ${String(n)}`);
  }
}

export class SortedChunks {
  protected readonly maxChunk: number;
  /** Interior chunks below this are merged with or refilled from a neighbour. */
  protected readonly minChunk: number;
  protected readonly withValues: boolean;
  protected readonly kind: string;

  protected nChunks = 0;
  protected count = 0;
  /** Smallest key of each chunk; slots >= nChunks are garbage. */
  protected mins: Float64Array = new Float64Array(4);
  /** Entries in each chunk; slots >= nChunks are garbage. */
  protected lens: Int32Array = new Int32Array(4);
  protected keys: Float64Array[] = [];
  /** Parallel to `keys` when withValues; empty otherwise. */
  protected vals: Float64Array[] = [];
  /** Bumped by every mutation, so iterators can refuse to run over a changed store. */
  protected mods = 0;

  /** Result of seek(): chunk and index of the key, or of where it would go. */
  protected seekChunk = 0;
  protected seekIndex = 0;

  protected constructor(kind: string, withValues: boolean, options: SortedChunksOptions = {}) {
    const cap = options.chunkCapacity ?? DEFAULT_CHUNK_CAPACITY;
    if (!Number.isSafeInteger(cap) || cap < 4 || cap % 2 !== 0) {
      throw new RangeError(`chunkCapacity must be an even integer >= 4, got ${String(cap)}`);
    }
    this.kind = kind;
    this.withValues = withValues;
    this.maxChunk = cap;
    this.minChunk = cap >>> 2;
  }

  get size(): number {
    return this.count;
  }

  /** Smallest key in [from, to), or -1. O(log n). */
  nextInRange(from: number, to: number): number {
    const n = this.nChunks;
    if (n === 0 || !(from < to)) return -1;
    let c = upperBound(this.mins, n, from) - 1;
    if (c < 0) c = 0;
    let i = lowerBound(this.keys[c], this.lens[c], from);
    if (i === this.lens[c]) {
      // Everything in chunk c is below `from`; the next chunk starts above it.
      c += 1;
      if (c === n) return -1;
      i = 0;
    }
    const key = this.keys[c][i];
    return key < to ? key : -1;
  }

  /**
   * Every key, ascending, in one new array: a point-in-time copy that later
   * mutations do not touch. One memcpy per chunk (a few ms at 1M entries),
   * so a caller can take a consistent snapshot synchronously and walk it
   * later, across macrotasks.
   */
  copyKeys(): Float64Array {
    return this.copyFrom(this.keys);
  }

  /** Concatenates the live part of each chunk of `arrays` (keys or values). */
  protected copyFrom(arrays: readonly Float64Array[]): Float64Array {
    const out = new Float64Array(this.count);
    let at = 0;
    for (let c = 0; c < this.nChunks; c++) {
      const len = this.lens[c];
      const a = arrays[c];
      out.set(len === a.length ? a : a.subarray(0, len), at);
      at += len;
    }
    return out;
  }

  /** Bytes held by this store: typed-array elements plus an estimate of per-object overhead. */
  memoryBytes(): number {
    const arraysPerChunk = this.withValues ? 2 : 1;
    let bytes = 64; // the object itself
    bytes += this.mins.byteLength + this.lens.byteLength + 2 * TYPED_ARRAY_OVERHEAD_BYTES;
    bytes += 2 * (16 + 4 * this.keys.length); // the two JS arrays of chunk references (compressed pointers)
    for (let c = 0; c < this.nChunks; c++) {
      bytes += arraysPerChunk * (this.keys[c].byteLength + TYPED_ARRAY_OVERHEAD_BYTES);
    }
    return bytes;
  }

  clear(): void {
    this.nChunks = 0;
    this.count = 0;
    this.mins = new Float64Array(4);
    this.lens = new Int32Array(4);
    this.keys = [];
    this.vals = [];
    this.mods++;
  }

  /** Throws if the internal structure is inconsistent. O(n); for tests and debugging. */
  checkInvariants(): void {
    const fail = (msg: string): never => {
      throw new Error(`${this.kind} invariant violated: ${msg}`);
    };
    if (this.keys.length !== this.nChunks) fail(`keys.length ${this.keys.length} != nChunks ${this.nChunks}`);
    if (this.withValues && this.vals.length !== this.nChunks) fail('vals.length != nChunks');
    let total = 0;
    let prev = -1;
    for (let c = 0; c < this.nChunks; c++) {
      const len = this.lens[c];
      const keys = this.keys[c];
      if (len < 1) fail(`chunk ${c} is empty`);
      if (len > keys.length) fail(`chunk ${c} len ${len} > capacity ${keys.length}`);
      if (keys.length > this.maxChunk) fail(`chunk ${c} capacity ${keys.length} > max ${this.maxChunk}`);
      if (this.withValues && this.vals[c].length !== keys.length) fail(`chunk ${c} values capacity differs`);
      if (keys.length > MIN_CAPACITY && keys.length > capacityFor(len, this.maxChunk) && len * 8 < keys.length * 5) {
        fail(`chunk ${c} capacity ${keys.length} too large for ${len} entries`);
      }
      if (c > 0 && c < this.nChunks - 1 && len < this.minChunk) fail(`interior chunk ${c} has ${len} < ${this.minChunk}`);
      if (this.mins[c] !== keys[0]) fail(`mins[${c}] ${this.mins[c]} != first key ${keys[0]}`);
      for (let i = 0; i < len; i++) {
        if (!(keys[i] > prev)) fail(`keys not strictly ascending at chunk ${c} index ${i}`);
        prev = keys[i];
      }
      total += len;
    }
    if (total !== this.count) fail(`sum of chunk lengths ${total} != size ${this.count}`);
  }

  /**
   * Positions seekChunk/seekIndex at `key`, or where it would be inserted,
   * and says whether it is present.
   */
  protected seek(key: number): boolean {
    const n = this.nChunks;
    if (n === 0) {
      this.seekChunk = 0;
      this.seekIndex = 0;
      return false;
    }
    let c = upperBound(this.mins, n, key) - 1;
    if (c < 0) c = 0;
    const keys = this.keys[c];
    const len = this.lens[c];
    const i = lowerBound(keys, len, key);
    this.seekChunk = c;
    this.seekIndex = i;
    return i < len && keys[i] === key;
  }

  /** Inserts at a position found by seek() for an absent key. */
  protected insertAt(c: number, i: number, key: number, value: number): void {
    if (this.nChunks === 0) {
      this.addChunk(0, capacityFor(1, this.maxChunk));
      c = 0;
      i = 0;
    } else {
      const len = this.lens[c];
      if (len === this.maxChunk) {
        if (i === len && c === this.nChunks - 1) {
          // Ascending inserts (a scan walking up the disk, a sorted load):
          // keep the full chunk full and start a new one.
          this.addChunk(c + 1, capacityFor(1, this.maxChunk));
          c += 1;
          i = 0;
        } else if (i === 0 && c === 0) {
          this.addChunk(0, capacityFor(1, this.maxChunk));
        } else {
          const half = len >>> 1;
          this.addChunk(c + 1, capacityFor(len - half + 1, this.maxChunk));
          this.moveEntries(c, half, c + 1, 0, len - half);
          this.lens[c + 1] = len - half;
          this.lens[c] = half;
          this.mins[c + 1] = this.keys[c + 1][0];
          const goRight = i > half;
          this.resize(c, capacityFor(goRight ? half : half + 1, this.maxChunk));
          if (goRight) {
            c += 1;
            i -= half;
          }
        }
      }
    }
    const len = this.lens[c];
    if (len === this.keys[c].length) this.resize(c, capacityFor(len + 1, this.maxChunk));
    const keys = this.keys[c];
    if (i < len) keys.copyWithin(i + 1, i, len);
    keys[i] = key;
    if (this.withValues) {
      const vals = this.vals[c];
      if (i < len) vals.copyWithin(i + 1, i, len);
      vals[i] = value;
    }
    this.lens[c] = len + 1;
    if (i === 0) this.mins[c] = key;
    this.count++;
    this.mods++;
  }

  /** Removes the entry at a position found by seek(). */
  protected removeAt(c: number, i: number): void {
    const len = this.lens[c] - 1;
    const keys = this.keys[c];
    if (i < len) {
      keys.copyWithin(i, i + 1, len + 1);
      if (this.withValues) this.vals[c].copyWithin(i, i + 1, len + 1);
    }
    this.lens[c] = len;
    this.count--;
    this.mods++;
    if (len === 0) {
      this.removeChunk(c);
      return;
    }
    if (i === 0) this.mins[c] = keys[0];
    if (len < this.minChunk && this.nChunks > 1) this.rebalance(c);
    else this.maybeShrink(c);
  }

  /** Chunk c fell below minChunk: merge it with a neighbour, or even the two out. */
  private rebalance(c: number): void {
    const a = c + 1 < this.nChunks ? c : c - 1;
    const b = a + 1;
    const la = this.lens[a];
    const lb = this.lens[b];
    const sum = la + lb;
    if (sum <= (3 * this.maxChunk) >>> 2) {
      this.resize(a, capacityFor(sum, this.maxChunk));
      this.moveEntries(b, 0, a, la, lb);
      this.lens[a] = sum;
      this.removeChunk(b);
      return;
    }
    const wantA = sum >>> 1;
    if (la < wantA) {
      // Move the first (wantA - la) entries of b to the end of a.
      const k = wantA - la;
      this.resize(a, capacityFor(wantA, this.maxChunk));
      this.moveEntries(b, 0, a, la, k);
      this.keys[b].copyWithin(0, k, lb);
      if (this.withValues) this.vals[b].copyWithin(0, k, lb);
      this.lens[a] = wantA;
      this.lens[b] = lb - k;
    } else {
      // Move the last (la - wantA) entries of a to the front of b.
      const k = la - wantA;
      this.resize(b, capacityFor(lb + k, this.maxChunk));
      this.keys[b].copyWithin(k, 0, lb);
      if (this.withValues) this.vals[b].copyWithin(k, 0, lb);
      this.moveEntries(a, wantA, b, 0, k);
      this.lens[a] = wantA;
      this.lens[b] = lb + k;
    }
    this.mins[b] = this.keys[b][0];
    this.maybeShrink(a);
    this.maybeShrink(b);
  }

  private maybeShrink(c: number): void {
    const cap = this.keys[c].length;
    const len = this.lens[c];
    if (cap > MIN_CAPACITY && len * 8 < cap * 5) {
      const want = capacityFor(len, this.maxChunk);
      if (want < cap) this.resize(c, want);
    }
  }

  private resize(c: number, cap: number): void {
    if (this.keys[c].length === cap) return;
    const len = this.lens[c];
    const keys = new Float64Array(cap);
    keys.set(this.keys[c].subarray(0, len));
    this.keys[c] = keys;
    if (this.withValues) {
      const vals = new Float64Array(cap);
      vals.set(this.vals[c].subarray(0, len));
      this.vals[c] = vals;
    }
  }

  private moveEntries(src: number, srcStart: number, dst: number, dstStart: number, n: number): void {
    this.keys[dst].set(this.keys[src].subarray(srcStart, srcStart + n), dstStart);
    if (this.withValues) this.vals[dst].set(this.vals[src].subarray(srcStart, srcStart + n), dstStart);
  }

  /** Inserts an empty chunk at index `at`; the caller fills it and its min. */
  private addChunk(at: number, cap: number): void {
    const n = this.nChunks;
    if (n === this.mins.length) {
      const mins = new Float64Array(n * 2);
      mins.set(this.mins);
      this.mins = mins;
      const lens = new Int32Array(n * 2);
      lens.set(this.lens);
      this.lens = lens;
    }
    if (at < n) {
      this.mins.copyWithin(at + 1, at, n);
      this.lens.copyWithin(at + 1, at, n);
    }
    this.lens[at] = 0;
    this.mins[at] = 0;
    this.keys.splice(at, 0, new Float64Array(cap));
    if (this.withValues) this.vals.splice(at, 0, new Float64Array(cap));
    this.nChunks = n + 1;
  }

  private removeChunk(at: number): void {
    const n = this.nChunks;
    if (at + 1 < n) {
      this.mins.copyWithin(at, at + 1, n);
      this.lens.copyWithin(at, at + 1, n);
    }
    this.keys.splice(at, 1);
    if (this.withValues) this.vals.splice(at, 1);
    this.nChunks = n - 1;
  }

  protected modifiedDuringIteration(): Error {
    return new Error(`${this.kind} was modified during iteration`);
  }
}

/** Capacity for a chunk of n entries: ~1.25x, a multiple of 8, within [8, max]. */
function capacityFor(n: number, max: number): number {
  const cap = (n + (n >>> 2) + 7) & ~7;
  return Math.min(max, Math.max(MIN_CAPACITY, cap));
}
