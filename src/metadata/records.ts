import { ERRNO, RemapError } from '../errors.js';

/** Record type codes (u8 on disk). */
export const RecordType = {
  /** logical -> spare mapping, with CRC32C of the block's data; replaces any previous mapping and clears pending. */
  REMAP: 1,
  /** logical block is pending (read failed; next full write remaps it). */
  PENDING_ADD: 2,
  /** logical block is no longer pending. */
  PENDING_CLEAR: 3,
  /** spare block is bad, never hand it out. */
  SPARE_BAD: 4,
  /** spare block may receive a late write, never hand it out. */
  QUARANTINE: 5,
  /** logical block is no longer remapped. */
  UNMAP: 6,
  /**
   * Spare pool: extra spare number `logical` (1, 2, ...) joined the device,
   * with `spare` data blocks and the label whose CRC32C is `dataCrc`. Its
   * blocks take the global spare indices after those of the spares before it.
   */
  SPARE_ADD: 7,
} as const;

export type RecordTypeName = keyof typeof RecordType;
export type RecordTypeCode = (typeof RecordType)[RecordTypeName];

export interface MetaRecord {
  type: RecordTypeCode;
  /** Logical block number (REMAP, PENDING_ADD, PENDING_CLEAR, UNMAP); extra spare ordinal (SPARE_ADD); else 0. */
  logical: number;
  /** Spare block index (REMAP, SPARE_BAD, QUARANTINE); block count (SPARE_ADD); else 0. */
  spare: number;
  /** CRC32C of the block's data (REMAP), of the spare label (SPARE_ADD), else 0. */
  dataCrc: number;
}

/** Encoded size of one record. */
export const RECORD_BYTES = 24;

const TWO32 = 0x1_0000_0000;
const MAX_HI = 0x1f_ffff; // hi word of Number.MAX_SAFE_INTEGER

const TYPE_NAMES = new Map<number, RecordTypeName>(
  Object.entries(RecordType).map(([k, v]) => [v, k as RecordTypeName]),
);

export function recordTypeName(code: number): string {
  return TYPE_NAMES.get(code) ?? `UNKNOWN(${code})`;
}

export function isRecordTypeCode(code: number): code is RecordTypeCode {
  return TYPE_NAMES.has(code);
}

export function setU64(view: DataView, off: number, n: number): void {
  view.setUint32(off, n >>> 0, true);
  view.setUint32(off + 4, Math.floor(n / TWO32) >>> 0, true);
}

/** Reads a u64; returns -1 when it does not fit a JS safe integer. */
export function getU64(view: DataView, off: number): number {
  const lo = view.getUint32(off, true);
  const hi = view.getUint32(off + 4, true);
  if (hi > MAX_HI) return -1;
  return hi * TWO32 + lo;
}

function isU64(n: number): boolean {
  return Number.isSafeInteger(n) && n >= 0;
}

/** Throws RemapError EINVAL when `r` cannot be encoded. */
export function validateRecord(r: MetaRecord): void {
  if (!isRecordTypeCode(r.type)) throw new RemapError(ERRNO.EINVAL, `metadata record has unknown type ${String(r.type)}`);
  if (!isU64(r.logical) || !isU64(r.spare))
    throw new RemapError(ERRNO.EINVAL, `metadata record ${recordTypeName(r.type)} has a non-integer or negative block number (logical ${r.logical}, spare ${r.spare})`);
  if (!Number.isInteger(r.dataCrc) || r.dataCrc < 0 || r.dataCrc > 0xffff_ffff)
    throw new RemapError(ERRNO.EINVAL, `metadata record dataCrc ${r.dataCrc} is not a u32`);
}

/**
 * Layout (24 bytes, little-endian):
 *   0 u8  type   1 u8 flags (0)   2 u16 reserved (0)
 *   4 u32 dataCrc   8 u64 logical   16 u64 spare
 */
export function encodeRecord(view: DataView, off: number, r: MetaRecord): void {
  view.setUint8(off, r.type);
  view.setUint8(off + 1, 0);
  view.setUint16(off + 2, 0, true);
  view.setUint32(off + 4, r.dataCrc >>> 0, true);
  setU64(view, off + 8, r.logical);
  setU64(view, off + 16, r.spare);
}

/** Decodes one record; returns a string reason when it is not a valid record. */
export function decodeRecord(view: DataView, off: number): MetaRecord | string {
  const type = view.getUint8(off);
  if (!isRecordTypeCode(type)) return `unknown record type ${type}`;
  if (view.getUint8(off + 1) !== 0 || view.getUint16(off + 2, true) !== 0) return 'non-zero record flags/reserved';
  const logical = getU64(view, off + 8);
  const spare = getU64(view, off + 16);
  if (logical < 0 || spare < 0) return 'record block number beyond 2^53';
  return { type, logical, spare, dataCrc: view.getUint32(off + 4, true) };
}
