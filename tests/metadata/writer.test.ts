import { afterAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { FileMetaIO } from '../../src/metadata/io.js';
import { loadSpare, type LoadedMetadata } from '../../src/metadata/store.js';
import { MetadataWriter } from '../../src/metadata/writer.js';
import { doubleMappedSpares, emptyState, reduce, stateToRecords, statesEqual } from '../../src/metadata/reduce.js';
import { RemapError } from '../../src/errors.js';
import { TestIO, freshSpare, pendingAdd, quarantine, rejection, remap, tempDir, timeoutCount } from './helpers.js';

const td = tempDir('writer');
afterAll(() => td.cleanup());
let n = 0;
const path = (): string => join(td.dir, `spare-${n++}.img`);

async function reload(p: string): Promise<LoadedMetadata> {
  const io = await FileMetaIO.open(p);
  try {
    return await loadSpare(io);
  } finally {
    await io.close();
  }
}

describe('MetadataWriter', () => {
  it('group-commits concurrent calls: 1000 calls become a handful of disk commits', async () => {
    const p = path();
    const { io: fio, loaded } = await freshSpare(p, { fileBytes: 8 << 20, journalBytes: 1 << 20 });
    const io = new TestIO(fio);
    const w = new MetadataWriter(io, loaded, { snapshot: () => [] });
    const seqs = await Promise.all(Array.from({ length: 1000 }, (_, i) => w.commit([remap(i, i)])));
    const s = w.stats();
    expect(s.commitCalls).toBe(1000);
    expect(s.commits).toBeLessThanOrEqual(10);
    expect(new Set(seqs).size).toBe(s.commits);
    // each disk commit: one write per copy, one sync
    expect(io.writes.length).toBe(2 * s.commits);
    expect(io.syncs).toBe(s.commits);
    await w.close();
    await fio.close();
    const l = await reload(p);
    expect(reduce(l.records).remaps.size).toBe(1000);
    expect(l.seq).toBe(w.seq);
  });

  it('a commit costs one 4 KiB write per copy and one sync, whatever the table size', async () => {
    const p = path();
    const { io: fio, loaded } = await freshSpare(p, { fileBytes: 64 << 20, journalBytes: 1 << 20 });
    const state = emptyState();
    const w0 = new MetadataWriter(fio, loaded, { snapshot: () => stateToRecords(state) });
    for (let b = 0; b < 10; b++) {
      const recs = Array.from({ length: 1000 }, (_, i) => remap(b * 1000 + i, b * 1000 + i, i));
      await w0.commit(recs);
      reduce(recs, state);
    }
    await w0.checkpoint();
    await w0.close();
    const l = await loadSpare(fio);
    expect(reduce(l.records).remaps.size).toBe(10000);
    const io = new TestIO(fio);
    const w = new MetadataWriter(io, l, { snapshot: () => stateToRecords(state) });
    const seq = await w.commit([remap(99999, 12345, 1)]);
    expect(seq).toBe(l.seq + 1);
    expect(io.writes).toEqual([
      { offset: l.layout.copies[0].journal + l.journal.head * 4096, length: 4096 },
      { offset: l.layout.copies[1].journal + l.journal.head * 4096, length: 4096 },
    ]);
    expect(io.syncs).toBe(1);
    await w.close();
    await fio.close();
  });

  it('seeds seq from disk, including torn commits, and never reuses it', async () => {
    const p = path();
    const { io, loaded } = await freshSpare(p);
    const w = new MetadataWriter(io, loaded, { snapshot: () => [] });
    expect(await w.commit([remap(1, 1)])).toBe(1);
    expect(await w.commit([remap(2, 2)])).toBe(2);
    await w.close();
    const l = await loadSpare(io);
    expect(l.seq).toBe(2);
    const w2 = new MetadataWriter(io, l, { snapshot: () => [] });
    expect(await w2.commit([remap(3, 3)])).toBe(3);
    await w2.close();
    await io.close();
  });

  it('rejects invalid records and oversize commits with EINVAL', async () => {
    const { io, loaded } = await freshSpare(path());
    const w = new MetadataWriter(io, loaded, { snapshot: () => [] });
    expect((await rejection(w.commit([remap(-1, 0)]))).code).toBe('EINVAL');
    expect((await rejection(w.commit([remap(1.5, 0)]))).code).toBe('EINVAL');
    expect((await rejection(w.commit(Array.from({ length: w.maxRecordsPerCommit + 1 }, (_, i) => remap(i, i))))).code).toBe('EINVAL');
    await w.close();
    await io.close();
  });

  it('abort before issue drops the records; ECANCELED', async () => {
    const p = path();
    const { io: fio, loaded } = await freshSpare(p);
    const io = new TestIO(fio);
    const w = new MetadataWriter(io, loaded, { snapshot: () => [] });
    io.holdSync = true;
    const first = w.commit([remap(1, 1)]);
    await new Promise((r) => setTimeout(r, 20));
    const ac = new AbortController();
    const second = w.commit([remap(2, 2)], { signal: ac.signal }); // queued behind the in-flight one
    ac.abort();
    const err = await rejection(second);
    expect(err.code).toBe('ECANCELED');
    expect(err.message).toMatch(/not issued yet: its records are dropped/);
    await io.release();
    expect(await first).toBe(1);
    await w.close();
    await fio.close();
    const l = await reload(p);
    expect(l.records).toEqual([remap(1, 1)]);
  });

  it('hung disk: ETIMEDOUT after timeoutMs, seq and slots not reused, close bounded, no timers left, late writes leave a valid table', async () => {
    const p = path();
    const { io: fio, loaded } = await freshSpare(p);
    const io = new TestIO(fio);
    const timersBefore = timeoutCount();
    const state = emptyState();
    const w = new MetadataWriter(io, loaded, { snapshot: () => stateToRecords(state), timeoutMs: 300 });
    const ok = async (recs: ReturnType<typeof remap>[]): Promise<number> => {
      const s = await w.commit(recs);
      reduce(recs, state);
      return s;
    };
    expect(await ok([remap(10, 0)])).toBe(1);

    // 1. a commit whose writes hang: times out, its seq is burnt
    io.hold = true;
    const t0 = Date.now();
    const e1 = await rejection(w.commit([remap(11, 1)]));
    const waited = Date.now() - t0;
    expect(e1.code).toBe('ETIMEDOUT');
    expect(e1.message).toMatch(/commit seq 2 on test\(.*\) .*timed out after 300 ms/);
    expect(waited).toBeGreaterThanOrEqual(290);
    expect(waited).toBeLessThan(1500);
    const hungOffsets = io.held.map((h) => h.offset);
    expect(hungOffsets.length).toBe(2);

    // 2. the disk answers again: the engine quarantines spare 1 and remaps 11 elsewhere
    io.hold = false;
    const writesBefore = io.writes.length;
    expect(await ok([quarantine(1), remap(11, 2)])).toBe(3); // seq 2 is never reused
    const newOffsets = io.writes.slice(writesBefore).map((x) => x.offset);
    for (const o of newOffsets) expect(hungOffsets).not.toContain(o); // the hung slots stay out of use
    // many more commits and checkpoints: the ring wraps but never over the hung slot
    for (let i = 0; i < 60; i++) {
      await ok([remap(100 + i, 3 + i), pendingAdd(5000 + i)]);
      if (i % 20 === 19) await w.checkpoint();
    }
    for (const wr of io.writes.slice(writesBefore)) expect(hungOffsets).not.toContain(wr.offset);

    // 3. hang again, then close: bounded by its timeout
    io.hold = true;
    const pending = w.commit([remap(12, 200)]);
    const pendingErr = rejection(pending);
    await new Promise((r) => setTimeout(r, 50));
    const c0 = Date.now();
    await w.close(400);
    const closeMs = Date.now() - c0;
    expect(closeMs).toBeLessThan(400 + 1000);
    const e2 = await pendingErr;
    expect(['ECANCELED', 'ETIMEDOUT']).toContain(e2.code);
    expect((await rejection(w.commit([remap(1, 1)]))).code).toBe('ECANCELED');
    expect(timeoutCount()).toBeLessThanOrEqual(timersBefore);
    expect(w.stats().outstandingWrites).toBeGreaterThan(0);

    // 4. the late writes land: a reload is valid, newest seq not reused, no spare mapped twice
    await io.release();
    await fio.close();
    const l = await reload(p);
    const got = reduce(l.records);
    expect(doubleMappedSpares(got)).toEqual([]);
    expect(l.seq).toBeGreaterThanOrEqual(w.seq);
    // everything acknowledged is there
    for (const [k, v] of state.remaps) expect(got.remaps.get(k)).toEqual(v);
    for (const k of state.pending) expect(got.pending.has(k)).toBe(true);
    expect(got.quarantined.has(1)).toBe(true);
  });

  it('a write error fails the commit with its errno; the on-disk state stays valid and the writer goes on', async () => {
    const p = path();
    const { io: fio, loaded } = await freshSpare(p);
    const io = new TestIO(fio);
    const w = new MetadataWriter(io, loaded, { snapshot: () => [] });
    expect(await w.commit([remap(1, 1)])).toBe(1);
    io.failWrites = 5;
    const e = await rejection(w.commit([remap(2, 2)]));
    expect(e.code).toBe('EIO');
    expect(e.message).toMatch(/commit seq 2 .* failed: injected write error/);
    io.failWrites = undefined;
    expect(await w.commit([remap(3, 3)])).toBe(3);
    expect(w.stats()).toMatchObject({ commits: 2, failedCommits: 1 });
    await w.close();
    await fio.close();
    const l = await reload(p);
    expect(l.records).toEqual([remap(1, 1), remap(3, 3)]);
  });

  it('close() with nothing pending resolves at once and leaves no timer', async () => {
    const { io, loaded } = await freshSpare(path());
    const before = timeoutCount();
    const w = new MetadataWriter(io, loaded, { snapshot: () => [] });
    await w.commit([remap(1, 1)]);
    const t0 = Date.now();
    await w.close(5000);
    expect(Date.now() - t0).toBeLessThan(100);
    expect(timeoutCount()).toBeLessThanOrEqual(before);
    await io.close();
  });
});

describe('torn commits', () => {
  for (const nrec of [3, 400]) {
    it(`a ${nrec}-record commit torn at every 512-byte boundary loads as the old or the new state`, async () => {
      const p = path();
      const { io: fio, loaded } = await freshSpare(p);
      const state = emptyState();
      const w0 = new MetadataWriter(fio, loaded, { snapshot: () => stateToRecords(state) });
      for (let i = 0; i < 5; i++) {
        const recs = [remap(i, i, 7)];
        await w0.commit(recs);
        reduce(recs, state);
      }
      await w0.close();
      const oldState = reduce(stateToRecords(state));
      const l0 = await loadSpare(fio);
      // capture the bytes the next commit would write
      const cap = new TestIO(fio);
      cap.capture = true;
      const w = new MetadataWriter(cap, l0, { snapshot: () => stateToRecords(state) });
      const recs = Array.from({ length: nrec }, (_, i) => (i % 2 ? pendingAdd(1000 + i) : remap(i, 50 + i, i)));
      await w.commit(recs);
      await w.close();
      const newState = reduce(recs, reduce(stateToRecords(state)));
      expect(cap.captured.length).toBe(2);
      const [w0c, w1c] = cap.captured;
      expect(w0c.data).toEqual(w1c.data);
      const len = w0c.data.length;
      const original = await fio.read(0, fio.sizeBytes);
      let sawOld = 0;
      let sawNew = 0;
      for (let k = 0; k <= len / 512; k++) {
        for (const mode of ['copy0', 'copy1', 'both', 'copy0-full+copy1-torn'] as const) {
          await fio.write(0, original);
          const part = (d: Uint8Array): Uint8Array => {
            const b = new Uint8Array(Math.ceil((k * 512) / 4096) * 4096);
            // bytes past k*512 keep what was on disk before
            b.set(original.subarray(w0c.offset, w0c.offset + b.length));
            b.set(d.subarray(0, k * 512));
            return b;
          };
          const torn0 = part(w0c.data);
          const torn1 = part(w1c.data);
          const old1 = original.subarray(w1c.offset, w1c.offset + torn1.length);
          const t1 = new Uint8Array(torn1.length);
          t1.set(old1);
          t1.set(w1c.data.subarray(0, k * 512));
          if (mode === 'copy0' || mode === 'both') await fio.write(w0c.offset, torn0);
          if (mode === 'copy1' || mode === 'both' || mode === 'copy0-full+copy1-torn') await fio.write(w1c.offset, t1);
          if (mode === 'copy0-full+copy1-torn') await fio.write(w0c.offset, w0c.data);
          const l = await loadSpare(fio);
          const s = reduce(l.records);
          const isOld = statesEqual(s, oldState);
          const isNew = statesEqual(s, newState);
          expect(isOld || isNew, `k=${k} mode=${mode}`).toBe(true);
          // new exactly when one copy ends up holding every byte of the commit
          // (a short commit torn after its last record is indistinguishable from a whole one)
          const now = await fio.read(0, fio.sizeBytes);
          const whole = (c: { offset: number; data: Uint8Array }): boolean => Buffer.compare(now.subarray(c.offset, c.offset + len), c.data) === 0;
          expect(isNew, `k=${k} mode=${mode}`).toBe(whole(w0c) || whole(w1c));
          if (isOld) sawOld++;
          if (isNew) {
            sawNew++;
            expect(l.seq).toBe(l0.seq + 1);
          }
          // a torn commit with any valid block burns its seq
          expect(l.seq).toBeGreaterThanOrEqual(l0.seq);
        }
      }
      expect(sawOld).toBeGreaterThan(0);
      expect(sawNew).toBeGreaterThan(0);
      await fio.close();
    });
  }

  it('a checkpoint torn at every 512-byte boundary loses nothing', async () => {
    const p = path();
    const { io: fio, loaded } = await freshSpare(p);
    const state = emptyState();
    const w0 = new MetadataWriter(fio, loaded, { snapshot: () => stateToRecords(state) });
    for (let i = 0; i < 30; i++) {
      const recs = [remap(i, i, 7), pendingAdd(900 + i)];
      await w0.commit(recs);
      reduce(recs, state);
    }
    await w0.close();
    const l0 = await loadSpare(fio);
    const cap = new TestIO(fio);
    cap.capture = true;
    const w = new MetadataWriter(cap, l0, { snapshot: () => stateToRecords(state) });
    await w.checkpoint();
    await w.close();
    const [c0, c1] = cap.captured;
    const original = await fio.read(0, fio.sizeBytes);
    for (let k = 0; k <= c0.data.length / 512; k++) {
      await fio.write(0, original);
      for (const c of [c0, c1]) {
        const b = original.slice(c.offset, c.offset + c.data.length);
        b.set(c.data.subarray(0, k * 512));
        await fio.write(c.offset, b);
      }
      const l = await loadSpare(fio);
      expect(statesEqual(reduce(l.records), state), `k=${k}`).toBe(true);
    }
    await fio.close();
  });
});
