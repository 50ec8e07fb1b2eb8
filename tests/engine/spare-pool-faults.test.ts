/**
 * Spare pool over a faulty extra spare (nbdkit + nbdfuse fault disk): the
 * error paths use global spare indices (bad blocks recorded and persisted
 * where they are), and a vanished extra spare fails the device naming that
 * spare, not the primary.
 */
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { startFaultDisk, requireTools, type FaultDisk } from '../helpers/faultdisk.js';
import type { BlockEngine } from '../../src/engine/engine.js';
import { LABEL_BYTES } from '../../src/engine/spare-pool.js';
import { BS, offlineState, open, pattern, readBack, sparseFile, tempDir } from './fixtures.js';

requireTools('nbdkit', 'nbdkit-python', 'nbdfuse', 'fusermount3', '/dev/fuse');

const EXTRA_BYTES = LABEL_BYTES + 256 * BS;

describe('engine with a faulty extra spare', () => {
  let dir: string;
  let cleanup: () => void;
  let extra: FaultDisk;
  let mainPath: string;
  let sparePath: string;
  let e: BlockEngine | null = null;
  let primary = 0;
  beforeAll(async () => {
    ({ dir, cleanup } = tempDir('pool-faults'));
    extra = await startFaultDisk({ dir, name: 'extra', sizeBytes: EXTRA_BYTES });
  });
  afterAll(async () => {
    await extra?.stop();
    cleanup();
  });
  let n = 0;
  beforeEach(async () => {
    mainPath = sparseFile(join(dir, `main${n}.img`), 4 * 1024 * 1024);
    sparePath = sparseFile(join(dir, `spare${n++}.img`), 1024 * 1024);
    sparseFile(extra.backingFile, EXTRA_BYTES); // blank for each test
    await extra.setBad({});
    // a full primary, then the extra spare: every new remap goes to the extra spare
    e = await open({ mainPath, sparePath, format: true, poolReserveBytes: EXTRA_BYTES });
    primary = e.status().spareBlocksTotal;
    await e.submit({ op: 'write', offset: 0, length: (primary + 20) * BS, buffer: pattern(primary + 20, 1) });
    expect((await e.remapBlocks(Array.from({ length: primary }, (_, i) => i))).every((r) => r.result === 'remapped')).toBe(true);
    await e.addSpare(extra.path, { format: true });
  });
  afterEach(async () => {
    if (e !== null && e.state !== 'closed') await e.close(2000);
    e = null;
  });

  it('extra spare blocks that fail a write are marked bad by their global index (persisted), and the next one is used', async () => {
    const engine = e as BlockEngine;
    await extra.setBad({ write: [[LABEL_BYTES, 2 * BS]] }); // its blocks 0 and 1
    const w = pattern(1, 77);
    await engine.submit({ op: 'write', offset: primary * BS, length: BS, buffer: w });
    const r = await engine.remapBlocks([primary]);
    expect(r[0]).toMatchObject({ result: 'remapped', spare: primary + 2 });
    expect(engine.status().badSpareBlocks).toBe(2);
    expect((await readBack(engine, primary * BS, BS)).equals(w)).toBe(true);
    await engine.close();
    const off = await offlineState(sparePath);
    expect([...off.state.badSpare].sort((a, b) => a - b)).toEqual([primary, primary + 1]);
    expect(off.state.remaps.get(primary)?.spare).toBe(primary + 2);
    e = await open({ mainPath, sparePath, extraSpares: [extra.path] });
    expect(e.spareInfo()[1].used).toBe(3); // two bad, one remap
    expect((await readBack(e, primary * BS, BS)).equals(w)).toBe(true);
  });

  it('a read error on the extra spare: EIO, that block bad, the logical block pending, and the next write moves it', async () => {
    const engine = e as BlockEngine;
    await engine.remapBlocks([primary + 1]);
    const s = engine.lookup(primary + 1);
    expect(s).toBeGreaterThanOrEqual(primary);
    await extra.setBad({ read: [[engine.spareOffset(s), BS]] });
    await expect(readBack(engine, (primary + 1) * BS, BS)).rejects.toMatchObject({ code: 'EIO' });
    expect(engine.isPending(primary + 1)).toBe(true);
    const w = pattern(1, 3);
    await engine.submit({ op: 'write', offset: (primary + 1) * BS, length: BS, buffer: w });
    expect(engine.lookup(primary + 1)).not.toBe(s);
    expect(engine.isPending(primary + 1)).toBe(false);
    expect((await readBack(engine, (primary + 1) * BS, BS)).equals(w)).toBe(true);
    await engine.close();
    const off = await offlineState(sparePath);
    expect(off.state.badSpare.has(s)).toBe(true);
  });

  it('a vanished extra spare fails the device, naming that spare', async () => {
    const engine = e as BlockEngine;
    await engine.remapBlocks([primary + 2]);
    expect(engine.lookup(primary + 2)).toBeGreaterThanOrEqual(primary);
    await extra.kill();
    await expect(readBack(engine, (primary + 2) * BS, BS)).rejects.toThrow(new RegExp(extra.path.replace(/[.]/g, '\\.')));
    expect(engine.state).toBe('failed');
    expect(engine.status().failReason).toContain(`spare ${extra.path} is unreachable`);
    // blocks on the primary still read
    expect((await readBack(engine, 0, BS)).equals(pattern(1, 1))).toBe(true);
    await engine.close(2000);
    e = null;
    await extra.stop();
    extra = await startFaultDisk({ dir, name: 'extra', sizeBytes: EXTRA_BYTES });
  });
});
