import type { RemapTable } from './remap-table.js';

/** One backing I/O of a planned request. */
export interface Extent {
  target: 'main' | 'spare';
  /** First logical block covered. */
  logical: number;
  blocks: number;
  /** First spare block index; -1 for main. */
  spare: number;
  /** Byte offset of this extent in the request buffer. */
  bufOffset: number;
}

/**
 * Splits a request of `length` bytes at byte `offset` into backing I/Os, in
 * order. Only remapped blocks go to the spare; main runs are maximal, and
 * remapped blocks that are consecutive both logically and on the spare
 * share one spare extent. A request with no remapped block is a single main
 * extent, found with one O(log n) probe; otherwise the cost is O(log n + k)
 * for k remapped blocks in the range. A zero-length request plans to [].
 *
 * Throws RangeError unless offset and length are non-negative multiples of
 * blockSize (the device's minimum I/O size, so a valid request always is).
 */
export function planRange(table: RemapTable, offset: number, length: number, blockSize: number): Extent[] {
  if (!(blockSize > 0 && Number.isSafeInteger(blockSize))) {
    throw new RangeError(`block size must be a positive integer, got ${String(blockSize)}`);
  }
  if (!(offset >= 0 && Number.isSafeInteger(offset) && offset % blockSize === 0)) {
    throw new RangeError(`request offset ${String(offset)} is not a non-negative multiple of the block size ${blockSize}`);
  }
  if (!(length >= 0 && Number.isSafeInteger(length) && length % blockSize === 0)) {
    throw new RangeError(`request length ${String(length)} is not a non-negative multiple of the block size ${blockSize}`);
  }
  if (!Number.isSafeInteger(offset + length)) {
    throw new RangeError(`request end ${offset} + ${length} is beyond 2^53`);
  }
  const first = offset / blockSize;
  const blocks = length / blockSize;
  if (blocks === 0) return [];
  const end = first + blocks;

  const hit = table.size === 0 ? -1 : table.nextInRange(first, end);
  if (hit === -1) return [{ target: 'main', logical: first, blocks, spare: -1, bufOffset: 0 }];

  const extents: Extent[] = [];
  let pos = first; // first logical block not yet planned
  let run: Extent | null = null; // the last spare extent, while it can still grow
  table.forEachInRange(hit, end, (logical, spare) => {
    if (run !== null && logical === pos && spare === run.spare + run.blocks) {
      run.blocks++;
      pos++;
      return;
    }
    if (logical > pos) {
      extents.push({ target: 'main', logical: pos, blocks: logical - pos, spare: -1, bufOffset: (pos - first) * blockSize });
    }
    run = { target: 'spare', logical, blocks: 1, spare, bufOffset: (logical - first) * blockSize };
    extents.push(run);
    pos = logical + 1;
  });
  if (pos < end) {
    extents.push({ target: 'main', logical: pos, blocks: end - pos, spare: -1, bufOffset: (pos - first) * blockSize });
  }
  return extents;
}
