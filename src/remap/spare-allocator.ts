import { ERRNO, RemapError } from '../errors.js';
import type { BlockSet } from './block-set.js';
import type { RemapTable } from './remap-table.js';

export const MAX_SPARE_BLOCKS = 2 ** 32;

/**
 * Which spare data blocks (indices 0..total-1) are in use.
 *
 * Nothing here is persisted: derive() rebuilds the in-use set from the
 * persisted state (remap targets, bad spare blocks, quarantined blocks), so
 * there is no allocation pointer that a crash could leave stale. The
 * next-fit cursor lives only in memory; after a restart allocation starts
 * again from block 0, which is correct because every used block is marked.
 *
 * Memory: one bit per spare block (a 1 TiB spare of 4 KiB blocks: 32 MiB).
 */
export class SpareAllocator {
  readonly total: number;
  /** Bit set = in use. Bits past `total` in the last word are set, so a scan never returns them. */
  private readonly bits: Uint32Array;
  private usedCount = 0;
  private next = 0;

  constructor(total: number) {
    // Word and bit arithmetic below uses 32-bit operators. 2^32 blocks is a
    // 16 TiB spare at 4 KiB, with a 512 MiB bitmap.
    if (!(total >= 0 && total <= MAX_SPARE_BLOCKS && Number.isInteger(total))) {
      throw new RangeError(`spare block count must be an integer in 0..${MAX_SPARE_BLOCKS}, got ${String(total)}`);
    }
    this.total = total;
    this.bits = new Uint32Array(Math.ceil(total / 32));
    const tail = total % 32;
    if (tail !== 0) this.bits[this.bits.length - 1] = ~((1 << tail) - 1) >>> 0;
  }

  /**
   * The allocator implied by persisted state: every spare index that the
   * table maps to, and every block of the `unavailable` sets (bad spare
   * blocks, quarantined blocks), is in use; all others are free.
   *
   * Throws RangeError if any of them lies outside 0..total-1, and a
   * RemapError (EINVAL: corrupt state, never a media error) if two
   * logical blocks map to the same spare block.
   */
  static derive(total: number, table: RemapTable, ...unavailable: BlockSet[]): SpareAllocator {
    const alloc = new SpareAllocator(total);
    table.forEach((logical, spare) => {
      if (!alloc.markUsed(spare)) {
        throw new RemapError(
          ERRNO.EINVAL,
          `spare block ${spare} is mapped by more than one logical block (again by logical block ${logical})`,
          { block: spare, op: 'derive spare allocation' },
        );
      }
    });
    for (const set of unavailable) {
      set.forEach((block) => {
        alloc.markUsed(block);
      });
    }
    return alloc;
  }

  get used(): number {
    return this.usedCount;
  }

  get free(): number {
    return this.total - this.usedCount;
  }

  /** Where the next allocate() starts looking. */
  get cursor(): number {
    return this.next;
  }

  isUsed(index: number): boolean {
    this.checkIndex(index);
    return (this.bits[index >>> 5] & (1 << (index & 31))) !== 0;
  }

  /** Marks `index` in use; false if it already was. */
  markUsed(index: number): boolean {
    this.checkIndex(index);
    const w = index >>> 5;
    const bit = 1 << (index & 31);
    if ((this.bits[w] & bit) !== 0) return false;
    this.bits[w] |= bit;
    this.usedCount++;
    return true;
  }

  /** Marks `index` free; false if it already was. */
  release(index: number): boolean {
    this.checkIndex(index);
    const w = index >>> 5;
    const bit = 1 << (index & 31);
    if ((this.bits[w] & bit) === 0) return false;
    this.bits[w] &= ~bit;
    this.usedCount--;
    return true;
  }

  /**
   * Next free block at or after the cursor, wrapping to 0, marked in use;
   * -1 when every block is in use. Next-fit spreads fresh remaps over the
   * spare instead of hammering its first blocks.
   */
  allocate(): number {
    if (this.usedCount === this.total) return -1;
    const bits = this.bits;
    const words = bits.length;
    const start = this.next;
    let w = start >>> 5;
    // The first word: ignore bits below the cursor.
    let free = ~bits[w] & ~((1 << (start & 31)) - 1);
    for (let scanned = 0; free === 0; scanned++) {
      // At most words + 1 steps: the start word is visited again, in full, after wrapping.
      if (scanned > words) throw new Error('SpareAllocator: used count says free blocks exist but none were found');
      w = w + 1 === words ? 0 : w + 1;
      free = ~bits[w];
    }
    const bit = 31 - Math.clz32(free & -free);
    const index = w * 32 + bit;
    bits[w] |= 1 << bit;
    this.usedCount++;
    this.next = index + 1 === this.total ? 0 : index + 1;
    return index;
  }

  private checkIndex(index: number): void {
    if (!(index >= 0 && index < this.total && Number.isInteger(index))) {
      throw new RangeError(`spare block index ${String(index)} is out of range: the spare has ${this.total} blocks (0..${this.total - 1})`);
    }
  }
}
