/**
 * Power loss on the host (issue 5). Main and spare are fault disks with a
 * volatile write cache (tests/helpers/faultdisk.ts, volatileCache): a write
 * stays in the nbdkit plugin's memory until a FLUSH (which fdatasync on the
 * nbdfuse file becomes) or a FUA write, and powerCut() drops what was not
 * flushed, or persists a seeded random subset of it (kept, dropped or torn
 * at 4 KiB), as a real disk may.
 *
 * Each cycle: a child process (power-loss-child.mjs) runs the engine on
 * them, with some of main's blocks failing writes (so writes remap), writing
 * random extents (some FUA) and flushing now and then, logging each issue,
 * ack and flush; the test SIGKILLs it at a random moment, waits until the
 * disks are quiet, and cuts the power of both. Then: `remapctl inspect` of
 * the spare is ok, the engine opens, its remapped count equals inspect's,
 * no spare block is mapped twice, and every block holds one of the values
 * the model allows (per block: the last write that was durable, i.e.
 * acknowledged before a completed flush began or acknowledged with FUA, or
 * any write to it issued after that one; with no durable write in this
 * cycle, the value verified after the previous cycle or any write issued).
 *
 *   DMR_POWERLOSS_CYCLES=100 npx vitest run tests/reliability/power-loss.test.ts
 */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { allocAligned } from '../../src/native/backing.js';
import { RecordType } from '../../src/metadata/records.js';
import { cleanupAll, makeTempDir, requireTools, startFaultDisk, type FaultDisk, type FaultDiskStats } from '../helpers/faultdisk.js';
import { ctl, requireBuild } from '../daemon/helpers.js';
import { killAfterReady } from '../helpers/kill-child.js';
import { BS, offlineState, open } from '../engine/fixtures.js';

requireTools('nbdkit', 'nbdkit-python', 'nbdfuse', 'fusermount3', '/dev/fuse');

const CHILD = new URL('./power-loss-child.mjs', import.meta.url).pathname;
const CYCLES = Number(process.env.DMR_POWERLOSS_CYCLES ?? 10);
const BLOCKS = 1024;
const SPARE_BYTES = 16 * 1024 * 1024;

interface Write { tag: number; fua: boolean; block: number; count: number; issued: number; acked: number | null }

/** Parses the child's log (complete lines only: the last one may be torn by the kill). */
function parseLog(text: string): { writes: Write[]; lastFlushStart: number; flushes: number; errors: string[] } {
  const lines = text.slice(0, text.lastIndexOf('\n') + 1).split('\n').slice(0, -1);
  const writes = new Map<number, Write>();
  const flushStart = new Map<number, number>();
  let lastFlushStart = -1;
  let flushes = 0;
  const errors: string[] = [];
  lines.forEach((line, i) => {
    const f = line.split(' ');
    switch (f[0]) {
      case 'I':
        writes.set(Number(f[1]), { tag: Number(f[1]), fua: f[2] === '1', block: Number(f[3]), count: Number(f[4]), issued: i, acked: null });
        break;
      case 'A': {
        const w = writes.get(Number(f[1]));
        if (w === undefined) throw new Error(`log line ${i}: ack of unknown write: ${line}`);
        w.acked = i;
        break;
      }
      case 'FS':
        flushStart.set(Number(f[1]), i);
        break;
      case 'FD':
        lastFlushStart = flushStart.get(Number(f[1])) ?? -1;
        flushes++;
        break;
      case 'E':
      case 'FE':
        errors.push(line);
        break;
      default:
        throw new Error(`log line ${i}: unknown: ${line}`);
    }
  });
  return { writes: [...writes.values()].sort((a, b) => a.issued - b.issued), lastFlushStart, flushes, errors };
}

/**
 * Per block, the tags it may hold after the cut. `base` is what the block
 * held (verified) before this cycle. Returns also how many blocks had a
 * durable write in this cycle (their check covers an acknowledged write).
 */
function acceptable(writes: Write[], lastFlushStart: number, base: Map<number, number>): { sets: Map<number, Set<number>>; durable: number } {
  const perBlock = new Map<number, Array<{ tag: number; durable: boolean }>>();
  for (const w of writes) {
    const durable = w.acked !== null && (w.fua || (lastFlushStart >= 0 && w.acked < lastFlushStart));
    for (let k = 0; k < w.count; k++) {
      const list = perBlock.get(w.block + k) ?? [];
      list.push({ tag: w.tag + k, durable });
      perBlock.set(w.block + k, list);
    }
  }
  const sets = new Map<number, Set<number>>();
  let durable = 0;
  for (const [block, list] of perBlock) {
    let from = -1;
    for (let i = 0; i < list.length; i++) if (list[i].durable) from = i;
    const s = new Set<number>();
    if (from < 0) s.add(base.get(block) ?? 0);
    else durable++;
    for (let i = Math.max(from, 0); i < list.length; i++) s.add(list[i].tag);
    sets.set(block, s);
  }
  return { sets, durable };
}

function runChild(disks: { main: string; spare: string }, format: boolean, seed: number, logPath: string, killAfterMs: number): Promise<void> {
  return killAfterReady(CHILD, [disks.main, disks.spare, String(BLOCKS), format ? 'format' : 'open', String(seed), logPath], killAfterMs, 'power-loss child');
}

const activity = (s: FaultDiskStats): number => s.reads + s.writes + s.flushes + s.zeros + s.trims;

/** Waits until neither disk has seen a request for 300 ms: late writes of the killed child would otherwise land after the cut. */
async function quiesce(disks: FaultDisk[]): Promise<void> {
  let last = -1;
  let still = 0;
  const end = Date.now() + 15_000;
  while (still < 3) {
    if (Date.now() > end) throw new Error('fault disks did not go quiet after the kill');
    await new Promise((r) => setTimeout(r, 100));
    const stats = await Promise.all(disks.map((d) => d.stats()));
    const a = stats.reduce((n, s) => n + activity(s) + s.blocked * 1e9, 0);
    still = a === last ? still + 1 : 0;
    last = a;
  }
}

describe('power loss on the host (volatile disk caches, cut after kill -9)', () => {
  let dir: string;
  let main: FaultDisk;
  let spare: FaultDisk;
  beforeAll(async () => {
    requireBuild();
    dir = await makeTempDir('dmr-powerloss');
    main = await startFaultDisk({ dir, name: 'main', sizeBytes: BLOCKS * BS, volatileCache: true });
    spare = await startFaultDisk({ dir, name: 'spare', sizeBytes: SPARE_BYTES, volatileCache: true });
  });
  afterAll(async () => {
    await cleanupAll();
  });

  it('a FUA write the engine acknowledged survives a cut with no flush after it', async () => {
    // disks of its own: the cycles below start from blank ones
    const fmain = await startFaultDisk({ dir, name: 'fua-main', sizeBytes: 64 * BS, volatileCache: true });
    const fspare = await startFaultDisk({ dir, name: 'fua-spare', sizeBytes: SPARE_BYTES, volatileCache: true });
    const e = await open({ mainPath: fmain.path, sparePath: fspare.path, format: true });
    const buf = allocAligned(2 * BS);
    try {
      await e.submit({ op: 'flush', offset: 0, length: 0 }); // the format, durable
      for (const [tag, fua] of [[0xf0a, true], [0xf0b, false]] as const) {
        for (let i = 0; i < 2 * BS; i += 4) buf.writeUInt32LE(tag, i);
        await e.submit({ op: 'write', offset: (tag & 0xff) * 2 * BS, length: 2 * BS, buffer: buf, fua });
      }
    } finally {
      await e.close(2000, { graceful: false });
    }
    expect((await fmain.stats()).unflushedWrites, 'the plain write is still cached').toBeGreaterThanOrEqual(1);
    await fmain.powerCut();
    await fspare.powerCut();
    const back = await open({ mainPath: fmain.path, sparePath: fspare.path });
    try {
      await back.submit({ op: 'read', offset: 0x0a * 2 * BS, length: 2 * BS, buffer: buf });
      expect(buf.readUInt32LE(0), 'the FUA write').toBe(0xf0a);
      expect(buf.readUInt32LE(2 * BS - 4)).toBe(0xf0a);
      await back.submit({ op: 'read', offset: 0x0b * 2 * BS, length: 2 * BS, buffer: buf });
      expect(buf.readUInt32LE(0), 'the plain write, never flushed').toBe(0);
    } finally {
      await back.close();
      await fmain.stop();
      await fspare.stop();
    }
  });

  it(`every write durable before the cut survives it, metadata stays valid, no spare block is mapped twice (${CYCLES} cycles)`, async () => {
    expect(existsSync(new URL('../../dist/src/engine/open.js', import.meta.url)), 'run `npx tsc -p .` first').toBe(true);
    let rnd = 4242;
    const rand = (n: number): number => { rnd = (rnd * 1103515245 + 12345) >>> 0; return (rnd >>> 16) % n; };
    const base = new Map<number, number>(); // block -> tag verified after the previous cycle
    const badWrite: Array<[number, number]> = [];
    const totals = { acked: 0, ackedDurable: 0, durableBlocks: 0, blockChecks: 0, flushes: 0, dropped: 0, kept: 0, torn: 0, inFlightSeen: 0 };
    for (let cycle = 0; cycle < CYCLES; cycle++) {
      // a few more blocks of main fail writes every cycle, so writes keep remapping
      for (let i = 0; i < 4; i++) badWrite.push([rand(BLOCKS) * BS, BS]);
      await main.setBad({ write: badWrite });
      const logPath = join(dir, `child-${cycle}.log`);
      await runChild({ main: main.path, spare: spare.path }, cycle === 0, cycle + 1, logPath, 200 + rand(900));
      await quiesce([main, spare]);
      // odd cycles: a random subset of the unflushed writes reaches the disks
      const subset = cycle % 2 === 1 ? { keepRandomSubset: 1000 + cycle } : {};
      for (const d of [main, spare]) {
        const c = await d.powerCut(subset);
        totals.dropped += c.dropped;
        totals.kept += c.kept;
        totals.torn += c.torn;
      }

      const log = parseLog(readFileSync(logPath, 'utf8'));
      expect(log.errors, 'the child saw failed writes or flushes').toEqual([]);
      totals.acked += log.writes.filter((w) => w.acked !== null).length;
      totals.ackedDurable += log.writes.filter((w) => w.acked !== null && (w.fua || w.acked < log.lastFlushStart)).length;
      totals.flushes += log.flushes;
      const { sets, durable } = acceptable(log.writes, log.lastFlushStart, base);
      totals.durableBlocks += durable;

      // metadata valid offline, before anything opens it
      const insp = await ctl(null, '--json', 'inspect', spare.path);
      expect(insp.code, `cycle ${cycle}: remapctl inspect: ${insp.stdout}${insp.stderr}`).toBe(0);
      const report = JSON.parse(insp.stdout) as { ok: boolean; counts: { remapped: number } | null };
      expect(report.ok).toBe(true);

      const e = await open({ mainPath: main.path, sparePath: spare.path });
      try {
        const st = e.status();
        expect(st.state).toBe('running');
        expect(st.remappedBlocks, `cycle ${cycle}: engine and inspect disagree`).toBe(report.counts?.remapped);
        const spares = new Map<number, number>();
        for (const r of e.snapshotRecords()) {
          if (r.type !== RecordType.REMAP) continue;
          expect(spares.get(r.spare), `cycle ${cycle}: spare block ${r.spare} mapped by blocks ${spares.get(r.spare)} and ${r.logical}`).toBeUndefined();
          spares.set(r.spare, r.logical);
        }
        const buf = allocAligned(BS);
        for (let block = 0; block < BLOCKS; block++) {
          await e.submit({ op: 'read', offset: block * BS, length: BS, buffer: buf });
          const got = buf.readUInt32LE(0);
          const want = got === 0 ? 0 : block;
          let whole = buf.readUInt32LE(4) === want;
          for (let i = 8; i < BS && whole; i += 4) whole = buf.readUInt32LE(i) === got;
          expect(whole, `cycle ${cycle}: block ${block} is torn or holds another block's data (tag ${got})`).toBe(true);
          const allowed = sets.get(block) ?? new Set([base.get(block) ?? 0]);
          if (!allowed.has(got)) {
            const hist = log.writes.filter((w) => w.block <= block && block < w.block + w.count)
              .map((w) => `tag ${w.tag + block - w.block} issued@${w.issued} acked@${w.acked ?? '-'}${w.fua ? ' fua' : ''}`);
            expect.fail(`cycle ${cycle}: block ${block} holds tag ${got}, allowed ${[...allowed].join(',')}; spare block ${e.lookup(block)}, `
              + `main bad for writes: ${badWrite.some(([o]) => o === block * BS)}; last completed flush began @${log.lastFlushStart}; writes: ${hist.join('; ')}`);
          }
          if (sets.has(block) && got !== [...allowed][0]) totals.inFlightSeen++;
          base.set(block, got);
          totals.blockChecks++;
        }
      } finally {
        await e.close();
      }
      const off = await offlineState(spare.path);
      expect(off.doubleMapped).toEqual([]);
    }
    const off = await offlineState(spare.path);
    console.log(`power loss: cycles ${CYCLES}, writes acknowledged ${totals.acked} (durable before the cut: ${totals.ackedDurable}), `
      + `flushes completed ${totals.flushes}, blocks with a durable write checked ${totals.durableBlocks}, block checks ${totals.blockChecks}, `
      + `blocks holding a later (not yet durable) write ${totals.inFlightSeen}, unflushed writes at the cuts: dropped ${totals.dropped}, kept ${totals.kept}, torn ${totals.torn}; `
      + `remapped blocks ${off.state.remaps.size}`);
    expect(off.state.remaps.size).toBeGreaterThan(0);
    expect(totals.durableBlocks).toBeGreaterThan(CYCLES);
    expect(totals.dropped).toBeGreaterThan(0);
  }, 300_000);
});
