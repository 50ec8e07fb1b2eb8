import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { startFaultDisk, requireTools, type FaultDisk } from '../helpers/faultdisk.js';
import { BS, captureLogger, offlineState, open, pattern, readBack, sparseFile, tempDir } from './fixtures.js';

requireTools('nbdkit', 'nbdkit-python', 'nbdfuse', 'fusermount3', '/dev/fuse');

const MAIN_BYTES = 64 * 1024 * 1024;
const BLOCKS = MAIN_BYTES / BS;
const whole: [number, number] = [0, MAIN_BYTES];

/**
 * A main that fails everything with EIO (what a dm table swapped for
 * `error` by `dmsetup remove --force`, or a dead disk, looks like) must not
 * burn the spare block by block nor fill the metadata with pending blocks:
 * the engine probes main before it remaps or marks, and fails the device.
 * A bad region on a main that still answers is remapped as before.
 */
describe('a main that fails everything: no remap storm, the device fails', () => {
  let dir: string;
  let cleanup: () => void;
  let disk: FaultDisk;
  let n = 0;
  let sparePath: string;
  beforeAll(async () => {
    ({ dir, cleanup } = tempDir('deadmain'));
    disk = await startFaultDisk({ dir, name: 'main', sizeBytes: MAIN_BYTES });
  });
  afterAll(async () => {
    await disk?.stop();
    cleanup();
  });
  beforeEach(async () => {
    sparePath = sparseFile(join(dir, `spare${n++}.img`), 32 * 1024 * 1024);
    await disk.setBad({});
  });

  it('writes: 64 concurrent writes to a main that fails every read and write remap nothing; the device fails naming main, the block, the errno and the probes', async () => {
    const { logger, lines } = captureLogger();
    const e = await open({ mainPath: disk.path, sparePath, format: true, logger });
    await e.submit({ op: 'write', offset: 500 * BS, length: BS, buffer: pattern(1, 1) }); // main worked once
    await disk.setBad({ read: [whole], write: [whole] });
    const results = await Promise.allSettled(Array.from({ length: 64 }, (_, i) =>
      e.submit({ op: 'write', offset: ((i * 97) % BLOCKS) * BS, length: BS, buffer: pattern(1, i + 2) })));
    const st = e.status();
    console.log(`[dead main] writes: ${results.filter((r) => r.status === 'rejected').length}/64 failed, remapped ${st.remappedBlocks}, pending ${st.pendingBlocks}, state ${st.state}: ${st.failReason}`);
    expect(results.every((r) => r.status === 'rejected')).toBe(true);
    expect(st.remappedBlocks).toBe(0);
    expect(st.pendingBlocks).toBe(0);
    expect(st.spareBlocksUsed).toBe(0);
    expect(st.state).toBe('failed');
    expect(st.failReason).toMatch(new RegExp(`main ${disk.path} failed a write of block \\d+ \\(EIO\\) and every probe read too \\(block 500: EIO, block \\d+: EIO`));
    expect(lines.some((l) => l.event === 'device-failed' && l.device === 'test')).toBe(true);
    expect(lines.filter((l) => l.event === 'remap')).toEqual([]);
    // Later writes are refused at once; reads still try main.
    await expect(e.submit({ op: 'write', offset: 7 * BS, length: BS, buffer: pattern(1, 9) })).rejects.toMatchObject({ code: 'EIO' });
    await e.close();
    const off = await offlineState(sparePath);
    expect(off.state.remaps.size).toBe(0);
    expect(off.state.pending.size).toBe(0);
  });

  it('reads: a main that fails every read marks nothing pending and fails the device', async () => {
    const e = await open({ mainPath: disk.path, sparePath, format: true });
    await readBack(e, 0, BS);
    await disk.setBad({ read: [whole] });
    const results = await Promise.allSettled(Array.from({ length: 32 }, (_, i) => readBack(e, ((i * 31 + 3) % BLOCKS) * BS, BS)));
    const st = e.status();
    expect(results.every((r) => r.status === 'rejected')).toBe(true);
    expect(st.pendingBlocks).toBe(0);
    expect(st.state).toBe('failed');
    expect(st.failReason).toContain('failed a read of block');
    await e.close();
    expect((await offlineState(sparePath)).state.pending.size).toBe(0);
  });

  it('control: a bad region on a main that still answers is remapped, the device stays running', async () => {
    const e = await open({ mainPath: disk.path, sparePath, format: true });
    await disk.setBad({ read: [[1000 * BS, 200 * BS]], write: [[1000 * BS, 200 * BS]] });
    const w = pattern(64, 5);
    await Promise.all(Array.from({ length: 4 }, (_, i) => e.submit({ op: 'write', offset: (1000 + i * 64) * BS, length: 64 * BS, buffer: w })));
    const st = e.status();
    expect(st.state).toBe('running');
    expect(st.remappedBlocks).toBe(200);
    expect((await readBack(e, 1000 * BS, 64 * BS)).equals(w)).toBe(true);
    await e.close();
  });
});
