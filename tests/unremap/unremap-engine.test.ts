/**
 * BlockEngine.unremapBlocks (issue 6, retiring remaps after the main disk
 * was replaced): the data comes back to main identical, client reads and
 * writes running during the retirement are never lost nor served stale,
 * and a main that still fails writes keeps its block remapped, named with
 * its errno.
 */
import { closeSync, openSync, readSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { allocAligned } from '../../src/native/backing.js';
import { BS, captureLogger, offlineState, open, randomBlocks, readBack, sparseFile, tempDir } from '../engine/fixtures.js';
import { cleanupAll, makeTempDir, requireTools, startFaultDisk, type FaultDisk } from '../helpers/faultdisk.js';

const BLOCKS = 1024;

function readMain(path: string, block: number, count = 1): Buffer {
  const fd = openSync(path, 'r');
  try {
    const b = Buffer.alloc(count * BS);
    readSync(fd, b, 0, b.length, block * BS);
    return b;
  } finally {
    closeSync(fd);
  }
}

async function write(e: Awaited<ReturnType<typeof open>>, block: number, data: Buffer): Promise<void> {
  const buf = allocAligned(data.length);
  buf.set(data);
  await e.submit({ op: 'write', offset: block * BS, length: data.length, buffer: buf });
}

describe('unremap (engine)', () => {
  const t = tempDir('unremap');
  afterAll(() => t.cleanup());

  it.each([['a spare file', false], ['a spare tail of main', true]])('copies remapped blocks back to main (%s): data identical through the engine, on main, and after reopening; spare blocks freed', async (_what, tail) => {
    const mainPath = sparseFile(join(t.dir, `m1-${String(tail)}.img`), BLOCKS * BS + (tail ? 8 << 20 : 0));
    const sparePath = tail ? mainPath : sparseFile(join(t.dir, 's1.img'), 8 << 20);
    const where = tail ? { spareTailBytes: 8 << 20 } : { sparePath };
    const e = await open({ mainPath, ...where, format: true });
    expect(e.blocks).toBe(BLOCKS);
    const expected = randomBlocks(BLOCKS);
    await write(e, 0, expected);
    const remapped = [0, 1, 2, 17, 100, 101, 500, BLOCKS - 1];
    expect((await e.remapBlocks(remapped)).every((r) => r.result === 'remapped')).toBe(true);
    // New data for some remapped blocks: it lands on the spare only.
    const fresh = randomBlocks(3);
    await write(e, 1, fresh.subarray(0, BS));
    await write(e, 500, fresh.subarray(BS, 2 * BS));
    await write(e, BLOCKS - 1, fresh.subarray(2 * BS));
    expected.set(fresh.subarray(0, BS), 1 * BS);
    expected.set(fresh.subarray(BS, 2 * BS), 500 * BS);
    expected.set(fresh.subarray(2 * BS), (BLOCKS - 1) * BS);
    expect(readMain(mainPath, 1).equals(expected.subarray(BS, 2 * BS))).toBe(false);

    const some = await e.unremapBlocks([1, 500, 3, 1]);
    expect(some.map((r) => r.result)).toEqual(['unremapped', 'unremapped', 'not-remapped', 'unremapped']);
    expect(e.status().remappedBlocks).toBe(remapped.length - 2);
    const rest = await e.unremapBlocks('all');
    expect(rest.map((r) => [r.block, r.result])).toEqual([0, 2, 17, 100, 101, BLOCKS - 1].map((b) => [b, 'unremapped']));
    const st = e.status();
    expect([st.remappedBlocks, st.spareBlocksUsed]).toEqual([0, 0]);
    expect((await readBack(e, 0, BLOCKS * BS)).equals(expected)).toBe(true);
    for (const b of remapped) expect(readMain(mainPath, b).equals(expected.subarray(b * BS, (b + 1) * BS))).toBe(true);
    expect((await e.unremapBlocks([BLOCKS + 5]))[0]).toMatchObject({ result: 'failed', errno: 22 });
    await e.close();
    const off = await offlineState(sparePath, tail ? { areaOffset: BLOCKS * BS } : {});
    expect(off.state.remaps.size).toBe(0);
    const e2 = await open({ mainPath, ...where });
    expect(e2.status().remappedBlocks).toBe(0);
    expect((await readBack(e2, 0, BLOCKS * BS)).equals(expected)).toBe(true);
    // The freed spare blocks are handed out again.
    expect((await e2.remapBlocks([9]))[0].result).toBe('remapped');
    await e2.close();
  });

  it('client writes and reads running during the retirement are never lost nor stale', async () => {
    const mainPath = sparseFile(join(t.dir, 'm2.img'), BLOCKS * BS);
    const sparePath = sparseFile(join(t.dir, 's2.img'), 8 << 20);
    const e = await open({ mainPath, sparePath, format: true });
    const expected = randomBlocks(BLOCKS);
    await write(e, 0, expected);
    const remapped = Array.from({ length: 400 }, (_, i) => i * 2);
    expect((await e.remapBlocks(remapped)).every((r) => r.result === 'remapped')).toBe(true);
    // Retire in small groups while a client keeps rewriting and reading the remapped blocks.
    const retiring = e.unremapBlocks('all', { groupSize: 16 });
    let done = false;
    void retiring.finally(() => { done = true; });
    let seq = 0;
    const client = async (lane: number): Promise<number> => {
      let n = 0;
      while (!done || n < 20) {
        const b = remapped[(lane * 7919 + n * 104729) % remapped.length];
        const data = Buffer.alloc(2 * BS, (++seq) & 0xff);
        data.writeUInt32LE(seq, 0);
        data.writeUInt32LE(b, 4);
        // Two blocks: a remapped one and its (never remapped) neighbour, so requests straddle the fence.
        await write(e, b, data);
        expected.set(data, b * BS);
        const back = await readBack(e, b * BS, 2 * BS);
        expect(back.equals(expected.subarray(b * BS, (b + 2) * BS))).toBe(true);
        n++;
      }
      return n;
    };
    const counts = await Promise.all([client(0), client(1), client(2), client(3)]);
    const results = await retiring;
    expect(results.every((r) => r.result === 'unremapped' || r.result === 'not-remapped')).toBe(true);
    expect(counts.reduce((a, b) => a + b, 0)).toBeGreaterThanOrEqual(80);
    expect(e.status().remappedBlocks).toBe(0);
    expect((await readBack(e, 0, BLOCKS * BS)).equals(expected)).toBe(true);
    await e.close();
    expect(readMain(mainPath, 0, BLOCKS).equals(expected)).toBe(true);
  });
});

describe('unremap on a main that still fails writes (fault disk)', () => {
  requireTools('nbdkit', 'nbdkit-python', 'nbdfuse', 'fusermount3', '/dev/fuse');
  let dir: string;
  let disk: FaultDisk;
  beforeAll(async () => {
    dir = await makeTempDir('dmr-unremap-fault');
    disk = await startFaultDisk({ dir, name: 'main', sizeBytes: 4 << 20 });
  });
  afterAll(async () => {
    await cleanupAll();
  });

  it('the block whose write fails stays remapped (served from the spare) and is named with EIO; a rerun finishes it', async () => {
    const sparePath = sparseFile(join(dir, 'spare.img'), 4 << 20);
    const { logger, lines } = captureLogger();
    const e = await open({ mainPath: disk.path, sparePath, format: true, logger });
    const expected = randomBlocks(16);
    await write(e, 0, expected);
    expect((await e.remapBlocks([3, 4, 5])).every((r) => r.result === 'remapped')).toBe(true);
    await disk.setBad({ write: [[4 * BS, BS]] });
    const r = await e.unremapBlocks('all');
    expect(r.map((x) => [x.block, x.result])).toEqual([[3, 'unremapped'], [4, 'failed'], [5, 'unremapped']]);
    const f = r[1] as { errno: number; reason: string; spare?: number };
    expect(f.errno).toBe(5);
    expect(f.reason).toContain('block 4: writing it back to main');
    expect(f.reason).toContain('(EIO); it stays remapped');
    expect(lines.some((l) => l.event === 'unremap-failed' && l.block === 4 && l.errno === 'EIO')).toBe(true);
    expect(e.status().remappedBlocks).toBe(1);
    expect(e.lookup(4)).toBe(f.spare);
    // Block 4 is still read from the spare: unreadable on main now, still served.
    await disk.setBad({ write: [[4 * BS, BS]], read: [[4 * BS, BS]] });
    expect((await readBack(e, 0, 16 * BS)).equals(expected)).toBe(true);
    // The disk was fixed: a rerun retires the rest.
    await disk.setBad({});
    expect((await e.unremapBlocks('all')).map((x) => [x.block, x.result])).toEqual([[4, 'unremapped']]);
    expect((await readBack(e, 0, 16 * BS)).equals(expected)).toBe(true);
    await e.close();
  });
});

describe('unremap with a failing spare (fault disk)', () => {
  requireTools('nbdkit', 'nbdkit-python', 'nbdfuse', 'fusermount3', '/dev/fuse');
  let dir: string;
  let spare: FaultDisk;
  beforeAll(async () => {
    dir = await makeTempDir('dmr-unremap-spare');
    spare = await startFaultDisk({ dir, name: 'spare', sizeBytes: 4 << 20 });
  });
  afterAll(async () => {
    await cleanupAll();
  });

  it('a block whose spare block cannot be read stays remapped, named with EIO; one already lost (pending) is left pending', async () => {
    const mainPath = sparseFile(join(dir, 'main.img'), 64 * BS);
    const e = await open({ mainPath, sparePath: spare.path, format: true });
    const expected = randomBlocks(8);
    await write(e, 0, expected);
    expect((await e.remapBlocks([1, 2, 3])).every((r) => r.result === 'remapped')).toBe(true);
    // Block 2's spare block fails reads now: the retirement cannot copy it.
    await spare.setBad({ read: [[e.spareOffset(e.lookup(2)), BS]] });
    const r = await e.unremapBlocks('all');
    expect(r.map((x) => [x.block, x.result])).toEqual([[1, 'unremapped'], [2, 'failed'], [3, 'unremapped']]);
    expect(r[1]).toMatchObject({ errno: 5 });
    expect((r[1] as { reason: string }).reason).toMatch(/^block 2: reading spare block \d+ failed \(EIO\); it stays remapped$/);
    // A client read finds it unreadable too: spare block bad, block pending (EIO).
    await expect(readBack(e, 2 * BS, BS)).rejects.toMatchObject({ errno: 5 });
    expect(e.isPending(2)).toBe(true);
    const again = await e.unremapBlocks([2]);
    expect(again[0]).toMatchObject({ block: 2, result: 'failed', errno: 5 });
    expect((again[0] as { reason: string }).reason).toContain('is bad and the block is pending (unreadable until rewritten); it stays remapped');
    // Its neighbours came back from main intact.
    expect((await readBack(e, BS, BS)).equals(expected.subarray(BS, 2 * BS))).toBe(true);
    expect((await readBack(e, 3 * BS, BS)).equals(expected.subarray(3 * BS, 4 * BS))).toBe(true);
    expect(readMain(mainPath, 3).equals(expected.subarray(3 * BS, 4 * BS))).toBe(true);
    await e.close();
  });
});
