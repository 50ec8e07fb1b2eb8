/**
 * The DMR4 decoder (src/migrate/dmr4.ts) against images built from the
 * documented layout: copy selection, CRC, overlaps, the import plan, and
 * property and fuzz tests.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { DMR4, Dmr4Error, crc32le, decodeDmr4, planDmr4Import } from '../../src/migrate/dmr4.js';
import { Rng } from '../fuzz/rng.js';
import { COPY_AT, META, REC, buildImage, buildRecord, crcLe, type EntrySpec } from './dmr4-builder.js';

const u64 = fc.bigInt({ min: 0n, max: (1n << 64n) - 1n });

const entryArb: fc.Arbitrary<EntrySpec> = fc.record({
  original: u64,
  spare: u64,
  timestampNs: u64,
  access: fc.nat({ max: 0xffffffff }),
  errors: fc.nat({ max: 0xffffffff }),
  reason: fc.nat({ max: 0xffff }),
  flags: fc.constantFrom(1, 2, 3, 0),
});

describe('crc32le', () => {
  it('is the kernel crc32_le(0, ...): no init/final inversion', () => {
    // crc32_le(~0, "123456789") ^ ~0 is the standard CRC-32 check value 0xCBF43926;
    // with init 0 and no inversion, a zero buffer has CRC 0.
    const check = Buffer.from('123456789');
    expect((crc32le(check, 0xffffffff) ^ 0xffffffff) >>> 0).toBe(0xcbf43926);
    expect(crc32le(Buffer.alloc(100))).toBe(0);
    expect(crc32le(check)).toBe(crcLe(check));
    // chaining equals one pass
    expect(crc32le(check, crc32le(check, 0, 0, 4), 4)).toBe(crc32le(check));
  });

  it('agrees with a bitwise implementation on any bytes', () => {
    fc.assert(fc.property(fc.uint8Array({ maxLength: 300 }), fc.nat({ max: 0xffffffff }), (b, init) => {
      expect(crc32le(b, init)).toBe(crcLe(b, init));
    }));
  });
});

describe('decodeDmr4', () => {
  it('decodes every field of the winning copy; entries past active_remaps are ignored', () => {
    const entries: EntrySpec[] = [
      { original: 1000, spare: 1400, timestampNs: 123n, access: 7, errors: 3, reason: 2, flags: 1 },
      { original: 5, spare: 1300, flags: 2 },
    ];
    const img = buildImage([buildRecord({ seq: 9, timestamp: 100, entries, filler: 0x5a })]);
    const d = decodeDmr4(img);
    expect(d.chosen).toBe(0);
    expect(d.seq).toBe(9n);
    expect(d.timestamp).toBe(100n);
    expect(d.copies.map((c) => c.valid)).toEqual([true, false, false, false, false]);
    expect(d.copies[1].problem).toBe('empty (all zero)');
    expect(d.copies.map((c) => c.offset)).toEqual(COPY_AT);
    expect(d.table).toHaveLength(2);
    expect(d.table[0]).toMatchObject({ index: 0, originalSector: 1000n, spareSector: 1400n, timestampNs: 123n, accessCount: 7, errorCount: 3, reason: 2, flags: 1, problems: [] });
    expect(d.table[1]).toMatchObject({ originalSector: 5n, spareSector: 1300n, flags: 2, problems: [] });
    expect(d.overlapping).toEqual([]);
  });

  it('the valid copy with the highest sequence wins, then the newest timestamp', () => {
    const rec = (seq: number, ts: number, orig: number): Buffer => buildRecord({ seq, timestamp: ts, entries: [{ original: orig, spare: 5000 }] });
    let d = decodeDmr4(buildImage([rec(3, 50, 0), rec(7, 10, 1), rec(7, 20, 2), rec(5, 99, 3), rec(7, 15, 4)]));
    expect(d.chosen).toBe(2);
    expect(d.table[0].originalSector).toBe(2n);
    // the winner corrupted: the next best (seq 7, ts 15) wins
    const img = buildImage([rec(3, 50, 0), rec(7, 10, 1), rec(7, 20, 2), rec(5, 99, 3), rec(7, 15, 4)]);
    img[COPY_AT[2] + 400] ^= 1;
    d = decodeDmr4(img);
    expect(d.chosen).toBe(4);
    expect(d.copies[2].problem).toMatch(/^CRC mismatch: stored 0x[0-9a-f]{8}, computed 0x[0-9a-f]{8}$/);
  });

  it('names why each copy is invalid', () => {
    const good = buildRecord({ seq: 1, timestamp: 1, entries: [] });
    const img = buildImage([
      buildRecord({ seq: 2, timestamp: 1, entries: [], magic: 0x12345678 }),
      buildRecord({ seq: 2, timestamp: 1, entries: [], version: 3 }),
      buildRecord({ seq: 2, timestamp: 1, entries: [], activeRemaps: 2049 }),
      null,
      good,
    ]);
    const d = decodeDmr4(img);
    expect(d.chosen).toBe(4);
    expect(d.copies[0].problem).toBe('bad magic 0x12345678 (want 0x444d5234 "DMR4")');
    expect(d.copies[1].problem).toBe('unsupported version 3 (want 4)');
    expect(d.copies[2].problem).toBe('active_remaps 2049 exceeds the 2048 table entries');
    expect(d.copies[3].problem).toBe('empty (all zero)');
  });

  it('no valid copy: Dmr4Error NO_VALID_COPY naming every copy', () => {
    const img = buildImage([buildRecord({ seq: 1, timestamp: 1, entries: [] })]);
    img[30] ^= 0xff;
    const err = (() => { try { decodeDmr4(img); return null; } catch (e) { return e; } })();
    expect(err).toBeInstanceOf(Dmr4Error);
    expect(err).toMatchObject({ code: 'NO_VALID_COPY', errno: 74 });
    expect((err as Error).message).toMatch(/copy 0 at 0: CRC mismatch.*copy 4 at 524288: empty/);
  });

  it('reports entries that overlap each other, the metadata area or the end of the spare', () => {
    const size = META + 8 * 512; // spare sectors 1280..1287 exist
    const img = buildImage([buildRecord({
      seq: 1, timestamp: 1, entries: [
        { original: 10, spare: 1280 }, // fine
        { original: 11, spare: 1279 }, // last sector of the metadata area
        { original: 12, spare: 1281 }, // shares its spare sector with the next
        { original: 13, spare: 1281 },
        { original: 14, spare: 1282 }, // same main sector twice
        { original: 14, spare: 1283 },
        { original: 15, spare: 1288 }, // past the end
        { original: 16, spare: 0 },
      ],
    })], size);
    const d = decodeDmr4(img, size);
    expect(d.table.map((e) => e.problems)).toEqual([
      [], ['metadata-area'], ['shared-spare-sector'], ['shared-spare-sector'], ['duplicate-original'], ['duplicate-original'], ['spare-beyond-end'], ['metadata-area'],
    ]);
    expect(d.overlapping.map((e) => e.index)).toEqual([1, 2, 3, 4, 5, 6, 7]);
  });

  it('truncated spares: a clear TRUNCATED error', () => {
    const img = buildImage([buildRecord({ seq: 1, timestamp: 1, entries: [] })]);
    for (const len of [0, 100, REC, META - 1]) {
      expect(() => decodeDmr4(img.subarray(0, len))).toThrow(expect.objectContaining({ name: 'Dmr4Error', code: 'TRUNCATED' }) as Error);
    }
    expect(() => decodeDmr4(img.subarray(0, 1000), 10 << 20)).toThrow(/only 1000 of the 655360 bytes/);
    expect(decodeDmr4(img.subarray(0, META)).chosen).toBe(0);
  });
});

describe('properties', () => {
  it('encode -> decode round trip', () => {
    fc.assert(fc.property(fc.array(entryArb, { maxLength: 40 }), u64, u64, fc.integer({ min: 0, max: 4 }), fc.nat({ max: 255 }),
      (entries, seq, ts, slot, filler) => {
        const copies: Array<Buffer | null> = [null, null, null, null, null];
        copies[slot] = buildRecord({ seq, timestamp: ts, entries, filler });
        const d = decodeDmr4(buildImage(copies));
        expect(d.chosen).toBe(slot);
        expect(d.seq).toBe(seq);
        expect(d.timestamp).toBe(ts);
        expect(d.table.map((e) => ({
          original: e.originalSector, spare: e.spareSector, timestampNs: e.timestampNs, access: e.accessCount, errors: e.errorCount, reason: e.reason, flags: e.flags,
        }))).toEqual(entries.map((e) => ({ ...e, original: BigInt(e.original), spare: BigInt(e.spare), timestampNs: BigInt(e.timestampNs ?? 0) })));
      }), { numRuns: 60 });
  });

  it('any single corrupted byte in a copy makes that copy invalid, and another copy wins', () => {
    fc.assert(fc.property(fc.array(entryArb, { maxLength: 8 }), fc.integer({ min: 0, max: 4 }), fc.nat({ max: REC - 1 }), fc.integer({ min: 1, max: 255 }),
      (entries, winner, at, xor) => {
        // every copy valid; `winner` has the highest sequence
        const copies = COPY_AT.map((_, i) => buildRecord({ seq: i === winner ? 100 : 10 + i, timestamp: 5, entries: i === winner ? entries : [] }));
        const img = buildImage(copies);
        expect(decodeDmr4(img).chosen).toBe(winner);
        img[COPY_AT[winner] + at] ^= xor;
        const d = decodeDmr4(img);
        expect(d.copies[winner].valid).toBe(false);
        expect(d.copies[winner].problem).toMatch(/CRC mismatch|bad magic/);
        // the next best: highest 10+i among the others
        expect(d.chosen).toBe(winner === 4 ? 3 : 4);
      }), { numRuns: 150 });
  });

  it('a truncated image never decodes a copy that lies past its end', () => {
    fc.assert(fc.property(fc.integer({ min: 0, max: META + 4096 }), (len) => {
      const img = buildImage(COPY_AT.map((_, i) => buildRecord({ seq: i, timestamp: 0, entries: [] })));
      try {
        const d = decodeDmr4(img.subarray(0, len));
        expect(len).toBeGreaterThanOrEqual(META);
        expect(d.chosen).toBe(4);
      } catch (e) {
        expect(e).toBeInstanceOf(Dmr4Error);
        expect((e as Dmr4Error).code).toBe('TRUNCATED');
        expect(len).toBeLessThan(META);
      }
    }), { numRuns: 80 });
  });

  it('the import plan: every non-overlapping entry lands in exactly one data block at its byte; blocks with a problem are pending', () => {
    const small: fc.Arbitrary<EntrySpec> = fc.record({ original: fc.nat({ max: 300 }), spare: fc.nat({ max: 1400 }) });
    fc.assert(fc.property(fc.array(small, { maxLength: 60 }), fc.constantFrom(512, 4096), (entries, bs) => {
      const size = META + 100 * 512;
      const d = decodeDmr4(buildImage([buildRecord({ seq: 1, timestamp: 1, entries })], size), size);
      const deviceBytes = 256 * 512; // sectors 256..300 are outside
      const plan = planDmr4Import(d.table, bs, deviceBytes);
      const pendingBlocks = new Set(plan.pending.map((p) => p.block));
      const seen = new Set<number>();
      for (const e of d.table) {
        const byte = Number(e.originalSector) * 512;
        if (byte >= deviceBytes) {
          expect(plan.outside).toContain(e.index);
          continue;
        }
        const block = Math.floor(byte / bs);
        if (e.problems.length > 0) {
          expect(pendingBlocks.has(block)).toBe(true);
          continue;
        }
        const inData = plan.data.find((x) => x.block === block);
        if (inData === undefined) {
          expect(pendingBlocks.has(block)).toBe(true); // a neighbour in the block overlaps
          continue;
        }
        const s = inData.sectors.find((x) => x.entry === e.index);
        expect(s).toEqual({ offsetInBlock: byte - block * bs, spareByte: Number(e.spareSector) * 512, entry: e.index });
        seen.add(e.index);
      }
      for (const x of plan.data) expect(pendingBlocks.has(x.block)).toBe(false);
      expect(plan.data.reduce((n, x) => n + x.sectors.length, 0)).toBe(seen.size);
    }), { numRuns: 100 });
  });
});

describe('fuzz', () => {
  it('random bytes and mutated images: a result or a Dmr4Error, nothing else', () => {
    const seed = Number(process.env.DMR_FUZZ_SEED ?? Date.now() % 0x7fffffff);
    const rng = new Rng(seed);
    const base = buildImage(COPY_AT.map((_, i) => buildRecord({
      seq: i, timestamp: i, entries: Array.from({ length: 30 }, (_v, k) => ({ original: k * 3, spare: 1200 + k * 7 })),
    })), META + 64 * 1024);
    let decoded = 0;
    let refused = 0;
    for (let run = 0; run < 300; run++) {
      let img: Buffer;
      const kind = rng.int(3);
      if (kind === 0) {
        img = Buffer.alloc(rng.chance(0.2) ? rng.int(META) : META + rng.int(8192));
        for (let i = 0; i + 4 <= img.length; i += 4) img.writeUInt32LE(rng.u32(), i);
        // plant the magic in some copies, so the CRC check is reached too
        for (const copy of COPY_AT) if (copy + 4 <= img.length && rng.chance(0.5)) img.writeUInt32LE(DMR4.MAGIC, copy);
      } else {
        img = Buffer.from(base);
        const n = 1 + rng.int(40);
        for (let i = 0; i < n; i++) {
          const copy = rng.pick(COPY_AT);
          // header, active_remaps, the first entries: where the decoder looks
          const at = copy + rng.pick([rng.int(32), 296 + rng.int(4), 312 + rng.int(30 * 40), rng.int(REC)]);
          img[at] = rng.int(256);
        }
        if (kind === 2) {
          // re-seal the CRC so that the mutated fields are decoded, not just rejected
          for (const copy of COPY_AT) {
            const r = img.subarray(copy, copy + REC);
            r.writeUInt32LE(crcLe(r.subarray(28), crcLe(r.subarray(0, 24))), 24);
          }
        }
      }
      try {
        const d = decodeDmr4(img);
        decoded++;
        expect(d.copies[d.chosen].valid).toBe(true);
        expect(d.table.length).toBeLessThanOrEqual(DMR4.MAX_ENTRIES);
        planDmr4Import(d.table, 4096, 1 << 30);
      } catch (e) {
        if (!(e instanceof Dmr4Error)) throw new Error(`seed ${seed} run ${run}: ${String(e)}`);
        expect(e.message.length).toBeGreaterThan(20);
        refused++;
      }
    }
    expect(decoded).toBeGreaterThan(0);
    expect(refused).toBeGreaterThan(0);
  });
});
