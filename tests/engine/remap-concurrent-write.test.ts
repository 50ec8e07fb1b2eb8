import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import type { BlockEngine } from '../../src/engine/engine.js';
import { BS, open, pattern, readBack, sparseFile, tempDir } from './fixtures.js';

/**
 * A manual remap copies a block off main, then commits the mapping. A client
 * write to that block must not land on main in between (it would be lost:
 * the block is served from the spare copy from then on). Writes that race a
 * remap must read back afterwards, before and after a reopen.
 */
describe('manual remap racing client writes', () => {
  let dir: string;
  let cleanup: () => void;
  let mainPath: string;
  let sparePath: string;
  beforeEach(() => {
    ({ dir, cleanup } = tempDir('remap-race'));
    mainPath = sparseFile(join(dir, 'main.img'), 16 * 1024 * 1024);
    sparePath = sparseFile(join(dir, 'spare.img'), 16 * 1024 * 1024);
  });
  afterEach(() => cleanup());

  const tick = (n: number): Promise<void> => new Promise((r) => {
    const step = (k: number): void => (k === 0 ? r() : void setImmediate(() => step(k - 1)));
    step(n);
  });

  async function race(e: BlockEngine, blocks: number, seed: number): Promise<Map<number, Buffer>> {
    const last = new Map<number, Buffer>();
    const overlapped = new Set<number>();
    // Old data everywhere first, so a lost write shows as the old pattern.
    await e.submit({ op: 'write', offset: 0, length: blocks * BS, buffer: pattern(blocks, seed) });
    const jobs: Array<Promise<unknown>> = [];
    for (let b = 0; b < blocks; b++) {
      const data = pattern(1, seed * 100_000 + b + 1);
      last.set(b, data);
      // Each block: a remap, and a write started after 0..3 loop turns (and a
      // second write for every third block, through the slow path's range check).
      jobs.push(e.remapBlocks([b]));
      jobs.push(tick(b % 4).then(() => e.submit({ op: 'write', offset: b * BS, length: BS, buffer: data })));
      if (b % 6 === 0 && b + 1 < blocks) {
        const two = pattern(2, seed * 200_000 + b);
        jobs.push(tick(1 + (b % 2)).then(async () => {
          await e.submit({ op: 'write', offset: b * BS, length: 2 * BS, buffer: two });
        }));
        // The two-block write and the single writes race each other too;
        // the test only asserts on blocks whose writes were not overlapped.
        overlapped.add(b);
        overlapped.add(b + 1);
      }
    }
    await Promise.all(jobs);
    for (const b of overlapped) last.delete(b);
    return last;
  }

  it('keeps every write that raced a remap of its block', async () => {
    const e = await open({ mainPath, sparePath, format: true });
    const blocks = 200;
    const last = await race(e, blocks, 3);
    let checked = 0;
    const lost: number[] = [];
    for (const [b, data] of last) {
      if (!(await readBack(e, b * BS, BS)).equals(data)) lost.push(b);
      checked++;
    }
    expect(e.status().remappedBlocks).toBe(blocks);
    await e.close();
    const e2 = await open({ mainPath, sparePath });
    for (const [b, data] of last) {
      if (!(await readBack(e2, b * BS, BS)).equals(data) && !lost.includes(b)) lost.push(b);
    }
    await e2.close();
    console.log(`[remap race] ${checked} blocks written while being remapped; lost writes: ${lost.length} ${lost.join(",")}`);
    expect(lost).toEqual([]);
    expect(checked).toBeGreaterThan(100);
  });
});
