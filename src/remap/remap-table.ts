import { SortedChunks, TYPED_ARRAY_OVERHEAD_BYTES, checkBlockNumber, type SortedChunksOptions } from './sorted-chunks.js';

/** Words per hash slot: key low 32 bits; key high 21 bits | (probe distance + 1) << 21; value. */
const SLOT = 3;
/** Largest value held in the hash; larger ones (a spare of >= 16 TiB of 4 KiB blocks) go to the overflow map. */
const MAX_HASHED_VALUE = 0xffff_ffff;
const HI_MASK = 0x1f_ffff;
/** Largest probe distance a slot can record (11 bits, minus the "occupied" offset). */
const MAX_DIST = 2046;
const MIN_SLOTS = 16;
const TWO32 = 4_294_967_296;
/** The hash grows by 1.25x past this load and shrinks below MIN_LOAD. */
const MAX_LOAD = 0.9;
const MIN_LOAD = 0.3;

/**
 * Logical block -> spare block index.
 *
 * Two parts:
 * - the keys, ordered, in the chunked store of SortedChunks (~11 bytes per
 *   entry): range queries for the planner ("next remapped block at or after
 *   X") and ascending iteration;
 * - a Robin Hood hash index for get(), the per-request hot path: open
 *   addressing over one Uint32Array of 12-byte slots (key, probe distance,
 *   value), so a lookup usually touches one or two cache lines where a
 *   binary search over 1M entries makes ~20 dependent probes, several of
 *   them cache misses. Robin Hood ordering keeps probe runs short at high
 *   load and ends a miss early, so the load can stay in (0.72, 0.9]: 13-17
 *   bytes per entry. Values >= 2^32-1 go to an overflow Map (correct, slower).
 *
 * Keys and values are non-negative safe integers (< 2^53). An empty table
 * answers get() in constant time (the normal state of a healthy disk). Not
 * safe to mutate while iterating: entries() and forEach() throw if the
 * table changes under them.
 */
export class RemapTable extends SortedChunks {
  private slots: Uint32Array = new Uint32Array(SLOT * MIN_SLOTS);
  private cap = MIN_SLOTS;
  /** Entries held in `slots`. */
  private hashed = 0;
  /** Entries whose value does not fit in 32 bits. */
  private readonly overflow = new Map<number, number>();

  constructor(options: SortedChunksOptions = {}) {
    super('RemapTable', false, options);
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
    if (this.count === 0) return -1;
    // A non-integer key yields a fractional `hi` and matches nothing.
    const lo = logical >>> 0;
    const hi = (logical - lo) / TWO32;
    const slots = this.slots;
    const cap = this.cap;
    let h = home(lo, hi, cap);
    for (let d = 0; ; d++) {
      const w = slots[SLOT * h + 1];
      // Empty (w === 0), or a slot nearer its home than we are to ours: absent.
      if ((w >>> 21) - 1 < d) break;
      if (slots[SLOT * h] === lo && (w & HI_MASK) === hi) return slots[SLOT * h + 2];
      if (++h === cap) h = 0;
    }
    return this.overflow.size === 0 ? -1 : this.overflow.get(logical) ?? -1;
  }

  has(logical: number): boolean {
    return this.get(logical) !== -1;
  }

  /** Maps `logical` to `spare`; returns the previous spare index or -1. */
  set(logical: number, spare: number): number {
    checkBlockNumber('logical block', logical);
    checkBlockNumber('spare block index', spare);
    if (this.seek(logical)) {
      const prev = this.unhash(logical);
      this.hash(logical, spare);
      this.mods++;
      return prev;
    }
    this.insertAt(this.seekChunk, this.seekIndex, logical, 0);
    this.hash(logical, spare);
    return -1;
  }

  /** Removes the mapping of `logical`; false if there was none. */
  delete(logical: number): boolean {
    if (!this.seek(logical)) return false;
    this.removeAt(this.seekChunk, this.seekIndex);
    this.unhash(logical);
    return true;
  }

  override clear(): void {
    super.clear();
    this.cap = MIN_SLOTS;
    this.slots = new Uint32Array(SLOT * MIN_SLOTS);
    this.hashed = 0;
    this.overflow.clear();
  }

  override memoryBytes(): number {
    return super.memoryBytes() + this.slots.byteLength + TYPED_ARRAY_OVERHEAD_BYTES + 80 * this.overflow.size;
  }

  override checkInvariants(): void {
    super.checkInvariants();
    const slots = this.slots;
    let used = 0;
    for (let h = 0; h < this.cap; h++) {
      const w = slots[SLOT * h + 1];
      if (w === 0) continue;
      used++;
      const d = (w >>> 21) - 1;
      const want = home(slots[SLOT * h], w & HI_MASK, this.cap);
      if ((want + d) % this.cap !== h) throw new Error(`${this.kind}: hash slot ${h} records distance ${d} from home ${want}`);
    }
    if (used !== this.hashed || this.hashed + this.overflow.size !== this.count) {
      throw new Error(`${this.kind}: hash holds ${used}/${this.hashed} + ${this.overflow.size} entries for ${this.count} keys`);
    }
    for (const k of this.keysInOrder()) {
      if (this.get(k) < 0) throw new Error(`${this.kind}: key ${k} has no value`);
    }
  }

  private *keysInOrder(): IterableIterator<number> {
    for (let c = 0; c < this.nChunks; c++) {
      for (let i = 0; i < this.lens[c]; i++) yield this.keys[c][i];
    }
  }

  /** Stores key -> value in the hash (or the overflow map); the key must not be there yet. */
  private hash(key: number, value: number): void {
    if (value >= MAX_HASHED_VALUE) {
      this.overflow.set(key, value);
      return;
    }
    if (this.hashed + 1 > MAX_LOAD * this.cap) this.resizeHash(Math.ceil(this.cap * 1.25));
    while (!this.place(key, value)) this.resizeHash(Math.ceil(this.cap * 1.25));
    this.hashed++;
  }

  /** Robin Hood insert; false (nothing changed) if a probe distance would not fit its 11 bits. */
  private place(key: number, value: number): boolean {
    const slots = this.slots;
    const cap = this.cap;
    let lo = key >>> 0;
    let hi = (key - lo) / TWO32;
    let val = value;
    let h = home(lo, hi, cap);
    // Check first that the run has room within MAX_DIST, so a refusal changes nothing.
    let probe = h;
    for (let d = 0; ; d++) {
      if (d > MAX_DIST) return false;
      if (slots[SLOT * probe + 1] === 0) break;
      if (++probe === cap) probe = 0;
    }
    for (let d = 0; ; d++) {
      const w = slots[SLOT * h + 1];
      if (w === 0) {
        slots[SLOT * h] = lo;
        slots[SLOT * h + 1] = hi | ((d + 1) << 21);
        slots[SLOT * h + 2] = val;
        return true;
      }
      const sd = (w >>> 21) - 1;
      if (sd < d) {
        // Take the slot from the richer entry and carry it on.
        const elo = slots[SLOT * h];
        const ehi = w & HI_MASK;
        const eval_ = slots[SLOT * h + 2];
        slots[SLOT * h] = lo;
        slots[SLOT * h + 1] = hi | ((d + 1) << 21);
        slots[SLOT * h + 2] = val;
        lo = elo;
        hi = ehi;
        val = eval_;
        d = sd;
      }
      if (++h === cap) h = 0;
    }
  }

  /** Removes `key` from the hash (or the overflow map) and returns its value, or -1. */
  private unhash(key: number): number {
    if (this.overflow.size > 0 && this.overflow.has(key)) {
      const v = this.overflow.get(key) ?? -1;
      this.overflow.delete(key);
      return v;
    }
    const slots = this.slots;
    const cap = this.cap;
    const lo = key >>> 0;
    const hi = (key - lo) / TWO32;
    let h = home(lo, hi, cap);
    for (let d = 0; ; d++) {
      const w = slots[SLOT * h + 1];
      if ((w >>> 21) - 1 < d) return -1;
      if (slots[SLOT * h] === lo && (w & HI_MASK) === hi) break;
      if (++h === cap) h = 0;
    }
    const value = slots[SLOT * h + 2];
    // Backward shift: pull the rest of the run one slot nearer home.
    for (;;) {
      let j = h + 1;
      if (j === cap) j = 0;
      const w = slots[SLOT * j + 1];
      if (w === 0 || w >>> 21 === 1) break;
      slots[SLOT * h] = slots[SLOT * j];
      slots[SLOT * h + 1] = w - (1 << 21);
      slots[SLOT * h + 2] = slots[SLOT * j + 2];
      h = j;
    }
    slots[SLOT * h] = 0;
    slots[SLOT * h + 1] = 0;
    slots[SLOT * h + 2] = 0;
    this.hashed--;
    if (this.cap > MIN_SLOTS && this.hashed < MIN_LOAD * this.cap) this.resizeHash(Math.ceil(this.hashed / 0.6));
    return value;
  }

  /** Rehashes into `n` slots (more if some probe run would not fit its distance field). */
  private resizeHash(n: number): void {
    const old = this.slots;
    const oldCap = this.cap;
    for (let size = Math.max(MIN_SLOTS, n); ; size = Math.ceil(size * 1.25)) {
      this.cap = size;
      this.slots = new Uint32Array(SLOT * size);
      let ok = true;
      for (let h = 0; h < oldCap && ok; h++) {
        const w = old[SLOT * h + 1];
        if (w !== 0) ok = this.place((w & HI_MASK) * TWO32 + old[SLOT * h], old[SLOT * h + 2]);
      }
      if (ok) return;
    }
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
      const len = this.lens[c];
      for (; i < len; i++) {
        const key = keys[i];
        if (!(key < to)) return;
        cb(key, this.get(key));
        if (this.mods !== mods) throw this.modifiedDuringIteration();
      }
    }
  }

  /** Calls `cb(logical, spare)` for every mapping in ascending order, without allocating. */
  forEach(cb: (logical: number, spare: number) => void): void {
    const mods = this.mods;
    for (let c = 0; c < this.nChunks; c++) {
      const keys = this.keys[c];
      const len = this.lens[c];
      for (let i = 0; i < len; i++) {
        cb(keys[i], this.get(keys[i]));
        if (this.mods !== mods) throw this.modifiedDuringIteration();
      }
    }
  }

  /**
   * Every mapping as two parallel arrays (logical, and its spare index), in
   * no particular order (the hash's): a point-in-time copy, unaffected by
   * later changes. One pass over the hash, a few ms at 1M entries. For
   * ascending order use entries() or copyKeys() + get().
   */
  copyEntries(): { keys: Float64Array; values: Float64Array } {
    const keys = new Float64Array(this.count);
    const values = new Float64Array(this.count);
    const slots = this.slots;
    let at = 0;
    for (let h = 0; h < this.cap; h++) {
      const w = slots[SLOT * h + 1];
      if (w === 0) continue;
      keys[at] = (w & HI_MASK) * TWO32 + slots[SLOT * h];
      values[at++] = slots[SLOT * h + 2];
    }
    for (const [k, v] of this.overflow) {
      keys[at] = k;
      values[at++] = v;
    }
    return { keys, values };
  }

  /** [logical, spare] pairs in ascending logical order. */
  *entries(): IterableIterator<[number, number]> {
    const mods = this.mods;
    for (let c = 0; c < this.nChunks; c++) {
      const len = this.lens[c];
      for (let i = 0; i < len; i++) {
        if (this.mods !== mods) throw this.modifiedDuringIteration();
        const key = this.keys[c][i];
        yield [key, this.get(key)];
      }
    }
  }

  [Symbol.iterator](): IterableIterator<[number, number]> {
    return this.entries();
  }
}

/** Home slot of a key (low and high words) in a hash of `cap` slots: a multiplicative hash, scaled to the range. */
function home(lo: number, hi: number, cap: number): number {
  const x = Math.imul(lo ^ Math.imul(hi, 0x85eb_ca6b), 0x9e37_79b1) ^ hi;
  const h = Math.floor(((x >>> 0) * cap) / TWO32);
  return h < cap ? h : cap - 1;
}
