import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { startFaultDisk, requireTools, type FaultDisk } from '../helpers/faultdisk.js';
import { killAfterReady } from '../helpers/kill-child.js';
import { BS, offlineState, open, sparseFile, tempDir } from './fixtures.js';
import { allocAligned } from '../../src/native/backing.js';

requireTools('nbdkit', 'nbdkit-python', 'nbdfuse', '/dev/fuse');

const CHILD = new URL('./crash-child.mjs', import.meta.url).pathname;
const CYCLES = Number(process.env.DMR_CRASH_CYCLES ?? 8);
const BLOCKS = 512;

/** What a block may hold: the last acknowledged tag, or the one in flight after it. 0 = never written. */
type Expect = { acked: number; inflight: number | null };

async function runChild(mainPath: string, sparePath: string, format: boolean, seed: number, killAfterMs: number): Promise<string[]> {
  const logPath = `${sparePath}.child-${seed}.log`;
  await killAfterReady(CHILD, [mainPath, sparePath, String(BLOCKS), format ? 'format' : 'open', String(seed), logPath], killAfterMs);
  return readFileSync(logPath, 'utf8').split('\n').slice(0, -1); // the last piece may be a torn line
}

describe('kill -9 in the middle of a remap-heavy write loop', () => {
  let dir: string;
  let cleanup: () => void;
  let disk: FaultDisk;
  beforeAll(async () => {
    ({ dir, cleanup } = tempDir('crash'));
    disk = await startFaultDisk({ dir, name: 'main', sizeBytes: BLOCKS * BS * 2 });
  });
  afterAll(async () => {
    await disk?.stop();
    cleanup();
  });

  it(`loses no acknowledged write and maps no spare block twice over ${CYCLES} kills`, async () => {
    expect(existsSync(new URL('../../dist/src/engine/open.js', import.meta.url)), 'run `npm run build` first').toBe(true);
    const sparePath = sparseFile(join(dir, 'spare.img'), 16 * 1024 * 1024);
    const expected = new Map<number, Expect>();
    let seed = 1;
    let rnd = 12345;
    const rand = (n: number): number => { rnd = (rnd * 1103515245 + 12345) >>> 0; return (rnd >>> 16) % n; };
    const badRead: Array<[number, number]> = [];
    const badWrite: Array<[number, number]> = [];
    let verified = 0;
    let acks = 0;
    for (let cycle = 0; cycle < CYCLES; cycle++) {
      // New bad blocks every cycle, so that remaps keep happening. A block
      // that already holds acknowledged data only fails writes: a sector that
      // turns unreadable loses its data on any disk, which no remapper can
      // prevent and this test does not measure.
      for (let i = 0; i < 6; i++) {
        const b = rand(BLOCKS);
        badWrite.push([b * BS, BS]);
        if (!expected.has(b)) badRead.push([b * BS, BS]);
      }
      await disk.setBad({ read: badRead, write: badWrite });
      const lines = await runChild(disk.path, sparePath, cycle === 0, seed++, 150 + rand(600));
      for (const line of lines) {
        const [kind, b, t] = line.split(' ');
        if (kind !== 'I' && kind !== 'A') continue;
        const block = Number(b);
        const tag = Number(t);
        const cur = expected.get(block) ?? { acked: 0, inflight: null };
        if (kind === 'I') cur.inflight = tag;
        else { cur.acked = tag; cur.inflight = null; acks++; }
        expected.set(block, cur);
      }
      // reopen in this process and check every block ever written
      const e = await open({ mainPath: disk.path, sparePath });
      const buf = allocAligned(BS);
      for (const [block, exp] of expected) {
        let got: number;
        try {
          await e.submit({ op: 'read', offset: block * BS, length: BS, buffer: buf });
          got = buf.readUInt32LE(0);
          if (got !== 0) expect(buf.readUInt32LE(4), `block ${block} holds another block's data`).toBe(block);
        } catch (err) {
          // unreadable is only acceptable for a bad block never acknowledged
          expect(exp.acked, `block ${block}: acknowledged tag ${exp.acked} lost (${String(err)})`).toBe(0);
          got = -1;
        }
        const ok = got === exp.acked || (exp.inflight !== null && got === exp.inflight) || (got === -1 && exp.acked === 0);
        expect(ok, `block ${block}: holds ${got}, acknowledged ${exp.acked}, in flight ${exp.inflight}`).toBe(true);
        verified++;
        expected.set(block, { acked: got === -1 ? 0 : got, inflight: null });
      }
      await e.close();
      const off = await offlineState(sparePath);
      expect(off.doubleMapped).toEqual([]);
    }
    const off = await offlineState(sparePath);
    console.log(`kill -9 cycles: ${CYCLES}, acknowledged writes: ${acks}, block checks: ${verified}, remapped blocks: ${off.state.remaps.size}`);
    expect(off.state.remaps.size).toBeGreaterThan(0);
    expect(acks).toBeGreaterThan(CYCLES);
  }, 180_000);
});
