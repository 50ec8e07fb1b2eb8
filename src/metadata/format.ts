/**
 * On-disk codecs: superblock, journal blocks, checkpoint blocks.
 * Byte-by-byte description: docs/FORMAT.md.
 */
import { ERRNO, RemapError } from '../errors.js';
import { crc32c } from './crc32c.js';
import { META_BLOCK } from './io.js';
import { BLOCK_HEADER_BYTES, RECORDS_PER_BLOCK, checkLayout, layoutFromParams, type Layout } from './layout.js';
import { RECORD_BYTES, decodeRecord, encodeRecord, getU64, setU64, type MetaRecord } from './records.js';

export const FORMAT_VERSION = 1;
/** Superblock magic, 8 ASCII bytes. */
export const SB_MAGIC = new TextEncoder().encode('dmremapd');
/** Journal block magic, 4 ASCII bytes. */
export const JOURNAL_MAGIC = new TextEncoder().encode('DRJB');
/** Checkpoint block magic, 4 ASCII bytes. */
export const CHECKPOINT_MAGIC = new TextEncoder().encode('DRCK');

export const STABLE_ID_MAX = 256;
export const NAME_MAX = 128;
const SB_CRC_OFF = META_BLOCK - 4;

export interface MainIdentity {
  kind: 'file' | 'block';
  sizeBytes: number;
  dev: number;
  ino: number;
  /** /dev/disk/by-id name, or '' */
  stableId: string;
}

export interface Identity {
  deviceUuid: string;
  blockSize: number;
  main: MainIdentity;
  createdAtMs: number;
  name?: string;
}

export interface Superblock {
  version: number;
  copyIndex: 0 | 1;
  identity: Identity;
  layout: Layout;
}

const enc = new TextEncoder();
const dec = new TextDecoder('utf-8', { fatal: true });

function hasBytes(buf: Uint8Array, off: number, magic: Uint8Array): boolean {
  for (let i = 0; i < magic.length; i++) if (buf[off + i] !== magic[i]) return false;
  return true;
}

export function uuidToBytes(uuid: string): Uint8Array {
  const hex = uuid.replace(/-/g, '');
  if (!/^[0-9a-fA-F]{32}$/.test(hex)) throw new RemapError(ERRNO.EINVAL, `device UUID "${uuid}" is not a UUID`);
  const out = new Uint8Array(16);
  for (let i = 0; i < 16; i++) out[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
  return out;
}

export function bytesToUuid(b: Uint8Array): string {
  const h = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20, 32)}`;
}

/** The 8-byte format id stamped in every journal/checkpoint block: the first 8 bytes of the device UUID. */
export function formatIdOf(uuid: string): Uint8Array {
  return uuidToBytes(uuid).subarray(0, 8);
}

function checkU64(n: number, what: string): void {
  if (!Number.isSafeInteger(n) || n < 0) throw new RemapError(ERRNO.EINVAL, `${what} ${n} is not a non-negative integer`);
}

// ---------------------------------------------------------------- superblock

export function encodeSuperblock(sb: Superblock): Uint8Array {
  const { identity: id, layout: l } = sb;
  const buf = new Uint8Array(META_BLOCK);
  const v = new DataView(buf.buffer);
  const stable = enc.encode(id.main.stableId);
  const name = enc.encode(id.name ?? '');
  if (stable.length > STABLE_ID_MAX) throw new RemapError(ERRNO.EINVAL, `main stable id longer than ${STABLE_ID_MAX} bytes`);
  if (name.length > NAME_MAX) throw new RemapError(ERRNO.EINVAL, `device name longer than ${NAME_MAX} bytes`);
  for (const [n, w] of [
    [id.main.sizeBytes, 'main size'],
    [id.main.dev, 'main dev'],
    [id.main.ino, 'main inode'],
    [id.createdAtMs, 'createdAtMs'],
  ] as const)
    checkU64(n, w);
  buf.set(SB_MAGIC, 0);
  v.setUint32(8, sb.version, true);
  v.setUint32(12, sb.copyIndex, true);
  buf.set(uuidToBytes(id.deviceUuid), 16);
  v.setUint32(32, l.blockSize, true);
  v.setUint32(36, META_BLOCK, true);
  setU64(v, 40, l.areaOffset);
  setU64(v, 48, l.areaBytes);
  setU64(v, 56, l.journalBlocks);
  setU64(v, 64, l.checkpointBlocks);
  setU64(v, 72, l.maxPending);
  setU64(v, 80, l.dataOffset);
  setU64(v, 88, l.dataBlocks);
  setU64(v, 96, id.createdAtMs);
  v.setUint32(104, id.main.kind === 'file' ? 1 : 2, true);
  v.setUint32(108, 0, true);
  setU64(v, 112, id.main.sizeBytes);
  setU64(v, 120, id.main.dev);
  setU64(v, 128, id.main.ino);
  v.setUint16(136, stable.length, true);
  v.setUint16(138, name.length, true);
  v.setUint32(140, 0, true);
  buf.set(stable, 144);
  buf.set(name, 144 + STABLE_ID_MAX);
  v.setUint32(SB_CRC_OFF, crc32c(buf.subarray(0, SB_CRC_OFF)), true);
  return buf;
}

export type SuperblockResult =
  | { status: 'valid'; sb: Superblock }
  | { status: 'absent'; reason: string }
  | { status: 'corrupt'; reason: string };

function allZero(b: Uint8Array, from = 0, to = b.length): boolean {
  for (let i = from; i < to; i++) if (b[i] !== 0) return false;
  return true;
}

/** Decodes a superblock. `absent` means no magic; `corrupt` means magic present but invalid. */
export function decodeSuperblock(buf: Uint8Array): SuperblockResult {
  if (buf.length < META_BLOCK) return { status: 'absent', reason: 'short read' };
  if (!hasBytes(buf, 0, SB_MAGIC)) return { status: 'absent', reason: allZero(buf, 0, META_BLOCK) ? 'zeroed' : 'no superblock magic' };
  const v = new DataView(buf.buffer, buf.byteOffset, META_BLOCK);
  const stored = v.getUint32(SB_CRC_OFF, true);
  const crc = crc32c(buf.subarray(0, SB_CRC_OFF));
  if (stored !== crc) return { status: 'corrupt', reason: `superblock CRC mismatch (stored 0x${stored.toString(16)}, computed 0x${crc.toString(16)})` };
  const version = v.getUint32(8, true);
  if (version !== FORMAT_VERSION) return { status: 'corrupt', reason: `unsupported format version ${version} (this build reads ${FORMAT_VERSION})` };
  const copyIndex = v.getUint32(12, true);
  if (copyIndex !== 0 && copyIndex !== 1) return { status: 'corrupt', reason: `bad copy index ${copyIndex}` };
  if (v.getUint32(36, true) !== META_BLOCK) return { status: 'corrupt', reason: `metadata block size ${v.getUint32(36, true)} is not ${META_BLOCK}` };
  const kindCode = v.getUint32(104, true);
  if (kindCode !== 1 && kindCode !== 2) return { status: 'corrupt', reason: `bad main kind ${kindCode}` };
  const u64s = [40, 48, 56, 64, 72, 80, 88, 96, 112, 120, 128].map((o) => getU64(v, o));
  if (u64s.some((n) => n < 0)) return { status: 'corrupt', reason: 'superblock field beyond 2^53' };
  const [areaOffset, areaBytes, journalBlocks, checkpointBlocks, maxPending, dataOffset, dataBlocks, createdAtMs, sizeBytes, dev, ino] = u64s;
  const stableLen = v.getUint16(136, true);
  const nameLen = v.getUint16(138, true);
  if (stableLen > STABLE_ID_MAX || nameLen > NAME_MAX) return { status: 'corrupt', reason: 'string length out of range' };
  if (v.getUint32(108, true) !== 0 || v.getUint32(140, true) !== 0 || !allZero(buf, 144 + STABLE_ID_MAX + NAME_MAX, SB_CRC_OFF))
    return { status: 'corrupt', reason: 'reserved superblock bytes are not zero' };
  let stableId: string;
  let name: string;
  try {
    stableId = dec.decode(buf.subarray(144, 144 + stableLen));
    name = dec.decode(buf.subarray(144 + STABLE_ID_MAX, 144 + STABLE_ID_MAX + nameLen));
  } catch {
    return { status: 'corrupt', reason: 'identity strings are not UTF-8' };
  }
  const layout = layoutFromParams({
    areaOffset,
    areaBytes,
    blockSize: v.getUint32(32, true),
    journalBlocks,
    checkpointBlocks,
    maxPending,
    dataBlocks,
  });
  const why = checkLayout(layout) ?? (layout.dataOffset !== dataOffset ? `data offset ${dataOffset} disagrees with the layout (${layout.dataOffset})` : undefined);
  if (why) return { status: 'corrupt', reason: `inconsistent layout: ${why}` };
  const identity: Identity = {
    deviceUuid: bytesToUuid(buf.subarray(16, 32)),
    blockSize: layout.blockSize,
    main: { kind: kindCode === 1 ? 'file' : 'block', sizeBytes, dev, ino, stableId },
    createdAtMs,
  };
  if (nameLen > 0) identity.name = name;
  return { status: 'valid', sb: { version, copyIndex, identity, layout } };
}

// ------------------------------------------------ format-in-progress marker

/** Format-in-progress marker magic, 8 ASCII bytes (docs/FORMAT.md section 2a). */
export const MARKER_MAGIC = enc.encode('DRFMTINP');
export const MARKER_VERSION = 1;
/** Marker flag: the area held dm-remapd metadata when this (forced) format started. */
export const MARKER_REPLACING = 1;

/**
 * What `formatSpare` writes into both superblock slots before anything
 * else, so that an interrupted format is told apart from a wiped or
 * corrupt area. The real superblocks overwrite it last.
 */
export interface FormatMarker {
  copyIndex: 0 | 1;
  /** Device UUID of the format in progress (its format id stamps the structures it writes). */
  deviceUuid: string;
  startedAtMs: number;
  /** Format version being written. */
  formatVersion: number;
  /** The area held dm-remapd metadata when the format started (it was forced over it). */
  replacing: boolean;
  areaOffset: number;
  /** Rounded to 4 KiB, as in the superblock. */
  areaBytes: number;
}

export function encodeFormatMarker(m: FormatMarker): Uint8Array {
  for (const [n, w] of [
    [m.startedAtMs, 'startedAtMs'],
    [m.areaOffset, 'areaOffset'],
    [m.areaBytes, 'areaBytes'],
  ] as const)
    checkU64(n, w);
  const buf = new Uint8Array(META_BLOCK);
  const v = new DataView(buf.buffer);
  buf.set(MARKER_MAGIC, 0);
  v.setUint32(8, MARKER_VERSION, true);
  v.setUint32(12, m.copyIndex, true);
  buf.set(uuidToBytes(m.deviceUuid), 16);
  setU64(v, 32, m.startedAtMs);
  v.setUint32(40, m.formatVersion, true);
  v.setUint32(44, m.replacing ? MARKER_REPLACING : 0, true);
  setU64(v, 48, m.areaOffset);
  setU64(v, 56, m.areaBytes);
  v.setUint32(SB_CRC_OFF, crc32c(buf.subarray(0, SB_CRC_OFF)), true);
  return buf;
}

export type FormatMarkerResult = { status: 'valid'; marker: FormatMarker } | { status: 'absent' } | { status: 'corrupt'; reason: string };

/** Decodes a format-in-progress marker. `absent`: no marker magic; `corrupt`: magic present but invalid. */
export function decodeFormatMarker(buf: Uint8Array): FormatMarkerResult {
  if (buf.length < META_BLOCK || !hasBytes(buf, 0, MARKER_MAGIC)) return { status: 'absent' };
  const v = new DataView(buf.buffer, buf.byteOffset, META_BLOCK);
  const stored = v.getUint32(SB_CRC_OFF, true);
  const crc = crc32c(buf.subarray(0, SB_CRC_OFF));
  if (stored !== crc) return { status: 'corrupt', reason: `format-in-progress marker CRC mismatch (stored 0x${stored.toString(16)}, computed 0x${crc.toString(16)})` };
  const version = v.getUint32(8, true);
  if (version !== MARKER_VERSION) return { status: 'corrupt', reason: `unsupported format-in-progress marker version ${version}` };
  const copyIndex = v.getUint32(12, true);
  if (copyIndex !== 0 && copyIndex !== 1) return { status: 'corrupt', reason: `format-in-progress marker has a bad copy index ${copyIndex}` };
  const flags = v.getUint32(44, true);
  if ((flags & ~MARKER_REPLACING) !== 0 || !allZero(buf, 64, SB_CRC_OFF)) return { status: 'corrupt', reason: 'format-in-progress marker has reserved bits or bytes set' };
  const startedAtMs = getU64(v, 32);
  const areaOffset = getU64(v, 48);
  const areaBytes = getU64(v, 56);
  if (startedAtMs < 0 || areaOffset < 0 || areaBytes < 0) return { status: 'corrupt', reason: 'format-in-progress marker field beyond 2^53' };
  if (areaOffset % META_BLOCK !== 0 || areaBytes % META_BLOCK !== 0 || areaBytes < 2 * META_BLOCK)
    return { status: 'corrupt', reason: `format-in-progress marker describes an impossible area ${areaOffset}+${areaBytes}` };
  return {
    status: 'valid',
    marker: {
      copyIndex: copyIndex as 0 | 1,
      deviceUuid: bytesToUuid(buf.subarray(16, 32)),
      startedAtMs,
      formatVersion: v.getUint32(40, true),
      replacing: (flags & MARKER_REPLACING) !== 0,
      areaOffset,
      areaBytes,
    },
  };
}

/** Where the marker of copy `m.copyIndex` of its area belongs. */
export function markerOffset(m: FormatMarker): number {
  return m.copyIndex === 0 ? m.areaOffset : m.areaOffset + m.areaBytes - META_BLOCK;
}

// -------------------------------------------------- journal/checkpoint blocks

export interface BlockHeader {
  seq: number;
  blockIndex: number;
  blockCount: number;
  totalRecords: number;
  recordsInBlock: number;
}

export interface DecodedBlock extends BlockHeader {
  records: MetaRecord[];
}

export type BlockResult = { ok: true; block: DecodedBlock } | { ok: false; empty: boolean; foreign: boolean; reason: string };

const CRC_OFF = 40;

function blockCrc(b: Uint8Array): number {
  return crc32c(b.subarray(CRC_OFF + 4, META_BLOCK), crc32c(b.subarray(0, CRC_OFF)));
}

/** Number of 4 KiB blocks needed for `n` records (at least 1). */
export function blocksForRecords(n: number): number {
  return Math.max(1, Math.ceil(n / RECORDS_PER_BLOCK));
}

/**
 * Encodes `records` as consecutive blocks (journal commit or checkpoint)
 * with the given magic, format id and seq. Returns n * 4096 bytes.
 */
export function encodeBlocks(magic: Uint8Array, formatId: Uint8Array, seq: number, records: readonly MetaRecord[]): Uint8Array {
  checkU64(seq, 'sequence number');
  const count = blocksForRecords(records.length);
  const out = new Uint8Array(count * META_BLOCK);
  const v = new DataView(out.buffer);
  for (let i = 0; i < records.length; i++) encodeRecord(v, recordOffsetInBlocks(i), records[i]);
  sealBlocks(out, 0, magic, formatId, seq, records.length, 0, count);
  return out;
}

/** Byte offset of record `i` in an encoding of consecutive blocks (it does not depend on the record count). */
export function recordOffsetInBlocks(i: number): number {
  const b = Math.floor(i / RECORDS_PER_BLOCK);
  return b * META_BLOCK + BLOCK_HEADER_BYTES + (i - b * RECORDS_PER_BLOCK) * RECORD_BYTES;
}

/**
 * Completes blocks [firstBlock, firstBlock + nBlocks) of an encoding of
 * `totalRecords` records, held in `out` from byte `outOffset` on: writes
 * each block's header and CRC. The records must already be in place (at
 * recordOffsetInBlocks(i) - firstBlock * 4096 + outOffset) and every other
 * byte zero. Lets a large encoding be built, and written, piecewise; the
 * bytes are those encodeBlocks() produces.
 */
export function sealBlocks(
  out: Uint8Array,
  outOffset: number,
  magic: Uint8Array,
  formatId: Uint8Array,
  seq: number,
  totalRecords: number,
  firstBlock: number,
  nBlocks: number,
): void {
  checkU64(seq, 'sequence number');
  checkU64(totalRecords, 'record count');
  const count = blocksForRecords(totalRecords);
  if (!Number.isInteger(firstBlock) || !Number.isInteger(nBlocks) || firstBlock < 0 || nBlocks < 0 || firstBlock + nBlocks > count)
    throw new RangeError(`blocks ${firstBlock}..${firstBlock + nBlocks} outside the ${count} blocks of ${totalRecords} records`);
  if (!Number.isInteger(outOffset) || outOffset < 0 || outOffset + nBlocks * META_BLOCK > out.length) throw new RangeError('output buffer too small');
  const v = new DataView(out.buffer, out.byteOffset, out.byteLength);
  for (let k = 0; k < nBlocks; k++) {
    const b = firstBlock + k;
    const base = outOffset + k * META_BLOCK;
    const inBlock = Math.min(RECORDS_PER_BLOCK, totalRecords - b * RECORDS_PER_BLOCK);
    out.set(magic, base);
    v.setUint16(base + 4, FORMAT_VERSION, true);
    v.setUint16(base + 6, Math.max(0, inBlock), true);
    out.set(formatId, base + 8);
    setU64(v, base + 16, seq);
    v.setUint32(base + 24, b, true);
    v.setUint32(base + 28, count, true);
    setU64(v, base + 32, totalRecords);
    v.setUint32(base + CRC_OFF, blockCrc(out.subarray(base, base + META_BLOCK)), true);
  }
}

/** Decodes one 4 KiB journal or checkpoint block (`buf` starts at the block). */
export function decodeBlock(buf: Uint8Array, magic: Uint8Array, formatId: Uint8Array): BlockResult {
  const b = buf.subarray(0, META_BLOCK);
  if (!hasBytes(b, 0, magic)) {
    const empty = allZero(b);
    return { ok: false, empty, foreign: false, reason: empty ? 'empty' : 'bad magic' };
  }
  const v = new DataView(b.buffer, b.byteOffset, META_BLOCK);
  const stored = v.getUint32(CRC_OFF, true);
  const crc = blockCrc(b);
  if (stored !== crc) return { ok: false, empty: false, foreign: false, reason: `CRC mismatch (stored 0x${stored.toString(16)}, computed 0x${crc.toString(16)})` };
  if (!hasBytes(b, 8, formatId)) return { ok: false, empty: false, foreign: true, reason: 'block from another format (format id differs)' };
  const version = v.getUint16(4, true);
  if (version !== FORMAT_VERSION) return { ok: false, empty: false, foreign: false, reason: `unsupported block version ${version}` };
  const recordsInBlock = v.getUint16(6, true);
  const seq = getU64(v, 16);
  const blockIndex = v.getUint32(24, true);
  const blockCount = v.getUint32(28, true);
  const totalRecords = getU64(v, 32);
  if (seq < 0 || totalRecords < 0) return { ok: false, empty: false, foreign: false, reason: 'header field beyond 2^53' };
  if (recordsInBlock > RECORDS_PER_BLOCK || blockCount < 1 || blockIndex >= blockCount || blocksForRecords(totalRecords) !== blockCount)
    return { ok: false, empty: false, foreign: false, reason: 'inconsistent block header' };
  const expectIn = Math.min(RECORDS_PER_BLOCK, totalRecords - blockIndex * RECORDS_PER_BLOCK);
  if (recordsInBlock !== expectIn) return { ok: false, empty: false, foreign: false, reason: 'record count disagrees with the header' };
  if (!allZero(b, 44, BLOCK_HEADER_BYTES) || !allZero(b, BLOCK_HEADER_BYTES + recordsInBlock * RECORD_BYTES))
    return { ok: false, empty: false, foreign: false, reason: 'reserved bytes are not zero' };
  const records: MetaRecord[] = new Array<MetaRecord>(recordsInBlock);
  for (let i = 0; i < recordsInBlock; i++) {
    const r = decodeRecord(v, BLOCK_HEADER_BYTES + i * RECORD_BYTES);
    if (typeof r === 'string') return { ok: false, empty: false, foreign: false, reason: `record ${i}: ${r}` };
    records[i] = r;
  }
  return { ok: true, block: { seq, blockIndex, blockCount, totalRecords, recordsInBlock, records } };
}
