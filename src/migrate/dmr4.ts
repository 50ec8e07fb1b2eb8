/**
 * Decoder of the metadata of the kernel dm-remap target ("DMR4"), for
 * `remapctl import-dmr4` (docs/DMR4.md). Pure: it works on bytes already read
 * from the old spare, and never does I/O itself.
 *
 * The old spare starts with a 640 KiB metadata area holding up to five copies
 * of one 84,288-byte record; the valid copy with the highest sequence number
 * (then the newest timestamp) is the table the kernel target would load.
 * Every stored entry maps one 512-byte sector of the main to one 512-byte
 * sector of the old spare, whatever its flags say.
 */

/** Layout constants of a DMR4 record (docs/DMR4.md, "Layout"). */
export const DMR4 = {
  MAGIC: 0x444d5234, // "DMR4" read as a little-endian u32
  VERSION: 4,
  RECORD_BYTES: 84_288,
  /** Byte offsets of the five copies on the old spare. */
  COPY_OFFSETS: [0, 128 * 1024, 256 * 1024, 384 * 1024, 512 * 1024] as readonly number[],
  /** The kernel target's own area at the start of the old spare. */
  META_AREA_BYTES: 640 * 1024,
  SECTOR_BYTES: 512,
  MAX_ENTRIES: 2048,
  ENTRY_BYTES: 40,
  OFF_MAGIC: 0,
  OFF_VERSION: 4,
  OFF_SEQ: 8,
  OFF_TIMESTAMP: 16,
  OFF_CRC: 24,
  OFF_ACTIVE: 296,
  OFF_TABLE: 312,
} as const;

/** Entry flags as the kernel target stores them (it loads every stored entry as a remap anyway). */
export const DMR4_FLAG = { PENDING: 1, ACTIVE: 2 } as const;

export type Dmr4ErrorCode = 'TRUNCATED' | 'NO_VALID_COPY';

/** The only error the decoder throws: a truncated image, or no usable copy. errno is for the wire. */
export class Dmr4Error extends Error {
  constructor(
    readonly code: Dmr4ErrorCode,
    message: string,
    /** EBADMSG (no valid copy: corrupt metadata) or ENODATA (truncated: no DMR4 metadata area). */
    readonly errno: number,
  ) {
    super(message);
    this.name = 'Dmr4Error';
  }
}

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let c = i;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0xedb88320 : c >>> 1;
    t[i] = c >>> 0;
  }
  return t;
})();

/**
 * Reflected CRC-32 (polynomial 0xEDB88320) with the given start value and no
 * final inversion: the Linux kernel's crc32_le(crc, p, len). Chain calls by
 * passing the previous result as `crc`.
 */
export function crc32le(bytes: Uint8Array, crc = 0, start = 0, end = bytes.length): number {
  let c = crc >>> 0;
  for (let i = start; i < end; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return c >>> 0;
}

/** The CRC a record must carry at byte 24: over bytes 0-23 and 28-84,287. */
export function dmr4RecordCrc(record: Uint8Array): number {
  return crc32le(record, crc32le(record, 0, 0, DMR4.OFF_CRC), DMR4.OFF_CRC + 4, DMR4.RECORD_BYTES);
}

export interface Dmr4Entry {
  /** Position in the stored table (0-based). */
  index: number;
  /** 512-byte sector of the main that was remapped. */
  originalSector: bigint;
  /** 512-byte sector of the old spare that holds its data. */
  spareSector: bigint;
  timestampNs: bigint;
  accessCount: number;
  errorCount: number;
  reason: number;
  flags: number;
}

export interface Dmr4Copy {
  /** 0..4 */
  index: number;
  /** Byte offset on the old spare. */
  offset: number;
  valid: boolean;
  /** Why the copy is not valid (null when it is). */
  problem: string | null;
  magic: number | null;
  version: number | null;
  seq: bigint | null;
  timestamp: bigint | null;
  storedCrc: number | null;
  computedCrc: number | null;
  activeRemaps: number | null;
  /** The stored entries (only for a valid copy). */
  entries: Dmr4Entry[];
}

function hex32(n: number): string {
  return `0x${n.toString(16).padStart(8, '0')}`;
}

/**
 * Decodes the copy at `offset` of an image whose first `have` bytes are in
 * `head`. Never throws: an unusable copy comes back with valid=false and the
 * reason.
 */
export function decodeDmr4Copy(head: Uint8Array, index: number, offset: number): Dmr4Copy {
  const c: Dmr4Copy = {
    index, offset, valid: false, problem: null, magic: null, version: null, seq: null, timestamp: null,
    storedCrc: null, computedCrc: null, activeRemaps: null, entries: [],
  };
  if (offset + DMR4.RECORD_BYTES > head.length) {
    c.problem = `the record (${DMR4.RECORD_BYTES} bytes at ${offset}) ends past the end of the spare (${head.length} bytes)`;
    return c;
  }
  const rec = head.subarray(offset, offset + DMR4.RECORD_BYTES);
  const dv = new DataView(rec.buffer, rec.byteOffset, rec.byteLength);
  c.magic = dv.getUint32(DMR4.OFF_MAGIC, true);
  c.version = dv.getUint32(DMR4.OFF_VERSION, true);
  c.seq = dv.getBigUint64(DMR4.OFF_SEQ, true);
  c.timestamp = dv.getBigUint64(DMR4.OFF_TIMESTAMP, true);
  c.storedCrc = dv.getUint32(DMR4.OFF_CRC, true);
  c.activeRemaps = dv.getUint32(DMR4.OFF_ACTIVE, true);
  if (c.magic !== DMR4.MAGIC) {
    c.problem = c.magic === 0 && rec.every((b) => b === 0) ? 'empty (all zero)' : `bad magic ${hex32(c.magic)} (want ${hex32(DMR4.MAGIC)} "DMR4")`;
    return c;
  }
  c.computedCrc = dmr4RecordCrc(rec);
  if (c.computedCrc !== c.storedCrc) {
    c.problem = `CRC mismatch: stored ${hex32(c.storedCrc)}, computed ${hex32(c.computedCrc)}`;
    return c;
  }
  if (c.version !== DMR4.VERSION) {
    c.problem = `unsupported version ${c.version} (want ${DMR4.VERSION})`;
    return c;
  }
  if (c.activeRemaps > DMR4.MAX_ENTRIES) {
    c.problem = `active_remaps ${c.activeRemaps} exceeds the ${DMR4.MAX_ENTRIES} table entries`;
    return c;
  }
  for (let i = 0; i < c.activeRemaps; i++) {
    const o = DMR4.OFF_TABLE + i * DMR4.ENTRY_BYTES;
    c.entries.push({
      index: i,
      originalSector: dv.getBigUint64(o, true),
      spareSector: dv.getBigUint64(o + 8, true),
      timestampNs: dv.getBigUint64(o + 16, true),
      accessCount: dv.getUint32(o + 24, true),
      errorCount: dv.getUint32(o + 28, true),
      reason: dv.getUint16(o + 32, true),
      flags: dv.getUint16(o + 34, true),
    });
  }
  c.valid = true;
  return c;
}

/** Why an entry cannot be imported with data. */
export type Dmr4Problem =
  /** Its spare sector lies in the kernel target's own metadata area (first 640 KiB): what is there is metadata. */
  | 'metadata-area'
  /** Another entry points at the same spare sector: the data there belongs to whichever was written last. */
  | 'shared-spare-sector'
  /** Another entry remaps the same main sector: which one the kernel served is undefined. */
  | 'duplicate-original'
  /** Its spare sector lies past the end of the old spare. */
  | 'spare-beyond-end';

export interface Dmr4TableEntry extends Dmr4Entry {
  problems: Dmr4Problem[];
}

export interface Dmr4Image {
  spareBytes: number;
  copies: Dmr4Copy[];
  /** Index of the winning copy. */
  chosen: number;
  seq: bigint;
  timestamp: bigint;
  /** The winning copy's entries, each with the problems found (empty: importable with data). */
  table: Dmr4TableEntry[];
  /** The entries with problems (imported as pending, never as data). */
  overlapping: Dmr4TableEntry[];
}

/**
 * Decodes a DMR4 old spare. `head` holds the first bytes of the spare (at
 * least min(spareBytes, 640 KiB)); `spareBytes` is its full size. Throws
 * Dmr4Error: TRUNCATED when the spare is smaller than the metadata area (or
 * `head` is short), NO_VALID_COPY when no copy is valid.
 */
export function decodeDmr4(head: Uint8Array, spareBytes: number = head.length): Dmr4Image {
  if (!Number.isSafeInteger(spareBytes) || spareBytes < DMR4.META_AREA_BYTES) {
    throw new Dmr4Error('TRUNCATED', `the old spare is ${spareBytes} bytes, smaller than the ${DMR4.META_AREA_BYTES}-byte DMR4 metadata area: `
      + 'truncated, or not a dm-remap spare', 61);
  }
  if (head.length < DMR4.META_AREA_BYTES) {
    throw new Dmr4Error('TRUNCATED', `only ${head.length} of the ${DMR4.META_AREA_BYTES} bytes of the DMR4 metadata area could be read`, 61);
  }
  const copies = DMR4.COPY_OFFSETS.map((off, i) => decodeDmr4Copy(head, i, off));
  let best: Dmr4Copy | null = null;
  for (const c of copies) {
    if (!c.valid) continue;
    if (best === null || (c.seq as bigint) > (best.seq as bigint)
      || (c.seq === best.seq && (c.timestamp as bigint) > (best.timestamp as bigint))) best = c;
  }
  if (best === null) {
    throw new Dmr4Error('NO_VALID_COPY', `no valid DMR4 copy: ${copies.map((c) => `copy ${c.index} at ${c.offset}: ${c.problem}`).join('; ')}`, 74);
  }
  const table = analyzeDmr4Entries(best.entries, spareBytes);
  return {
    spareBytes, copies, chosen: best.index, seq: best.seq as bigint, timestamp: best.timestamp as bigint,
    table, overlapping: table.filter((e) => e.problems.length > 0),
  };
}

/** Finds the entries that overlap each other, the metadata area, or the end of the old spare. */
export function analyzeDmr4Entries(entries: readonly Dmr4Entry[], spareBytes: number): Dmr4TableEntry[] {
  const bySpare = new Map<bigint, number>();
  const byOriginal = new Map<bigint, number>();
  for (const e of entries) {
    bySpare.set(e.spareSector, (bySpare.get(e.spareSector) ?? 0) + 1);
    byOriginal.set(e.originalSector, (byOriginal.get(e.originalSector) ?? 0) + 1);
  }
  const sector = BigInt(DMR4.SECTOR_BYTES);
  const metaSectors = BigInt(DMR4.META_AREA_BYTES) / sector;
  const spareSectors = BigInt(spareBytes) / sector;
  return entries.map((e) => {
    const problems: Dmr4Problem[] = [];
    if (e.spareSector < metaSectors) problems.push('metadata-area');
    else if (e.spareSector >= spareSectors) problems.push('spare-beyond-end');
    if ((bySpare.get(e.spareSector) ?? 0) > 1) problems.push('shared-spare-sector');
    if ((byOriginal.get(e.originalSector) ?? 0) > 1) problems.push('duplicate-original');
    return { ...e, problems };
  });
}

/** One sector of a block to take from the old spare. */
export interface Dmr4SectorCopy {
  /** Byte offset of the sector inside the block. */
  offsetInBlock: number;
  /** Byte offset of its data on the old spare. */
  spareByte: number;
  entry: number;
}

export interface Dmr4ImportPlan {
  /** Blocks to remap with data: the main's block overlaid with these sectors of the old spare. Ascending. */
  data: Array<{ block: number; sectors: Dmr4SectorCopy[] }>;
  /** Blocks that hold an overlapping entry: imported as pending. Ascending. */
  pending: Array<{ block: number; entries: number[]; problems: Dmr4Problem[] }>;
  /** Entries whose main sector lies outside the new device: not imported. */
  outside: number[];
}

/**
 * Which blocks of the new device (of `blockSize` bytes, `deviceBytes` long)
 * get which sectors. A block with any overlapping entry becomes pending as a
 * whole: none of its sectors is imported as data.
 */
export function planDmr4Import(table: readonly Dmr4TableEntry[], blockSize: number, deviceBytes: number): Dmr4ImportPlan {
  const perBlock = new Map<number, Dmr4TableEntry[]>();
  const outside: number[] = [];
  const sector = BigInt(DMR4.SECTOR_BYTES);
  const devSectors = BigInt(Math.floor(deviceBytes / DMR4.SECTOR_BYTES));
  const blocksTotal = Math.floor(deviceBytes / blockSize);
  for (const e of table) {
    if (e.originalSector >= devSectors) {
      outside.push(e.index);
      continue;
    }
    const byte = Number(e.originalSector * sector);
    const block = Math.floor(byte / blockSize);
    if (block >= blocksTotal) {
      outside.push(e.index);
      continue;
    }
    const list = perBlock.get(block);
    if (list === undefined) perBlock.set(block, [e]);
    else list.push(e);
  }
  const plan: Dmr4ImportPlan = { data: [], pending: [], outside };
  for (const block of [...perBlock.keys()].sort((a, b) => a - b)) {
    const list = perBlock.get(block) as Dmr4TableEntry[];
    const problems = [...new Set(list.flatMap((e) => e.problems))];
    if (problems.length > 0) {
      plan.pending.push({ block, entries: list.map((e) => e.index), problems });
      continue;
    }
    plan.data.push({
      block,
      sectors: list.map((e) => ({
        offsetInBlock: Number(e.originalSector * sector) - block * blockSize,
        spareByte: Number(e.spareSector * sector),
        entry: e.index,
      })),
    });
  }
  return plan;
}

/** A JSON view of an image or report (u64 values as numbers when exact, else decimal strings). */
export function jsonSafe(value: unknown): unknown {
  return JSON.parse(JSON.stringify(value, (_k, v: unknown) => {
    if (typeof v !== 'bigint') return v;
    return v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v.toString();
  })) as unknown;
}
