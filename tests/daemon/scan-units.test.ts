/**
 * The pure parts of scan and scrub: the --range parser/resolver and the
 * token bucket's accounting (property tests with fast-check), and the
 * exit code of a finished scan job.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { parseScanRange, resolveScanRange } from '../../src/cli/scan-range.js';
import { scanExitCode, EXIT_INTERRUPTED } from '../../src/cli/cmd-scan.js';
import { TokenBucket } from '../../src/daemon/token-bucket.js';
import type { ScanSnapshot } from '../../src/daemon/scan.js';

const UNITS = ['K', 'M', 'G', 'T'] as const;
const MULT = { K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 };

describe('scan --range', () => {
  it('block numbers are [A, B) in blocks; "A-" runs to the end', () => {
    expect(resolveScanRange(parseScanRange('100-200'), '100-200', 4096, 8192)).toEqual({ startBlock: 100, endBlock: 200 });
    expect(resolveScanRange(parseScanRange('100-'), '100-', 4096, 8192)).toEqual({ startBlock: 100, endBlock: 8192 });
    expect(resolveScanRange(parseScanRange('0-8192'), '0-8192', 4096, 8192)).toEqual({ startBlock: 0, endBlock: 8192 });
  });

  it('sizes with suffixes are byte offsets on block boundaries', () => {
    expect(resolveScanRange(parseScanRange('4M-8M'), '4M-8M', 4096, 8192)).toEqual({ startBlock: 1024, endBlock: 2048 });
    expect(resolveScanRange(parseScanRange('1KiB-4k'), '1KiB-4k', 512, 100)).toEqual({ startBlock: 2, endBlock: 8 });
    expect(resolveScanRange(parseScanRange('0-1G'), '0-1G', 4096, 1 << 18)).toEqual({ startBlock: 0, endBlock: 1 << 18 });
    expect(() => resolveScanRange(parseScanRange('1K-8K'), '1K-8K', 4096, 8192)).toThrow(/"1K-8K": byte offset 1024 is not a multiple of the 4096-byte block size/);
  });

  it('reversed, empty and out-of-range ranges are refused, naming the range', () => {
    expect(() => resolveScanRange(parseScanRange('200-100'), '200-100', 4096, 8192)).toThrow(/range "200-100" is reversed/);
    expect(() => resolveScanRange(parseScanRange('5-5'), '5-5', 4096, 8192)).toThrow(/range "5-5" is empty/);
    expect(() => resolveScanRange(parseScanRange('0-8193'), '0-8193', 4096, 8192)).toThrow(/range "0-8193" ends at block 8193, past the end of the device \(8192 blocks of 4096 bytes\)/);
    expect(() => resolveScanRange(parseScanRange('9000-'), '9000-', 4096, 8192)).toThrow(/range "9000-" starts at block 9000, past the end/);
  });

  it('bad syntax is a RangeError naming the text', () => {
    for (const bad of ['', '-', '-5', '5', '1-2-3', 'a-b', '1.5-2', '1X-2', '1 - 2', '0x10-0x20', '99999999999999999999-', '1P-2P']) {
      expect(() => parseScanRange(bad), bad).toThrow(RangeError);
    }
    expect(() => parseScanRange('1-2-3')).toThrow(/range "1-2-3" must be START-END or START-/);
    expect(() => parseScanRange('a-5')).toThrow(/range "a-5": "a" is neither a block number nor a size/);
  });

  it('property: any well-formed bound pair parses back to what was written, and resolving checks the device', () => {
    const bound = fc.oneof(
      fc.oneof(fc.nat({ max: 6000 }), fc.nat({ max: 2 ** 30 })).map((n) => ({ text: String(n), blocks: (_bs: number) => n, bytes: null as number | null })),
      fc.tuple(fc.nat({ max: 4096 }), fc.constantFrom(...UNITS), fc.constantFrom('', 'B', 'iB', 'ib')).map(([n, u, tail]) => {
        const bytes = n * MULT[u];
        return { text: `${n}${u}${tail}`, blocks: (bs: number) => bytes / bs, bytes };
      }),
    );
    fc.assert(fc.property(bound, fc.option(bound), fc.constantFrom(512, 4096), fc.oneof(fc.nat({ max: 5000 }), fc.nat({ max: 2 ** 31 })), (a, b, bs, blocks) => {
      const text = `${a.text}-${b?.text ?? ''}`;
      const p = parseScanRange(text);
      expect(p.start.kind).toBe(a.bytes === null ? 'block' : 'byte');
      expect(p.end === null).toBe(b === null);
      let r: { startBlock: number; endBlock: number } | null = null;
      let err: unknown = null;
      try {
        r = resolveScanRange(p, text, bs, blocks);
      } catch (e) {
        err = e;
      }
      const s = a.blocks(bs);
      const e = b === null ? blocks : b.blocks(bs);
      const ok = Number.isInteger(s) && Number.isInteger(e) && s < e && e <= blocks && s < blocks;
      if (ok) expect(r).toEqual({ startBlock: s, endBlock: e });
      else {
        expect(err).toBeInstanceOf(RangeError);
        expect((err as Error).message).toContain(`"${text}"`);
      }
    }), { numRuns: 2000 });
  });
});

describe('TokenBucket', () => {
  it('the first chunk up to the burst is free; then a take waits for its debt', () => {
    const b = new TokenBucket(1000, 500, 0);
    expect(b.take(500, 0)).toBe(0);
    expect(b.take(250, 0)).toBe(250); // 250 bytes of debt at 1000 B/s
    expect(b.waitedMs).toBe(250);
    expect(b.throttled).toBe(1);
    expect(b.available(250)).toBeCloseTo(0);
    expect(b.available(10_000)).toBe(500); // refills up to the burst only
  });

  it('property: a caller that waits as told never gets more than burst + rate x time, and waits no longer than needed', () => {
    const op = fc.record({ bytes: fc.integer({ min: 1, max: 4 << 20 }), work: fc.nat({ max: 2000 }) });
    fc.assert(fc.property(
      fc.integer({ min: 1, max: 64 << 20 }), fc.integer({ min: 1, max: 8 << 20 }), fc.array(op, { minLength: 1, maxLength: 60 }),
      (rate, burst, ops) => {
        const t0 = 1_000_000;
        let now = t0;
        const b = new TokenBucket(rate, burst, now);
        let granted = 0;
        let waited = 0;
        for (const o of ops) {
          now += o.work; // time the caller spends reading
          const before = b.available(now);
          const w = b.take(o.bytes, now);
          expect(w).toBeGreaterThanOrEqual(0);
          // No wait when the tokens cover the take; otherwise exactly the debt (rounded up to a ms).
          if (before >= o.bytes) expect(w).toBe(0);
          else expect(w).toBe(Math.ceil(((o.bytes - before) * 1000) / rate));
          now += w;
          waited += w;
          granted += o.bytes;
          // Once the wait is over the bucket is out of debt (give or take float rounding) ...
          expect(b.available(now)).toBeGreaterThanOrEqual(-1e-6 * Math.max(1, granted));
          // ... so what went out is bounded by the burst plus the rate over the time passed.
          expect(granted).toBeLessThanOrEqual(burst + (rate * (now - t0)) / 1000 + 1e-6 * granted);
        }
        expect(b.granted).toBe(granted);
        expect(b.waitedMs).toBe(waited);
      },
    ), { numRuns: 1000 });
  });

  it('refuses a rate or burst that is not a positive number', () => {
    expect(() => new TokenBucket(0, 1, 0)).toThrow(RangeError);
    expect(() => new TokenBucket(Number.NaN, 1, 0)).toThrow(RangeError);
    expect(() => new TokenBucket(1, -1, 0)).toThrow(RangeError);
    expect(() => new TokenBucket(Infinity, 1, 0)).toThrow(RangeError);
  });
});

describe('scan exit codes', () => {
  const base: ScanSnapshot = {
    jobId: 'scan-1', kind: 'scan', device: 'd', state: 'done', pauseReason: null, blockSize: 4096, startBlock: 0, endBlock: 10, nextBlock: 10,
    blocksDone: 10, blocksTotal: 10, bytesDone: 40960, percent: 100, startedAt: '', finishedAt: '', elapsedMs: 1, pausedMs: 0,
    rateBytesPerSec: 1, etaMs: 0, limitBytesPerSec: null, throttledMs: 0, throttledChunks: 0, unreadable: 0, unreadableBlocks: [],
    pending: 0, remapUnreadable: null, zeroed: 0, remapFailed: [], cancelReason: null, error: null,
  };
  it('0 clean; 1 unreadable blocks left pending, a failure or a cancel by someone else; 130 after Ctrl-C; 0 when every unreadable block was zeroed', () => {
    expect(scanExitCode(base, false)).toBe(0);
    expect(scanExitCode({ ...base, unreadable: 2, unreadableBlocks: [3, 4], pending: 2 }, false)).toBe(1);
    expect(scanExitCode({ ...base, unreadable: 2, unreadableBlocks: [3, 4], remapUnreadable: 'zero', zeroed: 2 }, false)).toBe(0);
    expect(scanExitCode({ ...base, unreadable: 2, remapUnreadable: 'zero', zeroed: 1, remapFailed: [{ block: 4, errno: 28, reason: 'x' }] }, false)).toBe(1);
    expect(scanExitCode({ ...base, state: 'failed' }, false)).toBe(1);
    expect(scanExitCode({ ...base, state: 'cancelled' }, false)).toBe(1);
    expect(scanExitCode({ ...base, state: 'cancelled' }, true)).toBe(EXIT_INTERRUPTED);
  });
});
