// The load driver of bench:engine: what its figures rest on. Real engines on
// real files; the second engine's spare holds a remap, so a wrong count or a
// mixed-up order between the two loads shows in the numbers.
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import type { BlockEngine } from '../../src/engine/engine.js';
import { EngineLoad, runEngineLoad, runSliced, type Workload } from '../../bench/engine-load.js';
import { BS, open, sparseFile, tempDir } from '../engine/fixtures.js';

const read4k: Workload = { label: 'randread 4k QD8', op: 'read', pattern: 'random', bs: BS, qd: 8 };

describe('bench/engine-load', () => {
  let cleanup: () => void;
  let a: BlockEngine;
  let b: BlockEngine;
  beforeEach(async () => {
    const t = tempDir('engine-load');
    cleanup = t.cleanup;
    const mainPath = sparseFile(join(t.dir, 'main.img'), 16 * 1024 * 1024);
    a = await open({ name: 'a', mainPath, sparePath: sparseFile(join(t.dir, 'a.img'), 8 * 1024 * 1024), format: true });
    b = await open({ name: 'b', mainPath, sparePath: sparseFile(join(t.dir, 'b.img'), 8 * 1024 * 1024), format: true });
  });
  afterEach(async () => {
    await a.close();
    await b.close();
    cleanup();
  });

  it('runEngineLoad counts only the timed window and leaves nothing in flight', async () => {
    const before = a.status().stats.reads;
    const r = await runEngineLoad(a, read4k, 0.3, 0.1);
    expect(r.errors).toBe(0);
    expect(r.seconds).toBeGreaterThanOrEqual(0.29);
    expect(r.seconds).toBeLessThan(1);
    expect(r.ios).toBeGreaterThan(0);
    expect(r.iops).toBeCloseTo(r.ios / r.seconds, 6);
    expect(r.bytesPerSec).toBeCloseTo(r.iops * BS, 3);
    // Warm-up and drain were served too, so the engine saw more than the timed count.
    const served = a.status().stats.reads - before;
    expect(served).toBeGreaterThan(r.ios);
    // Stopped: no request is issued after the promise resolved.
    await new Promise((res) => setTimeout(res, 50));
    expect(a.status().stats.reads - before).toBe(served);
  });

  it('runSliced alternates the two loads (A B B A ...), times each one only during its own slices, and can run again', async () => {
    const order: string[] = [];
    class Named extends EngineLoad {
      constructor(engine: BlockEngine, seed: number, readonly tag: string) {
        super(engine, read4k, seed);
      }
      override start(): void {
        order.push(this.tag);
        super.start();
      }
    }
    const la = new Named(a, 1, 'A');
    const lb = new Named(b, 2, 'B');
    const reads = (): [number, number] => [a.status().stats.reads, b.status().stats.reads];
    const [a0, b0] = reads();
    const r1 = await runSliced(la, lb, 0.4, 0.1);
    const [a1, b1] = reads();
    for (const [r, served] of [[r1.a, a1 - a0], [r1.b, b1 - b0]] as const) {
      expect(r.errors).toBe(0);
      // 4 slices of 0.1 s each (A B B A A B B A), the drains not timed.
      expect(r.seconds).toBeGreaterThanOrEqual(0.39);
      expect(r.seconds).toBeLessThan(0.8);
      expect(r.ios).toBeGreaterThan(0);
      expect(r.ios).toBeLessThanOrEqual(served);
    }
    expect(la.done + lb.done).toBeGreaterThanOrEqual(r1.a.ios + r1.b.ios);
    expect(order.join(' ')).toBe('A B B A A B B A');
    expect(la.done).toBe(a1 - a0);
    expect(lb.done).toBe(b1 - b0);
    // Both stopped, and both can be started again.
    await new Promise((res) => setTimeout(res, 50));
    expect(reads()).toEqual([a1, b1]);
    order.length = 0;
    const r2 = await runSliced(lb, la, 0.2, 0.1);
    expect(order.join(' ')).toBe('B A A B');
    expect(r2.a.ios).toBeGreaterThan(0);
    expect(r2.b.ios).toBeGreaterThan(0);
    expect(la.done).toBe(a.status().stats.reads - a0);
  });

  it('start() refuses while the last start is still draining, and errors are counted, not thrown', async () => {
    const l = new EngineLoad(a, read4k, 3);
    l.start();
    const stopping = l.stop();
    expect(() => l.start()).toThrow(/still running/);
    await stopping;
    await a.close();
    l.start(); // every request fails on the closed engine
    await l.stop();
    expect(l.errors).toBe(read4k.qd);
    expect(l.firstError).toMatch(/.+/);
  });
});
