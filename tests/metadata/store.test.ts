import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { copyFileSync, readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { FileMetaIO } from '../../src/metadata/io.js';
import { formatSpare, inspectSpare, loadSpare, repairSpare, type LoadedMetadata } from '../../src/metadata/store.js';
import { MetadataWriter } from '../../src/metadata/writer.js';
import { reduce, stateToRecords, statesEqual, emptyState, type MetaState } from '../../src/metadata/reduce.js';
import { RemapError } from '../../src/errors.js';
import { IDENTITY, freshSpare, pendingAdd, remap, tempDir } from './helpers.js';

const td = tempDir('store');
afterAll(() => td.cleanup());
let n = 0;
const path = (): string => join(td.dir, `spare-${n++}.img`);

async function expectReject(p: Promise<unknown>, code: string, re?: RegExp): Promise<RemapError> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(RemapError);
    const err = e as RemapError;
    expect(err.code).toBe(code);
    if (re) expect(err.message).toMatch(re);
    return err;
  }
  throw new Error(`expected ${code}`);
}

/** Builds a spare with a checkpoint plus journal commits after it; returns the expected state. */
async function populated(p: string): Promise<{ state: MetaState; loaded: LoadedMetadata }> {
  const { io, loaded } = await freshSpare(p);
  const state = emptyState();
  const w = new MetadataWriter(io, loaded, { snapshot: () => stateToRecords(state) });
  for (let i = 0; i < 10; i++) {
    const recs = [remap(i, i, 0x1000 + i), pendingAdd(100 + i)];
    await w.commit(recs);
    reduce(recs, state);
  }
  await w.checkpoint();
  for (let i = 10; i < 15; i++) {
    const recs = [remap(i, i, 0x1000 + i)];
    await w.commit(recs);
    reduce(recs, state);
  }
  await w.close();
  await io.close();
  const io2 = await FileMetaIO.open(p);
  const l = await loadSpare(io2);
  await io2.close();
  expect(statesEqual(reduce(l.records), state)).toBe(true);
  return { state, loaded: l };
}

async function load(p: string): Promise<LoadedMetadata> {
  const io = await FileMetaIO.open(p);
  try {
    return await loadSpare(io);
  } finally {
    await io.close();
  }
}

function patch(p: string, offset: number, data: Uint8Array): void {
  const buf = readFileSync(p);
  buf.set(data, offset);
  writeFileSync(p, buf);
}

describe('format and load', () => {
  it('formats and loads back identity, layout and an empty table', async () => {
    const { io, loaded } = await freshSpare(path(), { identity: { ...IDENTITY, deviceUuid: '01234567-89ab-4cde-8f01-23456789abcd', createdAtMs: 5 } });
    expect(loaded.identity).toEqual({ ...IDENTITY, deviceUuid: '01234567-89ab-4cde-8f01-23456789abcd', createdAtMs: 5, blockSize: 4096 });
    expect(loaded.records).toEqual([]);
    expect(loaded.seq).toBe(0);
    expect(loaded.copies.map((c) => c.valid)).toEqual([true, true]);
    expect(loaded.warnings).toEqual([]);
    await io.close();
  });

  it('no metadata -> ENODATA refusal', async () => {
    const p = path();
    writeFileSync(p, Buffer.alloc(1 << 20));
    const io = await FileMetaIO.open(p);
    await expectReject(loadSpare(io), 'ENODATA', /no dm-remapd metadata on .*; format it explicitly/);
    const r = await inspectSpare(io);
    expect(r.ok).toBe(false);
    await io.close();
  });

  it('format refuses to overwrite existing (valid or corrupt) metadata without force', async () => {
    const p = path();
    const { io } = await freshSpare(p);
    const opts = { areaOffset: 0, areaBytes: 1 << 20, blockSize: 4096, identity: IDENTITY, journalBytes: 64 * 1024 };
    await expectReject(formatSpare(io, opts), 'EEXIST', /already holds dm-remapd metadata.*refusing to format it without force/);
    // corrupt copy 0's superblock: still refused (magic-bearing)
    const bad = new Uint8Array(4096);
    bad.set(new TextEncoder().encode('dmremapd'));
    await io.write(0, bad);
    await expectReject(formatSpare(io, opts), 'EEXIST', /corrupt/);
    // a different layout (bigger journal) is refused too
    await expectReject(formatSpare(io, { ...opts, journalBytes: 128 * 1024 }), 'EEXIST');
    const layout = await formatSpare(io, { ...opts, force: true });
    const l = await loadSpare(io);
    expect(l.layout).toEqual(layout);
    expect(l.records).toEqual([]);
    await io.close();
  });

  it('a reformat (force) never resurrects records of the previous format', async () => {
    const p = path();
    await populated(p);
    const io = await FileMetaIO.open(p);
    await formatSpare(io, { areaOffset: 0, areaBytes: 1 << 20, blockSize: 4096, identity: IDENTITY, journalBytes: 64 * 1024, force: true });
    const l = await loadSpare(io);
    expect(l.records).toEqual([]);
    expect(l.seq).toBe(0);
    await io.close();
  });

  it('format rejects an area beyond the device and too-small areas', async () => {
    const io = await FileMetaIO.open(path(), { create: 1 << 20 });
    await expectReject(formatSpare(io, { areaOffset: 0, areaBytes: 2 << 20, blockSize: 4096, identity: IDENTITY, journalBytes: 64 * 1024 }), 'EINVAL', /beyond the end/);
    await expectReject(formatSpare(io, { areaOffset: 0, areaBytes: 1 << 20, blockSize: 4096, identity: IDENTITY }), 'ENOSPC', /too small/);
    await io.close();
  });

  it('works for a reserved tail of a larger device (areaOffset > 0, area not at device end)', async () => {
    const p = path();
    const io = await FileMetaIO.open(p, { create: 4 << 20 });
    const layout = await formatSpare(io, { areaOffset: 1 << 20, areaBytes: 2 << 20, blockSize: 512, identity: IDENTITY, journalBytes: 64 * 1024 });
    const w = new MetadataWriter(io, await loadSpare(io, { areaOffset: 1 << 20 }), { snapshot: () => [] });
    await w.commit([remap(7, 3)]);
    await w.close();
    const l = await loadSpare(io, { areaOffset: 1 << 20 });
    expect(l.layout).toEqual(layout);
    expect(l.records).toEqual([remap(7, 3)]);
    expect(l.copies.map((c) => c.valid)).toEqual([true, true]);
    // copy 0 destroyed: copy 1 is found at the end of the area given explicitly
    await io.write(1 << 20, new Uint8Array(4096 * 4));
    const l2 = await loadSpare(io, { areaOffset: 1 << 20, areaBytes: 2 << 20 });
    expect(l2.records).toEqual([remap(7, 3)]);
    expect(l2.copies[0].valid).toBe(false);
    await io.close();
  });
});

describe('corruption of one copy recovers from the other', () => {
  let base = '';
  let expected: MetaState;
  let layout: LoadedMetadata['layout'];
  beforeAll(async () => {
    base = path();
    const r = await populated(base);
    expected = r.state;
    layout = r.loaded.layout;
  });
  const variant = (): string => {
    const p = path();
    copyFileSync(base, p);
    return p;
  };
  const cases: [string, (p: string, c: 0 | 1) => void][] = [
    ['random bytes', (p, c) => patch(p, layout.copies[c].start, randomBytes(layout.copyBytes))],
    ['zeroed', (p, c) => patch(p, layout.copies[c].start, new Uint8Array(layout.copyBytes))],
    ['superblock only', (p, c) => patch(p, layout.copies[c].superblock + 100, randomBytes(8))],
    ['checkpoint slots only', (p, c) => patch(p, layout.copies[c].checkpointSlots[0], randomBytes(2 * layout.checkpointBlocks * 4096))],
    ['journal only', (p, c) => patch(p, layout.copies[c].journal, randomBytes(layout.journalBlocks * 4096))],
  ];
  for (const [name, damage] of cases)
    for (const c of [0, 1] as const)
      it(`copy ${c}: ${name}`, async () => {
        const p = variant();
        damage(p, c);
        const l = await load(p);
        expect(statesEqual(reduce(l.records), expected)).toBe(true);
        expect(l.copies[c].valid).toBe(false);
        expect(l.copies[1 - c].valid).toBe(true);
        expect(l.warnings.join('\n')).toMatch(new RegExp(`copy ${c}`));
        // repair rewrites the bad copy; afterwards each copy alone suffices
        const io = await FileMetaIO.open(p);
        const rep = await repairSpare(io);
        await io.close();
        expect(rep.copies.map((x) => x.valid)).toEqual([true, true]);
        expect(statesEqual(reduce(rep.records), expected)).toBe(true);
        patch(p, layout.copies[1 - c].start, randomBytes(layout.copyBytes));
        const l3 = await load(p);
        expect(statesEqual(reduce(l3.records), expected)).toBe(true);
      });

  it('truncated file (copy 1 gone)', async () => {
    const p = variant();
    truncateSync(p, layout.copies[1].start + 4096);
    const l = await load(p);
    expect(statesEqual(reduce(l.records), expected)).toBe(true);
    expect(l.copies[1].valid).toBe(false);
    expect(l.warnings.join('\n')).toMatch(/beyond the end|truncated|copy 1/);
  });

  for (const c of [0, 1] as const)
    it(`copy ${c} replaced by an older version of itself`, async () => {
      const p = path();
      const { io, loaded } = await freshSpare(p);
      const state = emptyState();
      const w = new MetadataWriter(io, loaded, { snapshot: () => stateToRecords(state) });
      const step = async (recs: ReturnType<typeof remap>[]): Promise<void> => {
        await w.commit(recs);
        reduce(recs, state);
      };
      for (let i = 0; i < 40; i++) await step([remap(i, i)]);
      const old = readFileSync(p).subarray(loaded.layout.copies[c].start, loaded.layout.copies[c].end);
      // enough commits and checkpoints that the journal wraps
      for (let i = 40; i < 120; i++) {
        await step([remap(i % 70, i % 200, i), pendingAdd(1000 + i)]);
        if (i % 25 === 0) await w.checkpoint();
      }
      await w.close();
      await io.close();
      patch(p, loaded.layout.copies[c].start, old);
      const l = await load(p);
      expect(statesEqual(reduce(l.records), state)).toBe(true);
      expect(l.seq).toBe(120);
      expect(l.copies[c].valid).toBe(false);
    });
});

describe('all copies corrupt -> refusal', () => {
  it('both superblocks corrupt: EBADMSG naming both, inspect reports it', async () => {
    const p = path();
    const { loaded } = await populated(p);
    for (const c of [0, 1] as const) patch(p, loaded.layout.copies[c].superblock + 200, randomBytes(16));
    const io = await FileMetaIO.open(p);
    const err = await expectReject(loadSpare(io), 'EBADMSG', /corrupt in every copy.*copy 0 superblock.*CRC mismatch.*copy 1 superblock.*refusing to start/);
    expect(err.message).not.toMatch(/format it explicitly/);
    const r = await inspectSpare(io);
    expect(r.ok).toBe(false);
    if (!r.ok) {
      expect(r.error.code).toBe('EBADMSG');
      expect(r.copies[0].structures[0]).toMatchObject({ structure: 'superblock', valid: false });
    }
    await io.close();
  });

  it('both superblocks zeroed but checkpoints present: refused, not treated as blank', async () => {
    const p = path();
    const { loaded } = await populated(p);
    for (const c of [0, 1] as const) patch(p, loaded.layout.copies[c].superblock, new Uint8Array(4096));
    const io = await FileMetaIO.open(p);
    await expectReject(loadSpare(io), 'EBADMSG', /checkpoint block is present/);
    await expectReject(formatSpare(io, { areaOffset: 0, areaBytes: 1 << 20, blockSize: 4096, identity: IDENTITY, journalBytes: 64 * 1024 }), 'EEXIST');
    await io.close();
  });

  it('every checkpoint slot corrupt: refused', async () => {
    const p = path();
    const { loaded } = await populated(p);
    for (const c of [0, 1] as const) patch(p, loaded.layout.copies[c].checkpointSlots[0], randomBytes(2 * loaded.layout.checkpointBlocks * 4096));
    const io = await FileMetaIO.open(p);
    await expectReject(loadSpare(io), 'EBADMSG', /no valid checkpoint in any copy.*refusing to start/);
    await io.close();
  });

  it('whole area random: refused or no-data, never an empty table', async () => {
    const p = path();
    const { loaded } = await populated(p);
    patch(p, 0, randomBytes(loaded.layout.areaBytes));
    const io = await FileMetaIO.open(p);
    await expectReject(loadSpare(io), 'ENODATA');
    await io.close();
  });

  it('checkpoint damaged in different blocks of each copy is assembled from both', async () => {
    const p = path();
    const { io, loaded } = await freshSpare(p);
    const state = emptyState();
    const w = new MetadataWriter(io, loaded, { snapshot: () => stateToRecords(state) });
    const recs = Array.from({ length: 400 }, (_, i) => remap(i, i, i));
    await w.commit(recs); // one 3-block commit
    reduce(recs, state);
    await w.checkpoint();
    await w.close();
    await io.close();
    const l0 = await load(p);
    const slot = l0.checkpoint.slot;
    patch(p, loaded.layout.copies[0].checkpointSlots[slot] + 4096 + 77, randomBytes(3));
    patch(p, loaded.layout.copies[1].checkpointSlots[slot] + 2 * 4096 + 99, randomBytes(3));
    const l = await load(p);
    expect(l.checkpoint.seq).toBe(1);
    expect(l.checkpoint.records).toBe(400);
    expect(statesEqual(reduce(l.records), state)).toBe(true);
  });
});
