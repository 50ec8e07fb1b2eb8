import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import type { BlockEngine, EngineRequest, FastPathMirror } from '../../src/engine/engine.js';
import { BackingDevice, BackingOp, allocAligned } from '../../src/native/backing.js';
import { BS, open, pattern, readBack, sparseFile, tempDir } from './fixtures.js';

/**
 * The engine's side of the ublk fast path contract (FastPathMirror,
 * docs/UBLK.md "Fast path"). The queue threads' check is native and runs
 * only in the guest; here a frontend with the same rules (a request goes
 * straight to main when the path is on and none of its blocks is marked;
 * it counts in the epoch it was checked in until it completes) serves
 * requests on its own descriptor of main, with random delays between the
 * check and the I/O, and the engine must still lose no write.
 */
class SimFastPath implements FastPathMirror {
  readonly marked = new Set<number>();
  reads = false;
  writes = false;
  epoch = 0;
  readonly inflight = [0, 0];
  served = { reads: 0, writes: 0, bytesRead: 0, bytesWritten: 0 };
  drains = 0;
  private waiters: Array<{ parity: number; resolve: () => void }> = [];

  constructor(private readonly dev: BackingDevice, private readonly honestDrain = true) {}

  mark(blocks: ArrayLike<number>): void {
    for (let i = 0; i < blocks.length; i++) this.marked.add(blocks[i]);
  }

  drain(): Promise<void> {
    this.drains++;
    const parity = this.epoch & 1;
    this.epoch++;
    if (!this.honestDrain || this.inflight[parity] === 0) return Promise.resolve();
    return new Promise((resolve) => this.waiters.push({ parity, resolve }));
  }

  enable(reads: boolean, writes: boolean): void {
    this.reads = reads;
    this.writes = writes;
  }

  stats(): { reads: number; writes: number; bytesRead: number; bytesWritten: number; inFlight: number } {
    return { ...this.served, inFlight: this.inflight[0] + this.inflight[1] };
  }

  /** Serves req itself, or returns null when it must go to the engine. */
  try(req: EngineRequest, delayTicks: number): Promise<void> | null {
    if (req.op !== 'read' && req.op !== 'write') return null;
    if (req.fua === true || !(req.op === 'read' ? this.reads : this.writes)) return null;
    for (let b = req.offset / BS; b < (req.offset + req.length) / BS; b++) if (this.marked.has(b)) return null;
    const parity = this.epoch & 1;
    this.inflight[parity]++;
    return (async () => {
      await ticks(delayTicks); // a slow fast I/O, checked before a mark that comes meanwhile
      const op = req.op === 'read' ? BackingOp.READ : BackingOp.WRITE;
      const res = await this.dev.io(op, req.buffer as Uint8Array, req.offset, req.length);
      if (res !== req.length) throw new Error(`fast ${req.op} at ${req.offset}: ${res}`);
      if (req.op === 'read') { this.served.reads++; this.served.bytesRead += req.length; } else { this.served.writes++; this.served.bytesWritten += req.length; }
      if (--this.inflight[parity] === 0) {
        const ready = this.waiters.filter((w) => w.parity === parity);
        this.waiters = this.waiters.filter((w) => w.parity !== parity);
        for (const w of ready) w.resolve();
      }
    })();
  }
}

function ticks(n: number): Promise<void> {
  return new Promise((r) => {
    const step = (k: number): void => (k === 0 ? r() : void setImmediate(() => step(k - 1)));
    step(n);
  });
}

describe('fast path mirror (engine side of the ublk fast path)', () => {
  let dir: string;
  let cleanup: () => void;
  let mainPath: string;
  let sparePath: string;
  beforeEach(() => {
    ({ dir, cleanup } = tempDir('fastpath'));
    mainPath = sparseFile(join(dir, 'main.img'), 16 * 1024 * 1024);
    sparePath = sparseFile(join(dir, 'spare.img'), 16 * 1024 * 1024);
  });
  afterEach(() => cleanup());

  /** Writes racing manual remaps of their blocks, through the simulated fast path; the blocks that lost their write. */
  async function race(e: BlockEngine, fp: SimFastPath, blocks: number, seed: number): Promise<{ lost: number[]; checked: number; fast: number }> {
    const submit = (req: EngineRequest, delay: number): Promise<void> => fp.try(req, delay) ?? e.submit(req);
    await e.submit({ op: 'write', offset: 0, length: blocks * BS, buffer: pattern(blocks, seed) });
    const last = new Map<number, Buffer>();
    const jobs: Array<Promise<unknown>> = [];
    const fastBefore = fp.served.writes;
    for (let b = 0; b < blocks; b++) {
      const data = pattern(1, seed * 100_000 + b + 1);
      last.set(b, data);
      // The write is checked (and passes, its block unmarked) before the remap
      // marks it, then reaches main 0..5 loop turns later.
      jobs.push(submit({ op: 'write', offset: b * BS, length: BS, buffer: data }, b % 6));
      jobs.push(e.remapBlocks([b]));
    }
    await Promise.all(jobs);
    const lost: number[] = [];
    for (const [b, data] of last) if (!(await readBack(e, b * BS, BS)).equals(data)) lost.push(b);
    return { lost, checked: last.size, fast: fp.served.writes - fastBefore };
  }

  it('a manual remap waits for the fast writes that passed the check before its mark: none is lost, before or after a reopen', async () => {
    const e = await open({ mainPath, sparePath, format: true });
    const dev = BackingDevice.open(mainPath, { direct: true });
    const fp = new SimFastPath(dev);
    const off = e.attachFastPath(fp);
    expect(fp.reads && fp.writes).toBe(true);
    const { lost, checked, fast } = await race(e, fp, 200, 5);
    expect(e.status().remappedBlocks).toBe(200);
    // Every remapped block is marked: later requests to it go to the engine.
    for (let b = 0; b < 200; b++) expect(fp.marked.has(b)).toBe(true);
    expect(fp.try({ op: 'read', offset: 7 * BS, length: BS, buffer: allocAligned(BS) }, 0)).toBeNull();
    await off();
    await e.close();
    const e2 = await open({ mainPath, sparePath });
    const lostAfter: number[] = [];
    for (let b = 0; b < 200; b++) {
      if (!(await readBack(e2, b * BS, BS)).equals(pattern(1, 5 * 100_000 + b + 1))) lostAfter.push(b);
    }
    await e2.close();
    await dev.close();
    console.log(`[fast path] ${checked} blocks written through the fast path while being remapped (${fast} served fast, ${fp.drains} drains); lost: ${lost.length}, after reopen: ${lostAfter.length}`);
    expect(fast).toBeGreaterThan(150);
    expect(lost).toEqual([]);
    expect(lostAfter).toEqual([]);
  });

  it('negative control: with a drain that does not wait, the same race loses writes', async () => {
    const e = await open({ mainPath, sparePath, format: true });
    const dev = BackingDevice.open(mainPath, { direct: true });
    const fp = new SimFastPath(dev, false);
    const off = e.attachFastPath(fp);
    const { lost } = await race(e, fp, 200, 6);
    await off();
    await e.close();
    await dev.close();
    console.log(`[fast path] negative control: ${lost.length} writes lost without the drain`);
    expect(lost.length).toBeGreaterThan(0);
  });

  it('attach marks what is remapped and pending; stats include fast I/O and survive the detach; close switches it off', async () => {
    const e = await open({ mainPath, sparePath, format: true });
    await e.remapBlocks([3, 9, 100]);
    const dev = BackingDevice.open(mainPath, { direct: true });
    const fp = new SimFastPath(dev);
    const off = e.attachFastPath(fp);
    expect([...fp.marked].sort((a, b) => a - b)).toEqual([3, 9, 100]);
    const before = e.stats.reads;
    const buf = pattern(4, 1);
    await (fp.try({ op: 'write', offset: 20 * BS, length: 4 * BS, buffer: buf }, 0) as Promise<void>);
    await (fp.try({ op: 'read', offset: 20 * BS, length: 4 * BS, buffer: allocAligned(4 * BS) }, 0) as Promise<void>);
    expect(e.stats.reads).toBe(before + 1);
    expect(e.status().stats.bytesWritten).toBeGreaterThanOrEqual(4 * BS);
    expect((await readBack(e, 20 * BS, 4 * BS)).equals(buf)).toBe(true);
    await e.remapBlocks([21]);
    expect(fp.marked.has(21)).toBe(true);
    expect((await readBack(e, 20 * BS, 4 * BS)).equals(buf)).toBe(true);
    await off();
    expect(fp.reads || fp.writes).toBe(false);
    expect(e.stats.reads).toBe(before + 3); // the fast read is kept after the detach, plus two engine reads
    const fp2 = new SimFastPath(dev);
    e.attachFastPath(fp2);
    expect(fp2.writes).toBe(true);
    await e.close();
    expect(fp2.reads || fp2.writes).toBe(false);
    await dev.close();
  });
});
