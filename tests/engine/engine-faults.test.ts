import { afterAll, beforeAll, beforeEach, afterEach, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { readdirSync } from 'node:fs';
import { startFaultDisk, requireTools, type FaultDisk } from '../helpers/faultdisk.js';
import { BS, captureLogger, offlineState, open, pattern, readBack, sparseFile, tempDir } from './fixtures.js';

requireTools('nbdkit', 'nbdkit-python', 'nbdfuse', 'fusermount3', '/dev/fuse');

const MAIN_BYTES = 64 * 1024 * 1024;
const range = (firstBlock: number, blocks: number): [number, number] => [firstBlock * BS, blocks * BS];

describe('engine over a faulty main (nbdkit + nbdfuse)', () => {
  let dir: string;
  let cleanup: () => void;
  let disk: FaultDisk;
  let sparePath: string;
  beforeAll(async () => {
    ({ dir, cleanup } = tempDir('faults'));
    disk = await startFaultDisk({ dir, name: 'main', sizeBytes: MAIN_BYTES });
  });
  afterAll(async () => {
    await disk?.stop();
    cleanup();
  });
  let n = 0;
  beforeEach(async () => {
    sparePath = sparseFile(join(dir, `spare${n++}.img`), 32 * 1024 * 1024);
    await disk.setBad({});
  });

  it('a write over bad blocks succeeds: exactly the bad blocks move, data reads back, remaps persist', async () => {
    const { logger, lines } = captureLogger();
    const e = await open({ mainPath: disk.path, sparePath, format: true, logger });
    await disk.setBad({ read: [range(100, 4)], write: [range(100, 4)] });
    const w = pattern(16, 21);
    await e.submit({ op: 'write', offset: 96 * BS, length: 16 * BS, buffer: w });
    const st = e.status();
    expect(st.remappedBlocks).toBe(4);
    expect(st.stats.autoRemaps).toBe(4);
    expect(st.stats.writeErrors).toBeGreaterThan(0);
    for (let b = 96; b < 112; b++) expect(e.lookup(b) >= 0).toBe(b >= 100 && b < 104);
    expect((await readBack(e, 96 * BS, 16 * BS)).equals(w)).toBe(true);
    const remapLog = lines.filter((l) => l.event === 'remap');
    expect(remapLog.map((l) => l.block)).toEqual([100, 101, 102, 103]);
    expect(remapLog.every((l) => l.device === 'test' && l.reason === 'write-error')).toBe(true);
    await e.close();
    const off = await offlineState(sparePath);
    expect(off.doubleMapped).toEqual([]);
    expect(off.state.remaps.size).toBe(4);
    const e2 = await open({ mainPath: disk.path, sparePath });
    expect((await readBack(e2, 96 * BS, 16 * BS)).equals(w)).toBe(true);
    await e2.close();
  });

  it('an unreadable block gives EIO, becomes pending (persisted), and its next write remaps it', async () => {
    const e = await open({ mainPath: disk.path, sparePath, format: true });
    await disk.setBad({ read: [range(300, 1)] });
    const b = pattern(4, 0);
    const err = await e.submit({ op: 'read', offset: 298 * BS, length: 4 * BS, buffer: b }).catch((x: unknown) => x);
    expect(err).toMatchObject({ code: 'EIO', context: { block: 300, device: 'test', op: 'read' } });
    expect(e.isPending(300)).toBe(true);
    expect(e.isPending(299)).toBe(false);
    // DISCARD does not clear pending
    await e.submit({ op: 'discard', offset: 300 * BS, length: BS });
    expect(e.isPending(300)).toBe(true);
    await e.close();
    expect((await offlineState(sparePath)).state.pending.has(300)).toBe(true);

    const e2 = await open({ mainPath: disk.path, sparePath });
    expect(e2.isPending(300)).toBe(true);
    const writesBefore = (await disk.stats()).writes;
    const w = pattern(1, 5);
    await e2.submit({ op: 'write', offset: 300 * BS, length: BS, buffer: w });
    // it went straight to the spare: main saw no write
    expect((await disk.stats()).writes).toBe(writesBefore);
    expect(e2.isPending(300)).toBe(false);
    expect(e2.lookup(300)).toBeGreaterThanOrEqual(0);
    expect((await readBack(e2, 300 * BS, BS)).equals(w)).toBe(true);
    await e2.close();
  });

  it('write-zeroes over a bad block remaps it with zeroes', async () => {
    const e = await open({ mainPath: disk.path, sparePath, format: true });
    await e.submit({ op: 'write', offset: 400 * BS, length: 4 * BS, buffer: pattern(4, 8) });
    await disk.setBad({ write: [range(401, 1)], read: [range(401, 1)] });
    await e.submit({ op: 'writeZeroes', offset: 400 * BS, length: 4 * BS });
    expect(e.lookup(401)).toBeGreaterThanOrEqual(0);
    expect((await readBack(e, 400 * BS, 4 * BS)).every((x) => x === 0)).toBe(true);
    await e.close();
  });

  it('concurrent writers and readers of one bad block: one remap, no good spare block condemned', async () => {
    const e = await open({ mainPath: disk.path, sparePath, format: true });
    await disk.setBad({ read: [range(500, 1)], write: [range(500, 1)] });
    const writes = Array.from({ length: 8 }, (_, i) => pattern(1, 100 + i));
    const reads = Array.from({ length: 8 }, () => e.submit({ op: 'read', offset: 500 * BS, length: BS, buffer: pattern(1, 0) }).then(() => 'ok', (x: { code: string }) => x.code));
    const done = await Promise.all(writes.map((w) => e.submit({ op: 'write', offset: 500 * BS, length: BS, buffer: w })));
    expect(done).toHaveLength(8);
    for (const r of await Promise.all(reads)) expect(['ok', 'EIO']).toContain(r);
    const st = e.status();
    expect(st.remappedBlocks).toBe(1);
    expect(st.badSpareBlocks).toBe(0);
    expect(st.spareBlocksUsed).toBe(1);
    expect(e.isPending(500)).toBe(false);
    const got = await readBack(e, 500 * BS, BS);
    expect(writes.some((w) => w.equals(got))).toBe(true);
    await e.close();
    const off = await offlineState(sparePath);
    expect(off.state.pending.has(500)).toBe(false);
    expect(off.doubleMapped).toEqual([]);
  });

  it('the remap-rate breaker fails the device instead of burning the spare', async () => {
    const { logger, lines } = captureLogger();
    const e = await open({ mainPath: disk.path, sparePath, format: true, logger, breaker: { maxRemaps: 8, windowMs: 60_000 } });
    await disk.setBad({ write: [range(1000, 64)] });
    const err = await e.submit({ op: 'write', offset: 1000 * BS, length: 64 * BS, buffer: pattern(64, 1) }).catch((x: unknown) => x);
    expect(err).toMatchObject({ code: 'EIO' });
    const st = e.status();
    expect(st.state).toBe('failed');
    expect(st.breakerTripped).toBe(true);
    expect(st.spareBlocksUsed).toBe(0);
    expect(st.failReason).toMatch(/remap rate/);
    expect(lines.some((l) => l.event === 'device-failed')).toBe(true);
    // reads still work; writes are refused with a clear error
    await readBack(e, 0, BS);
    await expect(e.submit({ op: 'write', offset: 0, length: BS, buffer: pattern(1, 1) })).rejects.toThrow(/device has failed/);
    await e.close();
  });
});

describe('engine over a faulty spare', () => {
  let dir: string;
  let cleanup: () => void;
  let spare: FaultDisk;
  let mainPath: string;
  beforeAll(async () => {
    ({ dir, cleanup } = tempDir('sparefaults'));
    spare = await startFaultDisk({ dir, name: 'spare', sizeBytes: 32 * 1024 * 1024 });
  });
  afterAll(async () => {
    await spare?.stop();
    cleanup();
  });
  let n = 0;
  beforeEach(async () => {
    mainPath = sparseFile(join(dir, `main${n++}.img`), MAIN_BYTES);
    // a blank spare for each test: the plugin reads the image on every request
    sparseFile(spare.backingFile, 32 * 1024 * 1024);
    await spare.setBad({});
    await spare.setHang(false);
  });

  it('a spare block that fails a write is marked bad (persisted) and another one is used', async () => {
    const e = await open({ mainPath, sparePath: spare.path, format: true });
    await spare.setBad({ write: [[e.spareOffset(0), BS], [e.spareOffset(1), BS]] });
    const w = pattern(1, 77);
    await e.submit({ op: 'write', offset: 50 * BS, length: BS, buffer: w });
    const r = await e.remapBlocks([50]);
    expect(r[0]).toMatchObject({ result: 'remapped', spare: 2 });
    expect(e.status().badSpareBlocks).toBe(2);
    expect((await readBack(e, 50 * BS, BS)).equals(w)).toBe(true);
    await e.close();
    const off = await offlineState(spare.path);
    expect([...off.state.badSpare].sort()).toEqual([0, 1]);
    expect(off.state.remaps.get(50)?.spare).toBe(2);
  });

  it('a read error on a spare-mapped block: EIO, spare block bad, block pending, next write moves it', async () => {
    const e = await open({ mainPath, sparePath: spare.path, format: true });
    await e.remapBlocks([60]);
    const s = e.lookup(60);
    await spare.setBad({ read: [[e.spareOffset(s), BS]] });
    await expect(readBack(e, 60 * BS, BS)).rejects.toMatchObject({ code: 'EIO' });
    expect(e.isPending(60)).toBe(true);
    expect(e.status().badSpareBlocks).toBe(1);
    const w = pattern(1, 3);
    await e.submit({ op: 'write', offset: 60 * BS, length: BS, buffer: w });
    expect(e.lookup(60)).not.toBe(s);
    expect(e.isPending(60)).toBe(false);
    expect((await readBack(e, 60 * BS, BS)).equals(w)).toBe(true);
    await e.close();
  });

  it('a hung metadata area: the commit fails after the configured timeout, close is bounded, late writes leave a valid state', async () => {
    const e = await open({ mainPath, sparePath: spare.path, format: true, metadataTimeoutMs: 800 });
    await e.remapBlocks([20]);
    const { layout } = (await offlineState(spare.path)).metadata;
    const journalBytes = layout.journalBlocks * 4096;
    // only the journal regions of both copies hang: the data write and its
    // sync go through, so what times out is the commit itself
    await spare.setHang(true, { writesOnly: true, ranges: layout.copies.map((c) => [c.journal, journalBytes] as [number, number]) });
    const w = pattern(1, 9);
    await e.submit({ op: 'write', offset: 21 * BS, length: BS, buffer: w });
    const t0 = Date.now();
    const r = await e.remapBlocks([21]);
    const took = Date.now() - t0;
    expect(r[0]).toMatchObject({ result: 'failed', errno: 5 });
    expect((r[0] as { reason: string }).reason).toMatch(/metadata commit failed \(ETIMEDOUT\)/);
    expect(took).toBeGreaterThanOrEqual(700);
    expect(took).toBeLessThan(2500);
    expect(e.lookup(21)).toBe(-1);
    expect(e.status().quarantinedSpareBlocks).toBe(1);
    expect(e.status().stats.commitFailures).toBe(1);
    const c0 = Date.now();
    const report = await e.close(800);
    expect(Date.now() - c0).toBeLessThan(1800);
    expect(report.metadataAborted).toBe(true);
    await spare.setHang(false);
    await new Promise((res) => setTimeout(res, 300));
    const off = await offlineState(spare.path);
    expect(off.doubleMapped).toEqual([]);
    const e2 = await open({ mainPath, sparePath: spare.path });
    expect(e2.lookup(20)).toBeGreaterThanOrEqual(0);
    // block 21 is either on main or (the late commit landed) on its spare block, with its data either way
    expect((await readBack(e2, 21 * BS, BS)).equals(w)).toBe(true);
    await e2.remapBlocks([22, 23]);
    const used = new Set([20, 21, 22, 23].map((b) => e2.lookup(b)).filter((x) => x >= 0));
    expect(used.size).toBe([20, 21, 22, 23].filter((b) => e2.lookup(b) >= 0).length);
    await e2.close();
  });

  it('a hung spare: the remap fails after the timeout, close is bounded, nothing leaks, late writes leave a valid state', async () => {
    const fdsBefore = readdirSync('/proc/self/fd').length;
    const resBefore = process.getActiveResourcesInfo().filter((r) => r !== 'TTYWrap').length;
    const e = await open({ mainPath, sparePath: spare.path, format: true, metadataTimeoutMs: 1000 });
    await e.remapBlocks([10]);
    await spare.setHang(true, { writesOnly: true });
    const t0 = Date.now();
    const r = await e.remapBlocks([11]);
    const took = Date.now() - t0;
    expect(r[0]).toMatchObject({ result: 'failed', errno: 5 });
    expect((r[0] as { reason: string }).reason).toMatch(/timed out after 1000 ms/);
    expect(took).toBeGreaterThanOrEqual(900);
    expect(took).toBeLessThan(3000);
    expect(e.status().quarantinedSpareBlocks).toBe(1);
    // a write that needs a remap while the spare hangs: bounded too
    const c0 = Date.now();
    const report = await e.close(1000);
    expect(Date.now() - c0).toBeLessThan(2000);
    expect(report.elapsedMs).toBeLessThan(2000);
    expect(readdirSync('/proc/self/fd').length).toBe(fdsBefore);
    expect(process.getActiveResourcesInfo().filter((x) => x !== 'TTYWrap').length).toBeLessThanOrEqual(resBefore);
    // let the late writes land, then reopen: valid, no spare block mapped twice
    await spare.setHang(false);
    await new Promise((res) => setTimeout(res, 300));
    const off = await offlineState(spare.path);
    expect(off.doubleMapped).toEqual([]);
    expect(off.state.remaps.has(10)).toBe(true);
    const e2 = await open({ mainPath, sparePath: spare.path });
    expect(e2.lookup(10)).toBeGreaterThanOrEqual(0);
    await e2.remapBlocks([12]);
    expect(e2.lookup(12)).not.toBe(e2.lookup(10));
    await e2.close();
  });
});
