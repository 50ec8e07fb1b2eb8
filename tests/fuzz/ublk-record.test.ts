/**
 * The ublk device record (`<stateDir>/ublk/<name>.json`, src/frontends/ublk/record.ts)
 * is read at every start: a record round-trips through format/parse and
 * through the store on disk; arbitrary or mangled text never throws and
 * never yields a record outside the kernel's limits.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import { UblkRecordStore, formatUblkRecord, parseUblkRecord, type UblkRecord } from '../../src/frontends/ublk/record.js';

const record = fc.record<UblkRecord>({
  devId: fc.integer({ min: 0, max: (1 << 20) - 1 }),
  flags: fc.integer({ min: 0, max: 0x1ff }),
  pid: fc.integer({ min: -1, max: 4_194_304 }),
  queues: fc.integer({ min: 1, max: 4096 }),
  depth: fc.integer({ min: 1, max: 4096 }),
  maxIoBytes: fc.integer({ min: 1, max: 1 << 30 }),
  sizeBytes: fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }),
  blockSize: fc.constantFrom(512, 1024, 2048, 4096),
  readOnly: fc.boolean(),
});

function valid(r: UblkRecord): boolean {
  return r.devId >= 0 && r.devId < 1 << 20 && r.queues >= 1 && r.queues <= 4096 && r.depth >= 1 && r.depth <= 4096
    && r.maxIoBytes >= 1 && r.sizeBytes >= 0 && r.blockSize >= 512 && r.flags >= 0
    && [r.devId, r.flags, r.pid, r.queues, r.depth, r.maxIoBytes, r.sizeBytes, r.blockSize].every(Number.isSafeInteger)
    && typeof r.readOnly === 'boolean';
}

const dirs: string[] = [];
afterAll(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

describe('ublk record codec', () => {
  it('round-trips every valid record', () => {
    fc.assert(fc.property(record, (r) => {
      expect(parseUblkRecord(formatUblkRecord(r))).toEqual(r);
    }), { numRuns: 500 });
  });

  it('never throws on arbitrary text and only returns records within the limits', () => {
    fc.assert(fc.property(fc.oneof(fc.string(), fc.json(), fc.string({ unit: 'binary' })), (text) => {
      const r = parseUblkRecord(text);
      if (r !== null) expect(valid(r)).toBe(true);
    }), { numRuns: 2000 });
  });

  it('rejects records with one field mangled', () => {
    const bad: unknown[] = [-1, 1.5, '3', null, true, 2 ** 60, [], {}];
    fc.assert(fc.property(record, fc.constantFrom('devId', 'flags', 'pid', 'queues', 'depth', 'maxIoBytes', 'sizeBytes', 'blockSize', 'readOnly', 'version'),
      fc.constantFrom(...bad), (r, key, value) => {
        const o = JSON.parse(formatUblkRecord(r)) as Record<string, unknown>;
        o[key] = value;
        const p = parseUblkRecord(JSON.stringify(o));
        if (p !== null) {
          // Only values still within the limits may pass (e.g. pid -1, flags... never a string).
          expect(valid(p)).toBe(true);
          expect(typeof o[key]).toBe(key === 'readOnly' ? 'boolean' : 'number');
        }
      }), { numRuns: 1000 });
    expect(parseUblkRecord('{"version":2,"devId":0}')).toBeNull();
    expect(parseUblkRecord('[]')).toBeNull();
    expect(parseUblkRecord('')).toBeNull();
  });

  it('the store saves, loads, reports an unreadable file and removes', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'dmr-ublk-record-'));
    dirs.push(dir);
    const store = new UblkRecordStore(dir);
    expect(await store.load('d0')).toEqual({ record: null });
    const r: UblkRecord = { devId: 3, flags: 0x98, pid: 1234, queues: 1, depth: 128, maxIoBytes: 524288, sizeBytes: 1 << 28, blockSize: 4096, readOnly: false };
    await store.save('d0', r);
    expect(JSON.parse(readFileSync(join(dir, 'ublk', 'd0.json'), 'utf8'))).toMatchObject({ version: 1, devId: 3 });
    expect(await store.load('d0')).toEqual({ record: r });
    mkdirSync(join(dir, 'ublk'), { recursive: true });
    writeFileSync(join(dir, 'ublk', 'd1.json'), '{"version":1,"devId":"zero"}');
    const bad = await store.load('d1');
    expect(bad.record).toBeNull();
    expect(bad.error).toContain('d1.json is not a ublk device record');
    await store.remove('d0');
    await store.remove('d0'); // idempotent
    expect(await store.load('d0')).toEqual({ record: null });
  });
});
