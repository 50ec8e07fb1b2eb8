/**
 * Builds DMR4 old-spare images from the documented layout (docs/DMR4.md),
 * independently of the decoder's constants, for the decoder and import tests.
 */

export const REC = 84_288;
export const COPY_AT = [0, 131_072, 262_144, 393_216, 524_288];
export const META = 655_360;

export interface EntrySpec {
  original: bigint | number;
  spare: bigint | number;
  timestampNs?: bigint | number;
  access?: number;
  errors?: number;
  reason?: number;
  flags?: number;
}

export interface RecordSpec {
  seq: bigint | number;
  timestamp: bigint | number;
  entries: EntrySpec[];
  version?: number;
  magic?: number;
  /** Defaults to entries.length. */
  activeRemaps?: number;
  /** Bytes 28..295 and the tail: filler the decoder must ignore. */
  filler?: number;
}

/** Bitwise reflected CRC-32, poly 0xEDB88320, init 0, no final xor (kernel crc32_le(0, ...)). */
export function crcLe(buf: Uint8Array, crc = 0): number {
  let c = crc >>> 0;
  for (const b of buf) {
    c ^= b;
    for (let k = 0; k < 8; k++) c = (c >>> 1) ^ (0xedb88320 & -(c & 1));
  }
  return c >>> 0;
}

export function buildRecord(r: RecordSpec): Buffer {
  const b = Buffer.alloc(REC, r.filler ?? 0);
  b.writeUInt32LE(r.magic ?? 0x444d5234, 0);
  b.writeUInt32LE(r.version ?? 4, 4);
  b.writeBigUInt64LE(BigInt(r.seq), 8);
  b.writeBigUInt64LE(BigInt(r.timestamp), 16);
  b.writeUInt32LE(r.activeRemaps ?? r.entries.length, 296);
  r.entries.forEach((e, i) => {
    const o = 312 + i * 40;
    b.writeBigUInt64LE(BigInt(e.original), o);
    b.writeBigUInt64LE(BigInt(e.spare), o + 8);
    b.writeBigUInt64LE(BigInt(e.timestampNs ?? 0), o + 16);
    b.writeUInt32LE(e.access ?? 0, o + 24);
    b.writeUInt32LE(e.errors ?? 0, o + 28);
    b.writeUInt16LE(e.reason ?? 0, o + 32);
    b.writeUInt16LE(e.flags ?? 2, o + 34);
  });
  const crc = crcLe(b.subarray(28), crcLe(b.subarray(0, 24)));
  b.writeUInt32LE(crc, 24);
  return b;
}

/** An image of `size` bytes (at least 640 KiB) with the given records at the copy offsets (null: left zero). */
export function buildImage(copies: Array<Buffer | null>, size = META + 64 * 1024): Buffer {
  const img = Buffer.alloc(size);
  copies.forEach((c, i) => {
    if (c !== null) c.copy(img, COPY_AT[i]);
  });
  return img;
}
