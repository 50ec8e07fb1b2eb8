/**
 * A crash during a format: the format-in-progress markers let the next load
 * say "a format started at T never finished" and let an unforced format redo
 * it, while valid, corrupt or foreign metadata is still never replaced
 * without force. Real files through the real code; the "crash" is a MetaIO
 * that drops every write from the N-th on (docs/FORMAT.md sections 2a, 8).
 */
import { afterAll, describe, expect, it } from 'vitest';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { randomUUID } from 'node:crypto';
import { FileMetaIO } from '../../src/metadata/io.js';
import { FormatInterruptedError, formatSpare, inspectSpare, loadSpare, type FormatOptions } from '../../src/metadata/store.js';
import { MetadataWriter } from '../../src/metadata/writer.js';
import { encodeFormatMarker, decodeFormatMarker, FORMAT_VERSION } from '../../src/metadata/format.js';
import { reduce, stateToRecords, emptyState } from '../../src/metadata/reduce.js';
import { ERRNO, RemapError } from '../../src/errors.js';
import { CrashIO, IDENTITY, rejection, remap, tempDir } from './helpers.js';

const td = tempDir('fmt-int');
afterAll(() => td.cleanup());
let n = 0;
const path = (): string => join(td.dir, `spare-${n++}.img`);
const AREA = 1 << 20;

function opts(extra: Partial<FormatOptions> = {}): FormatOptions {
  return { areaOffset: 0, areaBytes: AREA, blockSize: 4096, identity: IDENTITY, journalBytes: 64 * 1024, ...extra };
}

async function withIO<T>(p: string, f: (io: FileMetaIO) => Promise<T>): Promise<T> {
  const io = await FileMetaIO.open(p);
  try {
    return await f(io);
  } finally {
    await io.close();
  }
}

/** Writes of one complete format of the test area. */
async function writesOfAFormat(): Promise<number> {
  const p = path();
  writeFileSync(p, Buffer.alloc(AREA));
  return withIO(p, async (io) => {
    const c = new CrashIO(io, Number.MAX_SAFE_INTEGER);
    await formatSpare(c, opts());
    return c.writes;
  });
}

/** Runs a format of `p` that crashes at write `limit`; resolves whether it completed. */
async function crashFormat(p: string, limit: number, o: Partial<FormatOptions>): Promise<boolean> {
  return withIO(p, async (io) => {
    const c = new CrashIO(io, limit);
    try {
      await formatSpare(c, opts(o));
      return true;
    } catch (e) {
      expect(c.crashed).toBe(true); // it failed because of the crash, nothing else
      return false;
    }
  });
}

const ISO = /\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z/;

describe('first format interrupted after every write', () => {
  it('loads as "format interrupted" or as the finished format, and an unforced format then succeeds whenever it did not finish', async () => {
    const total = await writesOfAFormat();
    expect(total).toBeGreaterThanOrEqual(8); // 2 markers, 2 x (checkpoint, slot 1, journal), 2 superblocks
    const seen = { interrupted: 0, done: 0, copy0Only: 0 };
    for (let limit = 0; limit <= total; limit++) {
      const p = path();
      writeFileSync(p, Buffer.alloc(AREA));
      const uuid = randomUUID();
      const completed = await crashFormat(p, limit, { identity: { ...IDENTITY, deviceUuid: uuid } });
      expect(completed).toBe(limit === total);
      await withIO(p, async (io) => {
        let loaded;
        try {
          loaded = await loadSpare(io);
        } catch (e) {
          if (limit === 0) {
            // nothing was written: the area is as it was (blank), the plain "no metadata"
            expect((e as RemapError).message).toMatch(/no dm-remapd metadata on .*; format it explicitly/);
            expect(e).not.toBeInstanceOf(FormatInterruptedError);
            await formatSpare(io, opts());
            expect((await loadSpare(io)).records).toEqual([]);
            return;
          }
          // (a) never the generic "no metadata", never a corrupt-metadata error, never a crash
          expect(e, `limit ${limit}`).toBeInstanceOf(FormatInterruptedError);
          const err = e as FormatInterruptedError;
          expect(err.errno).toBe(ERRNO.ENODATA);
          expect(err.redoable).toBe(true);
          expect(err.marker.deviceUuid).toBe(uuid);
          expect(err.message).toContain(`spare ${p}: a format started at `);
          expect(err.message).toMatch(ISO);
          expect(err.message).toContain(`(device uuid ${uuid}) never finished`);
          expect(err.message).toContain('run `remapctl add ... --format` again to redo it');
          expect(err.message).not.toMatch(/format it explicitly|corrupt/);
          const ins = await inspectSpare(io);
          expect(ins.ok).toBe(false);
          if (!ins.ok) {
            expect(ins.error).toBeInstanceOf(FormatInterruptedError);
            expect(ins.copies[0].structures[0].reason).toMatch(/format-in-progress marker/);
          }
          seen.interrupted++;
          // (b) an unforced format redoes it, says so, and the result loads
          const notes: string[] = [];
          const uuid2 = randomUUID();
          await formatSpare(io, opts({ identity: { ...IDENTITY, deviceUuid: uuid2 }, onRedo: (note) => notes.push(note) }));
          expect(notes).toHaveLength(1);
          expect(notes[0]).toMatch(new RegExp(`redoing an interrupted format \\(started at .*device uuid ${uuid}\\)`));
          const again = await loadSpare(io);
          expect(again.identity.deviceUuid).toBe(uuid2);
          expect(again.records).toEqual([]);
          expect(again.copies.map((c) => c.valid)).toEqual([true, true]);
          return;
        }
        // the format got at least copy 0's superblock down: an empty table of this format
        expect(loaded.identity.deviceUuid).toBe(uuid);
        expect(loaded.records).toEqual([]);
        if (limit === total) {
          expect(loaded.copies.map((c) => c.valid)).toEqual([true, true]);
          seen.done++;
        } else {
          expect(loaded.copies.map((c) => c.valid)).toEqual([true, false]);
          expect(loaded.copies[1].structures.find((s) => s.structure === 'superblock')?.reason).toMatch(/format-in-progress marker/);
          seen.copy0Only++;
        }
        // it is metadata now: an unforced format refuses it, exactly as before
        const err = await rejection(formatSpare(io, opts()));
        expect(err.code).toBe('EEXIST');
      });
    }
    expect(seen.interrupted).toBe(total - 2);
    expect(seen.copy0Only).toBe(1);
    expect(seen.done).toBe(1);
  });

  it('a redo that is itself interrupted, at any write before its superblocks, is still redoable', async () => {
    const total = await writesOfAFormat();
    const p = path();
    writeFileSync(p, Buffer.alloc(AREA));
    expect(await crashFormat(p, 4, {})).toBe(false);
    // a redo writes one block more: the old checkpoint block goes first
    for (let limit = 0; limit < total; limit++) {
      expect(await crashFormat(p, limit, {})).toBe(false);
      await withIO(p, async (io) => {
        const err = await rejection(loadSpare(io));
        expect(err).toBeInstanceOf(FormatInterruptedError);
        expect((err as FormatInterruptedError).redoable).toBe(true);
      });
    }
    await withIO(p, async (io) => {
      await formatSpare(io, opts());
      expect((await loadSpare(io)).copies.every((c) => c.valid)).toBe(true);
    });
  });
});

/** A formatted spare with some remaps committed. */
async function validSpare(p: string, uuid: string): Promise<void> {
  writeFileSync(p, Buffer.alloc(AREA));
  await withIO(p, async (io) => {
    await formatSpare(io, opts({ identity: { ...IDENTITY, deviceUuid: uuid } }));
    const loaded = await loadSpare(io);
    const state = emptyState();
    const w = new MetadataWriter(io, loaded, { snapshot: () => stateToRecords(state) });
    for (let i = 0; i < 5; i++) {
      const recs = [remap(i, i, 0x100 + i)];
      await w.commit(recs);
      reduce(recs, state);
    }
    await w.checkpoint();
    await w.commit([remap(7, 7, 0x107)]);
    await w.close();
  });
}

describe('forced re-format of valid metadata, interrupted after every write', () => {
  it('an unforced format never succeeds at any point, and never changes a byte; a forced one does', async () => {
    const total = await writesOfAFormat();
    const outcomes = new Set<string>();
    for (let limit = 0; limit <= total; limit++) {
      const p = path();
      const oldUuid = randomUUID();
      const newUuid = randomUUID();
      await validSpare(p, oldUuid);
      const completed = await crashFormat(p, limit, { identity: { ...IDENTITY, deviceUuid: newUuid }, force: true });
      expect(completed).toBe(limit === total);
      await withIO(p, async (io) => {
        let what: string;
        try {
          const m = await loadSpare(io);
          if (m.identity.deviceUuid === oldUuid) {
            // the old metadata, whole (copy 1's superblock still stands)
            expect(m.records.length).toBe(6);
            what = 'old';
          } else {
            expect(m.identity.deviceUuid).toBe(newUuid);
            expect(m.records).toEqual([]);
            what = 'new';
          }
        } catch (e) {
          expect(e, `limit ${limit}`).toBeInstanceOf(FormatInterruptedError);
          const err = e as FormatInterruptedError;
          expect(err.errno).toBe(ERRNO.ENODATA);
          expect(err.redoable).toBe(false);
          expect(err.marker.replacing).toBe(true);
          expect(err.message).toContain(`(device uuid ${newUuid}) never finished`);
          expect(err.message).toMatch(/was forced over existing dm-remapd metadata, so only a forced format may redo it/);
          expect(err.message).not.toContain('remapctl add');
          what = 'interrupted';
        }
        outcomes.add(what);
        const before = readFileSync(p);
        const err = await rejection(formatSpare(io, opts()));
        expect(err.code, `limit ${limit} (${what})`).toBe('EEXIST');
        expect(err.message).toMatch(/refusing to format it without force/);
        expect(readFileSync(p).equals(before)).toBe(true);
        // force redoes it
        await formatSpare(io, opts({ force: true }));
        const m = await loadSpare(io);
        expect(m.records).toEqual([]);
        expect(m.copies.every((c) => c.valid)).toBe(true);
      });
    }
    expect([...outcomes].sort()).toEqual(['interrupted', 'new', 'old']);
  });
});

describe('what keeps refusing', () => {
  const patch = (p: string, off: number, bytes: Uint8Array): void => {
    const b = readFileSync(p);
    b.set(bytes, off);
    writeFileSync(p, b);
  };
  const sbOffsets = [0, AREA - 4096];

  it('a valid superblock: unforced format refuses (EEXIST)', async () => {
    const p = path();
    await validSpare(p, randomUUID());
    await withIO(p, async (io) => {
      const err = await rejection(formatSpare(io, opts()));
      expect(err.code).toBe('EEXIST');
      expect(err.message).toMatch(/superblock at 0 \(valid/);
    });
  });

  it('superblocks with the magic but a bad CRC: load says corrupt, unforced format refuses', async () => {
    const p = path();
    await validSpare(p, randomUUID());
    for (const off of sbOffsets) patch(p, off + 200, Uint8Array.of(0x5a));
    await withIO(p, async (io) => {
      const l = await rejection(loadSpare(io));
      expect(l.code).toBe('EBADMSG');
      expect(l).not.toBeInstanceOf(FormatInterruptedError);
      const f = await rejection(formatSpare(io, opts()));
      expect(f.code).toBe('EEXIST');
      expect(f.message).toMatch(/corrupt: superblock CRC mismatch/);
    });
  });

  it('a marker in one slot and a torn (corrupt) superblock in the other: corrupt, not redoable without force', async () => {
    const p = path();
    writeFileSync(p, Buffer.alloc(AREA));
    const uuid = randomUUID();
    const total = await writesOfAFormat();
    expect(await crashFormat(p, total - 1, { identity: { ...IDENTITY, deviceUuid: uuid } })).toBe(false);
    // copy 0's superblock landed torn: magic, bad CRC; copy 1 still holds its marker
    patch(p, 300, Uint8Array.of(0xff));
    await withIO(p, async (io) => {
      const l = await rejection(loadSpare(io));
      expect(l.code).toBe('EBADMSG');
      expect(l.message).toMatch(/corrupt in every copy/);
      expect(l.message).toContain(`device uuid ${uuid}) never finished`); // the marker is named too
      const f = await rejection(formatSpare(io, opts()));
      expect(f.code).toBe('EEXIST');
    });
  });

  it('corrupt or misplaced markers count as present metadata, not as an interrupted format', async () => {
    const total = await writesOfAFormat();
    for (const damage of ['crc', 'misplaced'] as const) {
      const p = path();
      writeFileSync(p, Buffer.alloc(AREA));
      expect(await crashFormat(p, total - 2, {})).toBe(false);
      const m0 = readFileSync(p).subarray(0, 4096);
      expect(decodeFormatMarker(m0).status).toBe('valid');
      if (damage === 'crc') for (const off of sbOffsets) patch(p, off + 20, Uint8Array.of(0x01));
      else patch(p, 0, readFileSync(p).subarray(AREA - 4096)); // copy 1's marker in copy 0's slot
      await withIO(p, async (io) => {
        const l = await rejection(loadSpare(io));
        expect(l.code, damage).toBe('EBADMSG');
        const f = await rejection(formatSpare(io, opts()));
        expect(f.code, damage).toBe('EEXIST');
        expect(f.message).toMatch(/format-in-progress marker at 0 \(corrupt/);
      });
    }
  });

  it('markers over a checkpoint of another format: not redoable without force', async () => {
    const p = path();
    await validSpare(p, randomUUID());
    const other = randomUUID();
    for (const [c, off] of sbOffsets.entries())
      patch(p, off, encodeFormatMarker({ copyIndex: c as 0 | 1, deviceUuid: other, startedAtMs: Date.now(), formatVersion: FORMAT_VERSION, replacing: false, areaOffset: 0, areaBytes: AREA }));
    await withIO(p, async (io) => {
      const l = await rejection(loadSpare(io));
      expect(l).toBeInstanceOf(FormatInterruptedError);
      expect((l as FormatInterruptedError).redoable).toBe(false);
      expect(l.message).toMatch(/the checkpoint block at 4096 is not one that format wrote, so only a forced format may redo it/);
      const f = await rejection(formatSpare(io, opts()));
      expect(f.code).toBe('EEXIST');
      expect(f.message).toMatch(/checkpoint block at 4096; interrupted format: the checkpoint block at 4096 is not one that format wrote/);
    });
  });

  it('a zero-filled (wiped) area: the generic "no metadata", formatted only when asked', async () => {
    const p = path();
    writeFileSync(p, Buffer.alloc(AREA));
    await withIO(p, async (io) => {
      const l = await rejection(loadSpare(io));
      expect(l.code).toBe('ENODATA');
      expect(l).not.toBeInstanceOf(FormatInterruptedError);
      expect(l.message).toMatch(/no dm-remapd metadata on .*; format it explicitly/);
      const notes: string[] = [];
      await formatSpare(io, opts({ onRedo: (note) => notes.push(note) }));
      expect(notes).toEqual([]); // a plain first format, not a redo
      expect((await loadSpare(io)).records).toEqual([]);
    });
  });
});
