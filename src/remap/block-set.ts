import { SortedChunks, checkBlockNumber, lowerBound, upperBound, type SortedChunksOptions } from './sorted-chunks.js';

/**
 * An ordered set of block numbers: pending logical blocks, bad spare
 * blocks, quarantined spare blocks. Same chunked layout as RemapTable
 * without the values (~10 bytes per entry). Not safe to mutate while
 * iterating: values() and forEach() throw if the set changes under them.
 */
export class BlockSet extends SortedChunks {
  constructor(options: SortedChunksOptions = {}) {
    super('BlockSet', false, options);
  }

  static from(blocks: Iterable<number>, options: SortedChunksOptions = {}): BlockSet {
    const set = new BlockSet(options);
    for (const b of blocks) set.add(b);
    return set;
  }

  has(block: number): boolean {
    const n = this.nChunks;
    if (n === 0) return false;
    const c = upperBound(this.mins, n, block) - 1;
    if (c < 0) return false;
    const keys = this.keys[c];
    const len = this.lens[c];
    const i = lowerBound(keys, len, block);
    return i < len && keys[i] === block;
  }

  /** Adds `block`; true if it was not already present. */
  add(block: number): boolean {
    checkBlockNumber('block', block);
    if (this.seek(block)) return false;
    this.insertAt(this.seekChunk, this.seekIndex, block, 0);
    return true;
  }

  /** Removes `block`; false if it was not present. */
  delete(block: number): boolean {
    if (!this.seek(block)) return false;
    this.removeAt(this.seekChunk, this.seekIndex);
    return true;
  }

  /** Calls `cb(block)` for every block in ascending order, without allocating. */
  forEach(cb: (block: number) => void): void {
    const mods = this.mods;
    for (let c = 0; c < this.nChunks; c++) {
      const keys = this.keys[c];
      const len = this.lens[c];
      for (let i = 0; i < len; i++) {
        cb(keys[i]);
        if (this.mods !== mods) throw this.modifiedDuringIteration();
      }
    }
  }

  /** Blocks in ascending order. */
  *values(): IterableIterator<number> {
    const mods = this.mods;
    for (let c = 0; c < this.nChunks; c++) {
      const len = this.lens[c];
      for (let i = 0; i < len; i++) {
        if (this.mods !== mods) throw this.modifiedDuringIteration();
        yield this.keys[c][i];
      }
    }
  }

  [Symbol.iterator](): IterableIterator<number> {
    return this.values();
  }
}
