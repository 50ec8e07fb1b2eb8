/**
 * Spare pool (issue 6): more than one spare per device.
 *
 * Spare 0 is the primary spare, the one holding the metadata (a spare file
 * or a tail region of main). Each extra spare k >= 1 is a whole file or
 * device that starts with a 4 KiB label (docs/FORMAT.md, section 10), its
 * data blocks following the label.
 *
 * Global spare indices concatenate the spares in order: the primary's
 * blocks first, then each extra spare's, in the order they were added.
 * Spares are never removed, so an index, once recorded in the metadata,
 * always names the same block. `locateSpare` and `splitSpareRun` are the
 * pure mapper; `SparePool` holds the devices and one allocator per spare.
 */
import { readFileSync, realpathSync, statSync } from 'node:fs';
import { basename } from 'node:path';
import { ERRNO, RemapError, errnoName } from '../errors.js';
import { BackingOp, allocAligned, type BackingDevice, type BackingOpCode } from '../native/backing.js';
import type { NativeBackingInfo } from '../native/binding.js';
import { SpareAllocator } from '../remap/spare-allocator.js';
import type { RemapTable } from '../remap/remap-table.js';
import type { BlockSet } from '../remap/block-set.js';
import { crc32c } from '../metadata/crc32c.js';
import { bytesToUuid, uuidToBytes, SB_MAGIC } from '../metadata/format.js';
import { getU64, setU64 } from '../metadata/records.js';
import { stackOverlap } from './stack-overlap.js';

// ------------------------------------------------------------- the mapper

/**
 * The spare holding global index `index`, given `bases` (the first global
 * index of each spare, ascending, bases[0] = 0) and the `total` block
 * count: `{ spare, local }` with local = index - bases[spare]. RangeError
 * outside 0..total-1. Binary search: O(log spares).
 */
export function locateSpare(bases: readonly number[], total: number, index: number): { spare: number; local: number } {
  if (!(Number.isSafeInteger(index) && index >= 0 && index < total)) {
    throw new RangeError(`spare block index ${String(index)} is out of range: the spares have ${total} blocks (0..${total - 1})`);
  }
  let lo = 0;
  let hi = bases.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >>> 1;
    if (bases[mid] <= index) lo = mid;
    else hi = mid - 1;
  }
  return { spare: lo, local: index - bases[lo] };
}

/** One piece of a run of global spare indices that lies on one spare. */
export interface SpareRunPiece {
  spare: number;
  /** First block on that spare. */
  local: number;
  blocks: number;
  /** Blocks of the run before this piece (its offset in the run). */
  skip: number;
}

/**
 * Splits the run of `count` global indices starting at `first` into pieces
 * that never cross from one spare to the next, in order. The planner merges
 * consecutive spare indices into one extent without knowing where a spare
 * ends; the engine's spare I/O splits them here. RangeError when the run
 * leaves 0..total-1.
 */
export function splitSpareRun(bases: readonly number[], total: number, first: number, count: number): SpareRunPiece[] {
  if (!(Number.isSafeInteger(count) && count >= 1)) throw new RangeError(`spare run length ${String(count)} is not a positive integer`);
  locateSpare(bases, total, first + count - 1); // range check of the last block
  const out: SpareRunPiece[] = [];
  let at = first;
  const end = first + count;
  while (at < end) {
    const { spare, local } = locateSpare(bases, total, at);
    const spareEnd = spare + 1 < bases.length ? bases[spare + 1] : total;
    const n = Math.min(end, spareEnd) - at;
    out.push({ spare, local, blocks: n, skip: at - first });
    at += n;
  }
  return out;
}

// ------------------------------------------------------- metadata room

/**
 * How many extra spare blocks in all the metadata can describe with
 * `extras` extra spares. A checkpoint must always fit its slot (docs/FORMAT.md
 * section 6): in the worst case every spare block costs two records (a
 * remap and a SPARE_BAD, as a lost block has), pending blocks up to the
 * primary's `dataBlocks`, and one SPARE_ADD per extra spare, so
 * 2 * (dataBlocks + E) + dataBlocks + extras <= checkpointCapacity. A
 * primary formatted without a pool reserve has little room (rounding
 * only); `poolReserveBytes` at format makes room.
 */
export function poolRoom(checkpointCapacity: number, dataBlocks: number, extras: number): number {
  return Math.max(0, Math.floor((checkpointCapacity - 3 * dataBlocks - extras) / 2));
}

// -------------------------------------------------------------- the label

/** Label magic, 8 ASCII bytes. */
export const LABEL_MAGIC = new TextEncoder().encode('dmrspare');
export const LABEL_VERSION = 1;
/** The label block; an extra spare's data block 0 starts right after it. */
export const LABEL_BYTES = 4096;

export interface SpareLabel {
  /** The device UUID of the primary spare's superblock. */
  deviceUuid: string;
  /** 1, 2, ... */
  ordinal: number;
  blockSize: number;
  /** Byte offset of data block 0 (= LABEL_BYTES). */
  dataOffset: number;
  dataBlocks: number;
  createdAtMs: number;
}

function u64ok(n: number): boolean {
  return Number.isSafeInteger(n) && n >= 0;
}

/**
 * Layout (4096 bytes, little-endian): 0 magic "dmrspare"; 8 u32 version 1;
 * 12 u32 ordinal; 16 16-byte device UUID; 32 u32 blockSize; 36 u32 reserved
 * 0; 40 u64 dataOffset; 48 u64 dataBlocks; 56 u64 createdAtMs; 64..4091
 * reserved 0; 4092 u32 CRC32C of bytes 0..4091.
 */
export function encodeLabel(l: SpareLabel): Uint8Array {
  if (!(Number.isInteger(l.ordinal) && l.ordinal >= 1 && l.ordinal <= 0xffff_ffff)) throw new RangeError(`spare ordinal ${l.ordinal} must be 1..2^32-1`);
  if (l.blockSize !== 512 && l.blockSize !== 4096) throw new RangeError(`spare block size ${l.blockSize} must be 512 or 4096`);
  if (!u64ok(l.dataOffset) || !u64ok(l.dataBlocks) || !u64ok(l.createdAtMs)) throw new RangeError('spare label field is not a u64');
  const buf = new Uint8Array(LABEL_BYTES);
  const v = new DataView(buf.buffer);
  buf.set(LABEL_MAGIC, 0);
  v.setUint32(8, LABEL_VERSION, true);
  v.setUint32(12, l.ordinal, true);
  buf.set(uuidToBytes(l.deviceUuid), 16);
  v.setUint32(32, l.blockSize, true);
  setU64(v, 40, l.dataOffset);
  setU64(v, 48, l.dataBlocks);
  setU64(v, 56, l.createdAtMs);
  v.setUint32(LABEL_BYTES - 4, crc32c(buf.subarray(0, LABEL_BYTES - 4)), true);
  return buf;
}

export type LabelResult =
  | { ok: true; label: SpareLabel; crc: number }
  /** `magic`: the label magic is there (a damaged label), or dm-remapd metadata is (`metadata`). */
  | { ok: false; magic: boolean; metadata: boolean; reason: string };

function hasMagic(b: Uint8Array, off: number, magic: Uint8Array): boolean {
  for (let i = 0; i < magic.length; i++) if (b[off + i] !== magic[i]) return false;
  return true;
}

/** Decodes a label block; never throws. */
export function decodeLabel(b: Uint8Array): LabelResult {
  if (b.byteLength < LABEL_BYTES) return { ok: false, magic: false, metadata: false, reason: `label block is ${b.byteLength} bytes, not ${LABEL_BYTES}` };
  if (!hasMagic(b, 0, LABEL_MAGIC)) {
    const metadata = hasMagic(b, 0, SB_MAGIC);
    return { ok: false, magic: false, metadata, reason: metadata ? 'it holds dm-remapd metadata (a primary spare)' : 'no spare label' };
  }
  const v = new DataView(b.buffer, b.byteOffset, LABEL_BYTES);
  const stored = v.getUint32(LABEL_BYTES - 4, true);
  const crc = crc32c(b.subarray(0, LABEL_BYTES - 4));
  const bad = (reason: string): LabelResult => ({ ok: false, magic: true, metadata: false, reason });
  if (stored !== crc) return bad(`label CRC mismatch (stored 0x${stored.toString(16)}, computed 0x${crc.toString(16)})`);
  const version = v.getUint32(8, true);
  if (version !== LABEL_VERSION) return bad(`unsupported label version ${version}`);
  const ordinal = v.getUint32(12, true);
  const blockSize = v.getUint32(32, true);
  const dataOffset = getU64(v, 40);
  const dataBlocks = getU64(v, 48);
  const createdAtMs = getU64(v, 56);
  if (ordinal < 1) return bad('label ordinal 0');
  if (blockSize !== 512 && blockSize !== 4096) return bad(`label block size ${blockSize}`);
  if (v.getUint32(36, true) !== 0) return bad('reserved label bytes are not zero');
  for (let i = 64; i < LABEL_BYTES - 4; i++) if (b[i] !== 0) return bad('reserved label bytes are not zero');
  if (dataOffset < 0 || dataBlocks < 0 || createdAtMs < 0) return bad('label field beyond 2^53');
  if (dataOffset % 4096 !== 0 || dataOffset < LABEL_BYTES) return bad(`label data offset ${dataOffset} is not 4 KiB aligned past the label`);
  return {
    ok: true, crc,
    label: { deviceUuid: bytesToUuid(b.subarray(16, 32)), ordinal, blockSize, dataOffset, dataBlocks, createdAtMs },
  };
}

/** Reads the label block of `dev`. */
export async function readLabel(dev: BackingDevice): Promise<LabelResult> {
  if (dev.info.sizeBytes < LABEL_BYTES) return { ok: false, magic: false, metadata: false, reason: `it is ${dev.info.sizeBytes} bytes, smaller than the ${LABEL_BYTES}-byte label` };
  const buf = allocAligned(LABEL_BYTES);
  const r = await dev.io(BackingOp.READ, buf, 0, LABEL_BYTES);
  if (r !== LABEL_BYTES) {
    const errno = r < 0 ? -r : ERRNO.EIO;
    throw new RemapError(errno, `reading the spare label of ${dev.info.path} failed (${errnoName(errno)})`, { op: 'spare-label' });
  }
  const res = decodeLabel(buf);
  if (res.ok || res.magic || res.metadata || dev.info.sizeBytes < 2 * LABEL_BYTES) return res;
  // A primary spare's copy-1 superblock sits in its last 4 KiB.
  const tail = allocAligned(LABEL_BYTES);
  const t = await dev.io(BackingOp.READ, tail, Math.floor(dev.info.sizeBytes / 4096) * 4096 - LABEL_BYTES, LABEL_BYTES);
  if (t === LABEL_BYTES && hasMagic(tail, 0, SB_MAGIC)) return { ok: false, magic: false, metadata: true, reason: 'it holds dm-remapd metadata (a primary spare)' };
  return res;
}

// ----------------------------------------------------- storage overlap

/**
 * Where a file or a loop device keeps its bytes: the file's dev/inode and
 * byte range (a loop device: its backing file, offset and size limit from
 * sysfs). Null when unknown (another kind of block device, a deleted backing
 * file).
 */
export function backingRange(info: NativeBackingInfo): { file: string; dev: number; ino: number; start: number; end: number } | null {
  if (!info.isBlockDevice) return { file: info.path, dev: info.dev, ino: info.ino, start: 0, end: info.sizeBytes };
  try {
    const sys = `/sys/class/block/${basename(realpathSync(info.path))}/loop`;
    const file = readFileSync(`${sys}/backing_file`, 'utf8').trim();
    const st = statSync(file);
    const start = Number(readFileSync(`${sys}/offset`, 'utf8').trim());
    return { file, dev: st.dev, ino: st.ino, start, end: start + info.sizeBytes };
  } catch {
    return null;
  }
}

/** Why `a` and `b` share storage (the same file or device, or overlapping bytes of one file), or null. */
export function storageClash(a: NativeBackingInfo, b: NativeBackingInfo): string | null {
  const same = a.isBlockDevice ? b.isBlockDevice && a.rdev === b.rdev : !b.isBlockDevice && a.dev === b.dev && a.ino === b.ino;
  if (same) return `${b.path} is ${a.path} itself`;
  const ra = backingRange(a);
  const rb = backingRange(b);
  if (ra !== null && rb !== null && ra.dev === rb.dev && ra.ino === rb.ino && ra.start < rb.end && rb.start < ra.end) {
    return `${b.path} overlaps ${a.path}: both are stored in ${ra.file} (bytes ${rb.start}..${rb.end} and ${ra.start}..${ra.end})`;
  }
  // Through partitions too (a partition of a loop device over a's image, a's disk, ...): stack-overlap.ts.
  const s = stackOverlap(a.path, b.path);
  if (s !== null) return `${b.path} overlaps ${a.path}: both are stored on ${s.layer} (bytes ${s.b[0]}..${s.b[1]} and ${s.a[0]}..${s.a[1]})`;
  return null;
}

// ---------------------------------------------------------------- the pool

export interface PoolSpareInput {
  /** 0 = primary; extra spares 1, 2, ... */
  ordinal: number;
  dev: BackingDevice;
  path: string;
  /** Byte offset of the spare's data block 0 on dev. */
  dataOffset: number;
  blocks: number;
  /** CRC32C of the label (extra spares; 0 for the primary). */
  labelCrc: number;
}

interface PoolSpare extends PoolSpareInput {
  base: number;
  alloc: SpareAllocator;
}

/** One spare as status shows it. */
export interface SpareInfo {
  ordinal: number;
  path: string;
  /** Data blocks. */
  blocks: number;
  used: number;
  /** First global spare index. */
  firstIndex: number;
}

/**
 * The spares of a device and their allocation. Looks like a SpareAllocator
 * over the global index space (total, used, free, allocate, release,
 * markUsed, isUsed), plus the I/O to a global index.
 *
 * Allocation: the spare with the most free blocks (the lowest ordinal on a
 * tie), next-fit inside it. A new, empty spare therefore takes the fresh
 * remaps until it has no more free blocks than the others, and from then
 * on the remaps alternate, so wear and the loss of one spare's data spread.
 */
export class SparePool {
  private readonly spares: PoolSpare[] = [];
  private bases: number[] = [];
  private totalBlocks = 0;

  constructor(private readonly blockSize: number, primary: PoolSpareInput) {
    this.add(primary);
  }

  /**
   * The pool implied by persisted state: every spare index the table maps
   * to, and every index of `unavailable` (bad, quarantined), is in use.
   * RangeError if one lies beyond the pool; RemapError EINVAL (corrupt
   * state) if two logical blocks map to the same spare block.
   */
  static derive(blockSize: number, spares: readonly PoolSpareInput[], table: RemapTable, ...unavailable: BlockSet[]): SparePool {
    const pool = new SparePool(blockSize, spares[0]);
    for (const s of spares.slice(1)) pool.add(s);
    table.forEach((logical, spare) => {
      if (!pool.markUsed(spare)) {
        throw new RemapError(ERRNO.EINVAL, `spare block ${spare} is mapped by more than one logical block (again by logical block ${logical})`, {
          block: spare, op: 'derive spare allocation',
        });
      }
    });
    for (const set of unavailable) set.forEach((block) => { pool.markUsed(block); });
    return pool;
  }

  /** Appends a spare; its blocks take the next global indices. */
  add(s: PoolSpareInput): SpareInfo {
    if (s.ordinal !== this.spares.length) throw new RangeError(`spare ordinal ${s.ordinal} added as spare number ${this.spares.length}`);
    const p: PoolSpare = { ...s, base: this.totalBlocks, alloc: new SpareAllocator(s.blocks) };
    this.spares.push(p);
    this.bases = this.spares.map((x) => x.base);
    this.totalBlocks += s.blocks;
    return this.infoOf(p);
  }

  get count(): number {
    return this.spares.length;
  }

  get total(): number {
    return this.totalBlocks;
  }

  get used(): number {
    let n = 0;
    for (const s of this.spares) n += s.alloc.used;
    return n;
  }

  get free(): number {
    return this.totalBlocks - this.used;
  }

  /** Extra spares (ordinal >= 1), in order. */
  extras(): ReadonlyArray<Readonly<PoolSpareInput>> {
    return this.spares.slice(1);
  }

  info(): SpareInfo[] {
    return this.spares.map((s) => this.infoOf(s));
  }

  private infoOf(s: PoolSpare): SpareInfo {
    return { ordinal: s.ordinal, path: s.path, blocks: s.blocks, used: s.alloc.used, firstIndex: s.base };
  }

  locate(index: number): { spare: number; local: number } {
    return locateSpare(this.bases, this.totalBlocks, index);
  }

  /** The device path of the spare holding `index`. */
  pathOf(index: number): string {
    return this.spares[this.locate(index).spare].path;
  }

  /** Byte offset of global spare block `index` on its device. */
  offsetOf(index: number): number {
    const { spare, local } = this.locate(index);
    const s = this.spares[spare];
    return s.dataOffset + local * this.blockSize;
  }

  isUsed(index: number): boolean {
    const { spare, local } = this.locate(index);
    return this.spares[spare].alloc.isUsed(local);
  }

  markUsed(index: number): boolean {
    const { spare, local } = this.locate(index);
    return this.spares[spare].alloc.markUsed(local);
  }

  release(index: number): boolean {
    const { spare, local } = this.locate(index);
    return this.spares[spare].alloc.release(local);
  }

  /** A free global index, marked in use; -1 when every spare is full. */
  allocate(): number {
    let best: PoolSpare | null = null;
    for (const s of this.spares) if (s.alloc.free > 0 && (best === null || s.alloc.free > best.alloc.free)) best = s;
    if (best === null) return -1;
    return best.base + best.alloc.allocate();
  }

  /**
   * I/O of `length` bytes at global spare block `index` (READ, WRITE,
   * DISCARD, WRITE_ZEROES). A run crossing from one spare to the next is
   * split; the result is `length` when every piece completed, else the
   * first negative result (or a short count).
   */
  async io(op: BackingOpCode, buf: Uint8Array | null, index: number, length: number, flags = 0): Promise<number> {
    if (this.spares.length === 1) {
      const s = this.spares[0];
      return s.dev.io(op, buf, s.dataOffset + index * this.blockSize, length, flags);
    }
    const bs = this.blockSize;
    const pieces = splitSpareRun(this.bases, this.totalBlocks, index, Math.max(1, Math.ceil(length / bs)));
    if (pieces.length === 1) {
      const s = this.spares[pieces[0].spare];
      return s.dev.io(op, buf, s.dataOffset + pieces[0].local * bs, length, flags);
    }
    const results = await Promise.all(pieces.map((p) => {
      const s = this.spares[p.spare];
      const len = Math.min(p.blocks * bs, length - p.skip * bs);
      const sub = buf === null ? null : buf.subarray(p.skip * bs, p.skip * bs + len);
      return s.dev.io(op, sub, s.dataOffset + p.local * bs, len, flags).then((r) => ({ r, len }));
    }));
    const neg = results.find((x) => x.r < 0);
    if (neg !== undefined) return neg.r;
    let done = 0;
    for (const x of results) {
      done += x.r;
      if (x.r !== x.len) return done === length ? -ERRNO.EIO : done;
    }
    return done;
  }

  /**
   * fdatasync of the spares holding the given global indices (all spares
   * when `indices` is undefined). `skip` is a device not to sync (main, when
   * the primary spare is a tail of it and main is synced separately).
   * 0, or the first negative result.
   */
  async sync(indices?: Iterable<number>, skip?: BackingDevice): Promise<number> {
    const devs = new Set<BackingDevice>();
    if (indices === undefined) for (const s of this.spares) devs.add(s.dev);
    else for (const i of indices) devs.add(this.spares[this.locate(i).spare].dev);
    if (skip !== undefined) devs.delete(skip);
    const rs = await Promise.all([...devs].map((d) => d.io(BackingOp.FDATASYNC, null, 0, 0)));
    return rs.find((r) => r < 0) ?? 0;
  }

  /** Spare numbers of the run of `count` indices at `first`. */
  rangeIndices(first: number, count: number): number[] {
    return splitSpareRun(this.bases, this.totalBlocks, first, count).map((p) => this.spares[p.spare].base + p.local);
  }
}
