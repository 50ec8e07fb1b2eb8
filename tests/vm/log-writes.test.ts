/**
 * The dm-log-writes reader/replayer of the crash-consistency guest test
 * (tests/vm/log-writes.mjs), on the host: the format pinned byte by byte,
 * encode/parse/replay round trips (fast-check), tearing at 4 KiB, and
 * fuzzing (damaged or truncated logs give LogWritesError, nothing else).
 * The guest test itself: guest-crash.sh (DMR_VM=1, tests/vm/vm.test.ts).
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
// @ts-expect-error plain ESM JavaScript (the guest runs it with no build step)
import * as lw from './log-writes.mjs';

interface Entry { index: number; sector: number; nrSectors: number; flags: number; offset: number; length: number; dataPos: number; mark: string | null }
const parse = lw.parseLogWrites as (log: Buffer, o?: { deviceBytes?: number }) => { sectorSize: number; entries: Entry[] };
const apply = lw.applyEntry as (image: Buffer, log: Buffer, e: Entry, keep?: (chunk: number) => boolean) => number;
const { LOG_FLUSH, LOG_FUA, LOG_DISCARD, LOG_MARK, LogWritesError } = lw as {
  LOG_FLUSH: number; LOG_FUA: number; LOG_DISCARD: number; LOG_MARK: number; LogWritesError: new (...a: unknown[]) => Error;
};

type Spec =
  | { kind: 'write'; sector: number; data: Buffer; flags: number }
  | { kind: 'discard'; sector: number; nrSectors: number }
  | { kind: 'flush' }
  | { kind: 'mark'; text: string };

/** Writes a log the way the kernel target lays it out (test-side encoder). */
function encode(sectorSize: number, specs: Spec[], nrEntries = specs.length): Buffer {
  const parts: Buffer[] = [];
  const sup = Buffer.alloc(sectorSize);
  sup.writeBigUInt64LE(0x6a736677736872n, 0);
  sup.writeBigUInt64LE(1n, 8);
  sup.writeBigUInt64LE(BigInt(nrEntries), 16);
  sup.writeUInt32LE(sectorSize, 24);
  parts.push(sup);
  for (const s of specs) {
    const h = Buffer.alloc(sectorSize);
    if (s.kind === 'write') {
      h.writeBigUInt64LE(BigInt(s.sector), 0);
      h.writeBigUInt64LE(BigInt(s.data.length / sectorSize), 8);
      h.writeBigUInt64LE(BigInt(s.flags), 16);
      parts.push(h, s.data);
    } else if (s.kind === 'discard') {
      h.writeBigUInt64LE(BigInt(s.sector), 0);
      h.writeBigUInt64LE(BigInt(s.nrSectors), 8);
      h.writeBigUInt64LE(BigInt(LOG_DISCARD), 16);
      parts.push(h);
    } else if (s.kind === 'flush') {
      h.writeBigUInt64LE(BigInt(LOG_FLUSH), 16);
      parts.push(h);
    } else {
      const t = Buffer.from(s.text, 'utf8');
      h.writeBigUInt64LE(BigInt(LOG_MARK), 16);
      h.writeBigUInt64LE(BigInt(t.length), 24);
      t.copy(h, 32);
      parts.push(h);
    }
  }
  return Buffer.concat(parts);
}

const DEVICE = 64 * 1024;

function specArb(sectorSize: number): fc.Arbitrary<Spec> {
  const sectors = DEVICE / sectorSize;
  return fc.oneof(
    fc.tuple(fc.integer({ min: 0, max: sectors - 1 }), fc.integer({ min: 1, max: 4 }), fc.integer({ min: 0, max: 255 }), fc.constantFrom(0, LOG_FUA, LOG_FLUSH, LOG_FLUSH | LOG_FUA))
      .map(([sector, n, fill, flags]): Spec => {
        const len = Math.min(n, sectors - sector) * sectorSize;
        const data = Buffer.alloc(len);
        for (let i = 0; i < len; i++) data[i] = (fill + i * 7) & 0xff;
        return { kind: 'write', sector, data, flags };
      }),
    fc.tuple(fc.integer({ min: 0, max: sectors - 1 }), fc.integer({ min: 1, max: 4 }))
      .map(([sector, n]): Spec => ({ kind: 'discard', sector, nrSectors: Math.min(n, sectors - sector) })),
    fc.constant<Spec>({ kind: 'flush' }),
    fc.string({ maxLength: 40 }).map((text): Spec => ({ kind: 'mark', text })),
  );
}

describe('dm-log-writes log reader (tests/vm/log-writes.mjs)', () => {
  it('reads a log laid out byte by byte as in the kernel target (super, header sectors, data, inline mark text)', () => {
    const S = 512;
    const log = Buffer.alloc(S * 6);
    log.write('rhswfsj\0', 0, 'latin1'); // 0x6a736677736872 little-endian
    log.writeUInt8(1, 8); // version 1
    log.writeUInt8(3, 16); // 3 entries
    log.writeUInt16LE(S, 24);
    // entry 0: 2 sectors at sector 5, FUA, data follows
    log.writeUInt8(5, S + 0);
    log.writeUInt8(2, S + 8);
    log.writeUInt8(2, S + 16);
    log.fill(0xab, 2 * S, 4 * S);
    // entry 1: empty FLUSH
    log.writeUInt8(1, 4 * S + 16);
    // entry 2: mark "flush-7"
    log.writeUInt8(8, 5 * S + 16);
    log.writeUInt8(7, 5 * S + 24);
    log.write('flush-7', 5 * S + 32, 'latin1');
    const { sectorSize, entries } = parse(log);
    expect(sectorSize).toBe(S);
    expect(entries.map((e) => [e.sector, e.nrSectors, e.flags, e.offset, e.length, e.dataPos, e.mark])).toEqual([
      [5, 2, LOG_FUA, 5 * S, 2 * S, 2 * S, null],
      [0, 0, LOG_FLUSH, 0, 0, -1, null],
      [0, 0, LOG_MARK, 0, 0, -1, 'flush-7'],
    ]);
    const image = Buffer.alloc(16 * S);
    for (const e of entries) apply(image, log, e);
    expect(image.subarray(5 * S, 7 * S).every((x) => x === 0xab)).toBe(true);
    expect(image.subarray(0, 5 * S).every((x) => x === 0) && image.subarray(7 * S).every((x) => x === 0)).toBe(true);
  });

  it('round trip: parse(encode(entries)) gives the entries back, and replaying them gives the image written directly', () => {
    fc.assert(fc.property(fc.constantFrom(512, 4096).chain((S) => fc.tuple(fc.constant(S), fc.array(specArb(S), { maxLength: 30 }))), ([S, specs]) => {
      const log = encode(S, specs);
      const { sectorSize, entries } = parse(log, { deviceBytes: DEVICE });
      expect(sectorSize).toBe(S);
      expect(entries.length).toBe(specs.length);
      const viaLog = Buffer.alloc(DEVICE, 0x11);
      const direct = Buffer.alloc(DEVICE, 0x11);
      specs.forEach((s, i) => {
        const e = entries[i];
        if (s.kind === 'write') {
          expect([e.sector, e.nrSectors, e.flags, e.mark]).toEqual([s.sector, s.data.length / S, s.flags, null]);
          s.data.copy(direct, s.sector * S);
        } else if (s.kind === 'discard') {
          expect([e.sector, e.nrSectors, e.flags, e.dataPos]).toEqual([s.sector, s.nrSectors, LOG_DISCARD, -1]);
          direct.fill(0, s.sector * S, (s.sector + s.nrSectors) * S);
        } else if (s.kind === 'flush') {
          expect([e.flags, e.length, e.mark]).toEqual([LOG_FLUSH, 0, null]);
        } else {
          expect([e.flags, e.mark]).toEqual([LOG_MARK, s.text]);
        }
        apply(viaLog, log, e);
      });
      expect(viaLog.equals(direct)).toBe(true);
    }), { numRuns: 300 });
  });

  it('a torn write applies exactly the 4 KiB chunks kept', () => {
    fc.assert(fc.property(fc.integer({ min: 0, max: 8 * 8 - 1 }), fc.integer({ min: 1, max: 40 }), fc.array(fc.boolean(), { minLength: 16, maxLength: 16 }), (sector, n, keep) => {
      const S = 512;
      const len = Math.min(n, 128 - sector) * S;
      const data = Buffer.alloc(len, 0xcd);
      const log = encode(S, [{ kind: 'write', sector, data, flags: 0 }]);
      const [e] = parse(log).entries;
      const img = Buffer.alloc(DEVICE);
      const applied = apply(img, log, e, (c) => keep[c]);
      let want = 0;
      for (let off = 0; off < DEVICE; off++) {
        const inside = off >= sector * S && off < sector * S + len;
        const expected = inside && keep[Math.floor(off / 4096)] ? 0xcd : 0;
        if (expected) want++;
        if (img[off] !== expected) return false;
      }
      return applied === want;
    }), { numRuns: 200 });
  });

  it('refuses what is not a whole log with LogWritesError naming the entry: bad magic, version, sector size, truncation, unknown flags, writes past the device', () => {
    const S = 512;
    const good = encode(S, [{ kind: 'write', sector: 0, data: Buffer.alloc(S, 1), flags: 0 }, { kind: 'mark', text: 'm' }]);
    const bad = (mut: (b: Buffer) => Buffer, re: RegExp, opts?: { deviceBytes?: number }) => {
      const b = mut(Buffer.from(good));
      expect(() => parse(b, opts)).toThrow(LogWritesError);
      expect(() => parse(b, opts)).toThrow(re);
    };
    bad((b) => { b[0] ^= 1; return b; }, /bad magic/);
    bad((b) => { b[8] = 2; return b; }, /version 2/);
    bad((b) => { b.writeUInt32LE(1000, 24); return b; }, /sector size 1000/);
    bad((b) => b.subarray(0, S * 2 + 10), /nr_entries 2 cannot fit/);
    bad((b) => { b.writeUInt8(1, 16); return b.subarray(0, S * 2 + 10); }, /entry 0: 1 sectors of data run past the end/);
    bad((b) => b.subarray(0, S * 3), /cannot fit|entry 1 at/);
    bad((b) => { b.writeUInt32LE(64, S + 16); return b; }, /entry 0: unknown flags 0x40/);
    bad((b) => { b.writeUInt32LE(100, S + 24); return b; }, /entry 0: data_len 100 on an entry that is not a mark/);
    bad((b) => { b.writeUInt32LE(5000, 3 * S + 24); return b; }, /entry 1: mark of 5000 bytes/);
    bad((b) => { b.writeUInt32LE(0xffffffff, S + 4); return b; }, /too large|out of range/);
    bad((b) => b, /past the end of the 256-byte device/, { deviceBytes: 256 });
    expect(() => parse(Buffer.alloc(10))).toThrow(/shorter than its super block/);
  });

  it('fuzz: random damage to a log never throws anything but LogWritesError, and what parses stays inside the log and the device', () => {
    const S = 512;
    fc.assert(fc.property(
      fc.array(specArb(S), { minLength: 1, maxLength: 12 }),
      fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 8 }),
      fc.option(fc.nat(), { nil: undefined }),
      (specs, flips, cut) => {
        let log = encode(S, specs);
        // damage the super and the header sectors more than the data
        for (const [at, v] of flips) {
          const pos = at % 3 === 0 ? at % 32 : at % log.length;
          log[pos] = v;
        }
        if (cut !== undefined) log = log.subarray(0, cut % (log.length + 1));
        try {
          const { entries } = parse(log, { deviceBytes: DEVICE });
          const img = Buffer.alloc(DEVICE);
          for (const e of entries) {
            if (e.dataPos >= 0 && e.dataPos + e.length > log.length) return false;
            apply(img, log, e);
          }
        } catch (e) {
          if (!(e instanceof LogWritesError)) throw e;
        }
        return true;
      },
    ), { numRuns: 3000 });
  });
});
