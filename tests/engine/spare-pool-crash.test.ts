/**
 * Spare pool, kill -9 (issue 6): a child writes, remaps by hand and adds
 * extra spares until it is killed at a random moment. Each time, the device
 * reopens with the extra spares the metadata records (an add cut before its
 * commit leaves a spare that is ignored, and the next add goes on with the
 * same ordinal), every acknowledged write and every acknowledged spare add
 * is there, and no spare block is mapped twice.
 */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { allocAligned } from '../../src/native/backing.js';
import { killAfterReady } from '../helpers/kill-child.js';
import { BS, offlineState, open, sparseFile, tempDir } from './fixtures.js';

const CHILD = new URL('./spare-pool-crash-child.mjs', import.meta.url).pathname;
const CYCLES = Number(process.env.DMR_CRASH_CYCLES ?? 8);
const BLOCKS = 512;

async function runChild(mainPath: string, sparePath: string, dir: string, extras: string[], format: boolean, seed: number, killAfterMs: number): Promise<string[]> {
  const logPath = join(dir, `child-${seed}.log`);
  await killAfterReady(CHILD, [mainPath, sparePath, String(BLOCKS), format ? 'format' : 'open', String(seed), logPath, dir, JSON.stringify(extras)], killAfterMs);
  return readFileSync(logPath, 'utf8').split('\n').slice(0, -1);
}

describe('spare pool: kill -9 during spare adds, remaps and writes', () => {
  let dir: string;
  let cleanup: () => void;
  beforeAll(() => {
    ({ dir, cleanup } = tempDir('pool-crash'));
  });
  afterAll(() => cleanup());

  it(`every acknowledged write and spare add survives ${CYCLES} kills`, async () => {
    expect(existsSync(new URL('../../dist/src/engine/spare-pool.js', import.meta.url)), 'run `npm run build` first').toBe(true);
    const mainPath = sparseFile(join(dir, 'main.img'), BLOCKS * BS);
    const sparePath = sparseFile(join(dir, 'spare.img'), 2 * 1024 * 1024); // a small primary: the pool grows (8 MiB reserve)
    const expected = new Map<number, { acked: number; inflight: number | null }>();
    let extras: string[] = [];
    let acks = 0;
    let addsAcked = 0;
    let addsCut = 0;
    let rnd = 4242;
    const rand = (n: number): number => { rnd = (rnd * 1103515245 + 12345) >>> 0; return (rnd >>> 16) % n; };
    for (let cycle = 0; cycle < CYCLES; cycle++) {
      const lines = await runChild(mainPath, sparePath, dir, extras, cycle === 0, cycle + 1, 200 + rand(500));
      const attempted: string[] = [];
      const acked = new Map<string, number>();
      for (const line of lines) {
        const [kind, a, b] = line.split(' ');
        if (kind === 'S') attempted.push(a);
        else if (kind === 'SA') acked.set(a, Number(b));
        else if (kind === 'I' || kind === 'A') {
          const block = Number(a);
          const cur = expected.get(block) ?? { acked: 0, inflight: null };
          if (kind === 'I') cur.inflight = Number(b);
          else { cur.acked = Number(b); cur.inflight = null; acks++; }
          expected.set(block, cur);
        }
      }
      addsAcked += acked.size;
      // reopen with every spare the child tried, in order: the recorded ones must open
      const e = await open({ mainPath, sparePath, extraSpares: [...extras, ...attempted] });
      const pool = e.spareInfo().slice(1).map((s) => s.path);
      expect(pool.slice(0, extras.length)).toEqual(extras);
      for (const [p, ordinal] of acked) expect(pool[ordinal - 1], `acknowledged spare ${p}`).toBe(p);
      // at most the last attempt may be missing (cut before its commit)
      expect(pool.length).toBeGreaterThanOrEqual(extras.length + attempted.length - 1);
      if (pool.length < extras.length + attempted.length) addsCut++;
      const buf = allocAligned(BS);
      for (const [block, exp] of expected) {
        await e.submit({ op: 'read', offset: block * BS, length: BS, buffer: buf });
        const got = buf.readUInt32LE(0);
        if (got !== 0) expect(buf.readUInt32LE(4), `block ${block} holds another block's data`).toBe(block);
        const ok = got === exp.acked || (exp.inflight !== null && got === exp.inflight);
        expect(ok, `block ${block}: holds ${got}, acknowledged ${exp.acked}, in flight ${exp.inflight}`).toBe(true);
        expected.set(block, { acked: got, inflight: null });
      }
      await e.close();
      const off = await offlineState(sparePath);
      expect(off.doubleMapped).toEqual([]);
      extras = pool;
    }
    const off = await offlineState(sparePath);
    console.log(`spare pool kill -9: ${CYCLES} cycles, ${acks} acknowledged writes, ${addsAcked} acknowledged spare adds, ${extras.length} spares, `
      + `${addsCut} adds cut before their commit, ${off.state.remaps.size} remapped blocks`);
    expect(extras.length).toBeGreaterThan(CYCLES);
    expect(off.state.spares.size).toBe(extras.length);
    const used = off.state.remaps.size;
    expect(used).toBeGreaterThan(0);
  }, 180_000);
});
