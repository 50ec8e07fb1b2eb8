import { ERRNO, RemapError } from '../errors.js';
import { META_BLOCK } from './io.js';
import { RECORD_BYTES } from './records.js';

/** Size of the common header of journal and checkpoint blocks. */
export const BLOCK_HEADER_BYTES = 64;
/** Records per 4 KiB journal or checkpoint block: (4096 - 64) / 24 = 168. */
export const RECORDS_PER_BLOCK = Math.floor((META_BLOCK - BLOCK_HEADER_BYTES) / RECORD_BYTES);

export const DEFAULT_JOURNAL_BYTES = 8 * 1024 * 1024;
export const MIN_JOURNAL_BLOCKS = 16;

export interface CopyLayout {
  /** Absolute byte offsets on the device. */
  superblock: number;
  checkpointSlots: [number, number];
  journal: number;
  /** First and one-past-last byte of this copy. */
  start: number;
  end: number;
}

/** Deterministic placement of metadata and spare data inside the area. */
export interface Layout {
  areaOffset: number;
  /** Usable area size (rounded down to 4 KiB). */
  areaBytes: number;
  blockSize: number;
  journalBlocks: number;
  /** Blocks per checkpoint slot. */
  checkpointBlocks: number;
  /** Records one checkpoint can hold (checkpointBlocks * 168 >= 2 * dataBlocks + maxPending). */
  checkpointCapacity: number;
  maxPending: number;
  /** Bytes of one metadata copy: superblock + 2 slots + journal. */
  copyBytes: number;
  copies: [CopyLayout, CopyLayout];
  /** Spare data blocks: index i lives at dataOffset + i * blockSize. */
  dataOffset: number;
  dataBlocks: number;
}

export interface LayoutOptions {
  journalBytes?: number;
  maxPending?: number;
}

/** Byte offset of spare block `index` on the device. */
export function spareBlockOffset(layout: Layout, index: number): number {
  if (!Number.isSafeInteger(index) || index < 0 || index >= layout.dataBlocks)
    throw new RemapError(ERRNO.EINVAL, `spare block index ${index} outside 0..${layout.dataBlocks - 1}`);
  return layout.dataOffset + index * layout.blockSize;
}

function checkpointBlocksFor(records: number): number {
  return Math.max(1, Math.ceil(records / RECORDS_PER_BLOCK));
}

/** Builds the full layout from the stored parameters (used by both format and load). */
export function layoutFromParams(p: {
  areaOffset: number;
  areaBytes: number;
  blockSize: number;
  journalBlocks: number;
  checkpointBlocks: number;
  maxPending: number;
  dataBlocks: number;
}): Layout {
  const copyBytes = META_BLOCK * (1 + 2 * p.checkpointBlocks + p.journalBlocks);
  const a = p.areaOffset;
  const slot = p.checkpointBlocks * META_BLOCK;
  const c0: CopyLayout = {
    superblock: a,
    checkpointSlots: [a + META_BLOCK, a + META_BLOCK + slot],
    journal: a + META_BLOCK + 2 * slot,
    start: a,
    end: a + copyBytes,
  };
  const b = a + p.areaBytes - copyBytes;
  const c1: CopyLayout = {
    checkpointSlots: [b, b + slot],
    journal: b + 2 * slot,
    superblock: a + p.areaBytes - META_BLOCK,
    start: b,
    end: a + p.areaBytes,
  };
  return {
    areaOffset: a,
    areaBytes: p.areaBytes,
    blockSize: p.blockSize,
    journalBlocks: p.journalBlocks,
    checkpointBlocks: p.checkpointBlocks,
    checkpointCapacity: p.checkpointBlocks * RECORDS_PER_BLOCK,
    maxPending: p.maxPending,
    copyBytes,
    copies: [c0, c1],
    dataOffset: c0.end,
    dataBlocks: p.dataBlocks,
  };
}

/** Returns a reason string when the stored parameters are not self-consistent. */
export function checkLayout(l: Layout): string | undefined {
  const ints = [l.areaOffset, l.areaBytes, l.journalBlocks, l.checkpointBlocks, l.maxPending, l.dataBlocks];
  if (!ints.every((n) => Number.isSafeInteger(n) && n >= 0)) return 'layout field out of range';
  if (l.blockSize !== 512 && l.blockSize !== 4096) return `block size ${l.blockSize} is neither 512 nor 4096`;
  if (l.areaOffset % META_BLOCK !== 0 || l.areaBytes % META_BLOCK !== 0) return 'area not 4 KiB aligned';
  if (l.journalBlocks < MIN_JOURNAL_BLOCKS) return `journal of ${l.journalBlocks} blocks is below the minimum ${MIN_JOURNAL_BLOCKS}`;
  if (l.checkpointCapacity < 2 * l.dataBlocks + l.maxPending) return 'checkpoint slots too small for the data blocks';
  if (l.dataBlocks < 1) return 'no data blocks';
  const dataEnd = l.dataOffset + l.dataBlocks * l.blockSize;
  if (dataEnd > l.copies[1].start) return `data blocks end at ${dataEnd}, past the start of copy 1 at ${l.copies[1].start}`;
  return undefined;
}

/**
 * Computes the layout of an area: copy 0 at its start, copy 1 at its end
 * (superblock in the last 4 KiB), the largest number of spare data blocks
 * that fits between them. Deterministic. Throws RemapError ENOSPC when the
 * area cannot hold both copies and at least one data block, EINVAL for bad
 * arguments.
 */
export function computeLayout(areaOffset: number, areaBytes: number, blockSize: number, opts: LayoutOptions = {}): Layout {
  const bad = (msg: string): RemapError => new RemapError(ERRNO.EINVAL, msg, { op: 'metadata-layout' });
  if (!Number.isSafeInteger(areaOffset) || areaOffset < 0 || areaOffset % META_BLOCK !== 0)
    throw bad(`area offset ${areaOffset} is not a non-negative multiple of ${META_BLOCK}`);
  if (!Number.isSafeInteger(areaBytes) || areaBytes < 0) throw bad(`area size ${areaBytes} is not a non-negative integer`);
  if (blockSize !== 512 && blockSize !== 4096) throw bad(`block size ${blockSize} must be 512 or 4096`);
  const journalBytes = opts.journalBytes ?? DEFAULT_JOURNAL_BYTES;
  if (!Number.isSafeInteger(journalBytes) || journalBytes % META_BLOCK !== 0 || journalBytes < MIN_JOURNAL_BLOCKS * META_BLOCK)
    throw bad(`journal size ${journalBytes} must be a multiple of ${META_BLOCK} and at least ${MIN_JOURNAL_BLOCKS * META_BLOCK}`);
  if (opts.maxPending !== undefined && (!Number.isSafeInteger(opts.maxPending) || opts.maxPending < 0))
    throw bad(`maxPending ${opts.maxPending} must be a non-negative integer`);
  const area = Math.floor(areaBytes / META_BLOCK) * META_BLOCK;
  const journalBlocks = journalBytes / META_BLOCK;

  const need = (d: number): number => {
    const p = opts.maxPending ?? d;
    const ckpt = checkpointBlocksFor(2 * d + p);
    const copy = META_BLOCK * (1 + 2 * ckpt + journalBlocks);
    return 2 * copy + Math.ceil((d * blockSize) / META_BLOCK) * META_BLOCK;
  };
  if (need(1) > area) {
    const ckpt = checkpointBlocksFor(2 + (opts.maxPending ?? 1));
    throw new RemapError(
      ERRNO.ENOSPC,
      `spare area of ${areaBytes} bytes at offset ${areaOffset} is too small: 2 metadata copies of ` +
        `${META_BLOCK * (1 + 2 * ckpt + journalBlocks)} bytes each (superblock ${META_BLOCK}, 2 checkpoint slots of ` +
        `${ckpt * META_BLOCK}, journal ${journalBytes}) plus one ${blockSize}-byte data block need at least ${need(1)} bytes`,
      { op: 'metadata-layout' },
    );
  }
  let lo = 1;
  let hi = Math.floor(area / blockSize);
  while (lo < hi) {
    const mid = lo + Math.ceil((hi - lo) / 2);
    if (need(mid) <= area) lo = mid;
    else hi = mid - 1;
  }
  const dataBlocks = lo;
  const maxPending = opts.maxPending ?? dataBlocks;
  const layout = layoutFromParams({
    areaOffset,
    areaBytes: area,
    blockSize,
    journalBlocks,
    checkpointBlocks: checkpointBlocksFor(2 * dataBlocks + maxPending),
    maxPending,
    dataBlocks,
  });
  const why = checkLayout(layout);
  if (why) throw new RemapError(ERRNO.EINVAL, `internal layout error: ${why}`);
  return layout;
}
