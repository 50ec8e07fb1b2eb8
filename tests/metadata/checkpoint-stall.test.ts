import { afterAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { loadSpare } from '../../src/metadata/store.js';
import { MetadataWriter } from '../../src/metadata/writer.js';
import { reduce } from '../../src/metadata/reduce.js';
import { RecordType, type MetaRecord } from '../../src/metadata/records.js';
import { ERRNO, RemapError } from '../../src/errors.js';
import { TestIO, freshSpare, remap, tempDir, timeoutCount } from './helpers.js';

const td = tempDir('stall');
afterAll(() => td.cleanup());

/** Entries in the state a checkpoint writes (~11.5 MiB per copy). */
const N = 500_000;
/** Generous for CI noise; a slice of checkpoint work is ~4 ms. */
const MAX_STALL_MS = 50;

/** Push-only REMAP state in flat arrays; snapshot() is a point-in-time view (the length is fixed when called). */
class FlatState {
  logical = new Float64Array(1024);
  spare = new Float64Array(1024);
  n = 0;

  push(logical: number, spare: number): void {
    if (this.n === this.logical.length) {
      const l = new Float64Array(this.n * 2);
      l.set(this.logical);
      this.logical = l;
      const s = new Float64Array(this.n * 2);
      s.set(this.spare);
      this.spare = s;
    }
    this.logical[this.n] = logical;
    this.spare[this.n] = spare;
    this.n++;
  }

  snapshot(): Iterable<MetaRecord> {
    const n = this.n;
    const logical = this.logical;
    const spare = this.spare;
    return {
      *[Symbol.iterator](): Iterator<MetaRecord> {
        for (let i = 0; i < n; i++) yield { type: RecordType.REMAP, logical: logical[i], spare: spare[i], dataCrc: 0 };
      },
    };
  }
}

/**
 * Longest gap between ticks of a 1 ms interval: how long the event loop was
 * blocked. `wall` is the plain gap; `busy` counts each gap as at most the CPU
 * time the process used during it, so that time the OS ran other processes
 * (a loaded CI machine) is not blamed on the checkpoint, while a long
 * synchronous slice still shows in full.
 */
function stallProbe(): { stop: () => { wall: number; busy: number } } {
  let last = performance.now();
  let lastCpu = process.cpuUsage();
  let wall = 0;
  let busy = 0;
  const tick = (): void => {
    const now = performance.now();
    const cpu = process.cpuUsage(lastCpu);
    const gap = now - last;
    wall = Math.max(wall, gap);
    busy = Math.max(busy, Math.min(gap, (cpu.user + cpu.system) / 1000));
    last = now;
    lastCpu = process.cpuUsage();
  };
  const t = setInterval(tick, 1);
  return {
    stop: () => {
      tick();
      clearInterval(t);
      return { wall, busy };
    },
  };
}

async function bigSpare(tag: string, n = N): Promise<{ io: Awaited<ReturnType<typeof freshSpare>>['io']; w: MetadataWriter; state: FlatState; test: TestIO }> {
  // 1 GiB sparse file: checkpoint slots for ~700k records.
  const { io, loaded } = await freshSpare(join(td.dir, `${tag}.img`), { fileBytes: 1 << 30, journalBytes: 1 << 20 });
  expect(loaded.layout.checkpointCapacity).toBeGreaterThan(n + 10_000);
  const state = new FlatState();
  // The state is built in memory: a checkpoint writes whatever the snapshot holds.
  for (let i = 0; i < n; i++) state.push(i * 3 + 1, i % loaded.layout.dataBlocks);
  const test = new TestIO(io);
  const w = new MetadataWriter(test, loaded, { snapshot: () => state.snapshot(), timeoutMs: 60_000 });
  return { io, w, state, test };
}

describe('a checkpoint of a large state runs in slices', () => {
  it(`the event loop is never blocked for long while ${N} records are checkpointed, and commits complete meanwhile`, async () => {
    const { io, w, state } = await bigSpare('stall');
    let nextLogical = 3 * N + 10;
    const commitOne = async (): Promise<void> => {
      const r = [remap(nextLogical++, state.n % 1000, 7)];
      await w.commit(r);
      state.push(r[0].logical, r[0].spare);
    };
    await commitOne(); // warm up

    const probe = stallProbe();
    const t0 = performance.now();
    let done = false;
    try {
      const ck = w.checkpoint().finally(() => {
        done = true;
      });
      let during = 0;
      while (!done) {
        await commitOne();
        if (!done) during++;
      }
      await ck;
      const ckMs = performance.now() - t0;
      const stall = probe.stop();
      const st = w.stats();
      console.log(
        `[metadata stall] checkpoint of ${N} records took ${ckMs.toFixed(0)} ms; longest event-loop stall ${stall.wall.toFixed(1)} ms ` +
          `(${stall.busy.toFixed(1)} ms of it on CPU); ${during} commits completed while it ran (p99 ${st.p99CommitMs.toFixed(2)} ms)`,
      );
      expect(stall.busy).toBeLessThan(MAX_STALL_MS);
      expect(during).toBeGreaterThan(0);
      expect(st.checkpoints).toBe(1);
      await w.close();

      // What was written loads back: the checkpoint plus the commits made meanwhile (replayed from the journal).
      const l = await loadSpare(io);
      expect(l.checkpoint.records).toBeGreaterThanOrEqual(N);
      const s = reduce(l.records);
      expect(s.remaps.size).toBe(state.n);
      for (let i = 0; i < state.n; i += 997) expect(s.remaps.get(state.logical[i])?.spare).toBe(state.spare[i]);
      expect(s.remaps.get(state.logical[state.n - 1])?.spare).toBe(state.spare[state.n - 1]);
    } finally {
      probe.stop();
      await w.close();
      await io.close();
    }
  }, 60_000);

  it('close() stops a checkpoint in progress promptly and leaves no timer behind; the old state loads', async () => {
    const { io, w, state } = await bigSpare('close');
    const r = [remap(3 * N + 10, 0, 7)];
    await w.commit(r);
    state.push(r[0].logical, r[0].spare);
    const before = timeoutCount();
    const ck = w.checkpoint();
    const outcome = ck.then(
      () => 'written',
      (e: unknown) => e,
    );
    // let it run a few slices
    await new Promise((res) => setTimeout(res, 5));
    const t0 = performance.now();
    await w.close();
    const closeMs = performance.now() - t0;
    const after = timeoutCount();
    const resources = process.getActiveResourcesInfo().join(',');
    const got = await outcome;
    expect(got, String(got)).toBeInstanceOf(RemapError);
    expect((got as RemapError).errno).toBe(ERRNO.ECANCELED);
    expect(after, resources).toBeLessThanOrEqual(before);
    expect(w.stats().outstandingWrites).toBe(0);
    console.log(`[metadata stall] close() during a checkpoint of ${N} records returned in ${closeMs.toFixed(1)} ms`);
    expect(closeMs).toBeLessThan(1000);
    // No checkpoint was completed: the state is the journal's (one commit).
    const l = await loadSpare(io);
    expect(l.checkpoint.seq).toBe(0);
    expect(reduce(l.records).remaps.size).toBe(1);
    await io.close();
  }, 60_000);

  it('a failed piece write fails the checkpoint (the old state loads) and leaves no timer behind', async () => {
    const n = 100_000; // 3 pieces of 1 MiB
    const { io, w, state, test } = await bigSpare('fail', n);
    const r = [remap(3 * n + 10, 0, 7)];
    await w.commit(r);
    state.push(r[0].logical, r[0].spare);
    const before = timeoutCount();
    test.failWrites = ERRNO.EIO;
    const got = await w.checkpoint().then(
      () => 'written',
      (e: unknown) => e,
    );
    expect(got, String(got)).toBeInstanceOf(RemapError);
    expect((got as RemapError).errno).toBe(ERRNO.EIO);
    expect(w.stats()).toMatchObject({ checkpoints: 0, failedCheckpoints: 1, outstandingWrites: 0 });
    expect(timeoutCount(), process.getActiveResourcesInfo().join(',')).toBeLessThanOrEqual(before);
    test.failWrites = undefined;
    // the next checkpoint succeeds
    await w.checkpoint();
    await w.close();
    const l = await loadSpare(io);
    expect(l.checkpoint.records).toBe(n + 1);
    expect(reduce(l.records).remaps.size).toBe(n + 1);
    await io.close();
  }, 60_000);
});
