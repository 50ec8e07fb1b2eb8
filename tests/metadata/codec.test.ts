import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import {
  CHECKPOINT_MAGIC,
  FORMAT_VERSION,
  JOURNAL_MAGIC,
  decodeBlock,
  decodeSuperblock,
  encodeBlocks,
  encodeSuperblock,
  formatIdOf,
  recordOffsetInBlocks,
  sealBlocks,
  type Identity,
} from '../../src/metadata/format.js';
import { crc32c } from '../../src/metadata/crc32c.js';
import { BLOCK_HEADER_BYTES, computeLayout, RECORDS_PER_BLOCK } from '../../src/metadata/layout.js';
import { RECORD_BYTES, RecordType, decodeRecord, encodeRecord, setU64, type MetaRecord, type RecordTypeCode } from '../../src/metadata/records.js';

const recordArb: fc.Arbitrary<MetaRecord> = fc.record({
  type: fc.constantFrom(...(Object.values(RecordType) as RecordTypeCode[])),
  logical: fc.maxSafeNat(),
  spare: fc.maxSafeNat(),
  dataCrc: fc.nat({ max: 0xffffffff }),
});

const identityArb: fc.Arbitrary<Identity> = fc.record(
  {
    deviceUuid: fc.uuid(),
    blockSize: fc.constant(4096),
    main: fc.record({
      kind: fc.constantFrom('file' as const, 'block' as const),
      sizeBytes: fc.maxSafeNat(),
      dev: fc.maxSafeNat(),
      ino: fc.maxSafeNat(),
      stableId: fc.string({ maxLength: 60 }),
    }),
    createdAtMs: fc.maxSafeNat(),
    name: fc.string({ minLength: 1, maxLength: 40 }),
  },
  { requiredKeys: ['deviceUuid', 'blockSize', 'main', 'createdAtMs'] },
);

const UUID = '0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0';
const FID = formatIdOf(UUID);
const sampleRecords = (n: number): MetaRecord[] =>
  Array.from({ length: n }, (_, i) => ({ type: RecordType.REMAP, logical: i * 1_000_003, spare: i, dataCrc: (i * 2654435761) >>> 0 }));

describe('record codec', () => {
  it('round-trips any record (u64 fields up to 2^53-1)', () => {
    const view = new DataView(new ArrayBuffer(RECORD_BYTES + 8));
    fc.assert(
      fc.property(recordArb, fc.nat({ max: 8 }), (r, off) => {
        encodeRecord(view, off, r);
        expect(decodeRecord(view, off)).toEqual(r);
      }),
      { numRuns: 2000 },
    );
  });
  it('rejects unknown types and non-zero flags', () => {
    const view = new DataView(new ArrayBuffer(RECORD_BYTES));
    encodeRecord(view, 0, { type: RecordType.UNMAP, logical: 1, spare: 0, dataCrc: 0 });
    view.setUint8(0, 9);
    expect(typeof decodeRecord(view, 0)).toBe('string');
    view.setUint8(0, 1);
    view.setUint8(1, 1);
    expect(typeof decodeRecord(view, 0)).toBe('string');
  });
});

describe('superblock codec', () => {
  it('round-trips identity and layout', () => {
    fc.assert(
      fc.property(identityArb, fc.constantFrom(0 as const, 1 as const), fc.integer({ min: 1, max: 1 << 20 }), (identity, copyIndex, areaBlocks) => {
        const layout = computeLayout(4096 * 3, areaBlocks * 4096 + 200 * 4096, 4096, { journalBytes: 64 * 1024 });
        const sb = { version: FORMAT_VERSION, copyIndex, identity, layout };
        const r = decodeSuperblock(encodeSuperblock(sb));
        expect(r.status).toBe('valid');
        if (r.status === 'valid') expect(r.sb).toEqual(sb);
      }),
      { numRuns: 300 },
    );
  });
});

/** The block encoder as docs/FORMAT.md describes it, written out in full: the reference for encodeBlocks(). */
function referenceEncode(magic: Uint8Array, formatId: Uint8Array, seq: number, records: readonly MetaRecord[]): Uint8Array {
  const count = Math.max(1, Math.ceil(records.length / RECORDS_PER_BLOCK));
  const out = new Uint8Array(count * 4096);
  const v = new DataView(out.buffer);
  for (let b = 0; b < count; b++) {
    const base = b * 4096;
    const first = b * RECORDS_PER_BLOCK;
    const inBlock = Math.max(0, Math.min(RECORDS_PER_BLOCK, records.length - first));
    out.set(magic, base);
    v.setUint16(base + 4, FORMAT_VERSION, true);
    v.setUint16(base + 6, inBlock, true);
    out.set(formatId, base + 8);
    setU64(v, base + 16, seq);
    v.setUint32(base + 24, b, true);
    v.setUint32(base + 28, count, true);
    setU64(v, base + 32, records.length);
    for (let i = 0; i < inBlock; i++) encodeRecord(v, base + BLOCK_HEADER_BYTES + i * RECORD_BYTES, records[first + i]);
    v.setUint32(base + 40, crc32c(out.subarray(base + 44, base + 4096), crc32c(out.subarray(base, base + 40))), true);
  }
  return out;
}

describe('piecewise encoding (checkpoints)', () => {
  it('encodeBlocks() and records placed piece by piece then sealed give the reference bytes', () => {
    fc.assert(
      fc.property(fc.array(recordArb, { maxLength: 900 }), fc.maxSafeNat(), fc.integer({ min: 1, max: 4 }), (records, seq, piece) => {
        const want = referenceEncode(CHECKPOINT_MAGIC, FID, seq, records);
        expect(encodeBlocks(CHECKPOINT_MAGIC, FID, seq, records)).toEqual(want);
        // pieces of `piece` blocks, as the writer builds a checkpoint
        const count = want.length / 4096;
        const perPiece = piece * RECORDS_PER_BLOCK;
        const got = new Uint8Array(want.length);
        for (let first = 0; first < count; first += piece) {
          const n = Math.min(piece, count - first);
          const buf = new Uint8Array(piece * 4096);
          const v = new DataView(buf.buffer);
          const r0 = (first / piece) * perPiece;
          for (let i = r0; i < Math.min(records.length, r0 + perPiece); i++) encodeRecord(v, recordOffsetInBlocks(i - r0), records[i]);
          for (let b = 0; b < n; b++) sealBlocks(buf, b * 4096, CHECKPOINT_MAGIC, FID, seq, records.length, first + b, 1);
          got.set(buf.subarray(0, n * 4096), first * 4096);
        }
        expect(got).toEqual(want);
      }),
      { numRuns: 200 },
    );
  });

  it('sealBlocks() refuses blocks outside the encoding', () => {
    const buf = new Uint8Array(2 * 4096);
    expect(() => sealBlocks(buf, 0, CHECKPOINT_MAGIC, FID, 1, RECORDS_PER_BLOCK, 1, 1)).toThrow(RangeError);
    expect(() => sealBlocks(buf, 4096, CHECKPOINT_MAGIC, FID, 1, 2 * RECORDS_PER_BLOCK, 0, 2)).toThrow(RangeError);
  });
});

describe('journal/checkpoint block codec', () => {
  it('round-trips record streams across blocks', () => {
    fc.assert(
      fc.property(fc.array(recordArb, { maxLength: 600 }), fc.maxSafeNat(), fc.boolean(), (records, seq, journal) => {
        const magic = journal ? JOURNAL_MAGIC : CHECKPOINT_MAGIC;
        const buf = encodeBlocks(magic, FID, seq, records);
        const n = Math.max(1, Math.ceil(records.length / RECORDS_PER_BLOCK));
        expect(buf.length).toBe(n * 4096);
        const out: MetaRecord[] = [];
        for (let i = 0; i < n; i++) {
          const r = decodeBlock(buf.subarray(i * 4096), magic, FID);
          expect(r.ok).toBe(true);
          if (!r.ok) return;
          expect(r.block).toMatchObject({ seq, blockIndex: i, blockCount: n, totalRecords: records.length });
          out.push(...r.block.records);
        }
        expect(out).toEqual(records);
        // the other magic and another format id are refused
        expect(decodeBlock(buf, journal ? CHECKPOINT_MAGIC : JOURNAL_MAGIC, FID).ok).toBe(false);
        expect(decodeBlock(buf, magic, formatIdOf('11111111-2222-4333-8444-555555555555')).ok).toBe(false);
      }),
      { numRuns: 200 },
    );
  });
  it('reports an all-zero block as empty, not corrupt', () => {
    const r = decodeBlock(new Uint8Array(4096), JOURNAL_MAGIC, FID);
    expect(r).toMatchObject({ ok: false, empty: true });
  });
});

/** Every byte position, several xor patterns (CRC32C detects every error burst up to 32 bits, so every single-byte change). */
function everySingleByteCorruption(block: Uint8Array, valid: (b: Uint8Array) => boolean): number {
  const patterns = [0x01, 0x80, 0xff, 0x5a];
  let tried = 0;
  const b = block.slice();
  for (let i = 0; i < b.length; i++) {
    for (const p of patterns) {
      b[i] ^= p;
      if (valid(b)) throw new Error(`corruption at byte ${i} (xor 0x${p.toString(16)}) went undetected`);
      b[i] ^= p;
      tried++;
    }
  }
  // every value at the header bytes and the CRC field
  for (let i = 0; i < 64; i++) {
    const orig = b[i];
    for (let v = 0; v < 256; v++) {
      if (v === orig) continue;
      b[i] = v;
      if (valid(b)) throw new Error(`byte ${i} = ${v} went undetected`);
      tried++;
    }
    b[i] = orig;
  }
  expect(valid(b)).toBe(true);
  return tried;
}

describe('single-byte corruption is always detected', () => {
  it('superblock', () => {
    const layout = computeLayout(0, 64 << 20, 4096, { journalBytes: 1 << 20 });
    const sb = encodeSuperblock({
      version: FORMAT_VERSION,
      copyIndex: 0,
      identity: { deviceUuid: UUID, blockSize: 4096, main: { kind: 'block', sizeBytes: 1e12, dev: 2049, ino: 0, stableId: 'wwn-0x5000c500a1b2c3d4' }, createdAtMs: 1_700_000_000_000, name: 'disk0' },
      layout,
    });
    expect(everySingleByteCorruption(sb, (b) => decodeSuperblock(b).status === 'valid')).toBeGreaterThan(16000);
  });
  it('journal block (full and partly filled)', () => {
    for (const n of [RECORDS_PER_BLOCK, 5]) {
      const blk = encodeBlocks(JOURNAL_MAGIC, FID, 123456789, sampleRecords(n)).subarray(0, 4096);
      everySingleByteCorruption(blk, (b) => decodeBlock(b, JOURNAL_MAGIC, FID).ok);
    }
  });
  it('checkpoint block (middle block of a multi-block checkpoint)', () => {
    const buf = encodeBlocks(CHECKPOINT_MAGIC, FID, 42, sampleRecords(3 * RECORDS_PER_BLOCK - 7));
    everySingleByteCorruption(buf.subarray(4096, 8192), (b) => decodeBlock(b, CHECKPOINT_MAGIC, FID).ok);
  });
});
