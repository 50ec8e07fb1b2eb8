/**
 * Soak (issue 5): a bounded mixed workload through the real daemon with
 * faults injected at random, everything verified at the end.
 *
 * The device `soak` has a fault disk as main (32 MiB) and another as spare
 * (16 MiB), exported on an NBD unix socket. For DMR_SOAK_SECONDS (60 by
 * default, up to 600):
 *  - a libnbd client (nbd_client.py soak, queue depth 8) writes tagged
 *    extents of 1-4 blocks (some FUA), reads and checks them against its
 *    model, trims, writes zeroes and flushes, over blocks 0..CLIENT_BLOCKS;
 *  - the test injects, at random moments: blocks of the client's area that
 *    start failing writes (so writes remap), unreadable blocks in a reserved
 *    area the client never writes (found by scans, which leave them pending),
 *    a slow spare (write latency), short hangs of the main or the spare
 *    (well under the metadata timeout), manual remaps of random blocks of
 *    the client's area (racing the client's writes), and scans of the
 *    reserved area;
 *  - status is polled all along: running, and every count only grows.
 * At the end the client checks every block against its model (every
 * acknowledged write reads back, trimmed blocks hold their old data or
 * zeroes); the status counts must agree with each other and with
 * `remapctl inspect` of the spare after removal (metadata ok, no spare block
 * mapped twice); the device is added again from its metadata and every
 * block checked once more.
 *
 *   npx tsc -p . && npx vitest run tests/reliability/soak.test.ts
 *   DMR_SOAK_SECONDS=600 npx vitest run tests/reliability/soak.test.ts
 */
import { spawn } from 'node:child_process';
import { existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cleanupAll, makeTempDir, requireTools, startFaultDisk, SYSTEM_PYTHON, type FaultDisk } from '../helpers/faultdisk.js';
import { ctl, request, startDaemon, type Daemon } from '../daemon/helpers.js';
import { offlineState } from '../engine/fixtures.js';

requireTools('nbdkit', 'nbdkit-python', 'nbdfuse', 'fusermount3', '/dev/fuse', SYSTEM_PYTHON);

const CLIENT = new URL('./nbd_client.py', import.meta.url).pathname;
const SECONDS = Math.min(600, Math.max(5, Number(process.env.DMR_SOAK_SECONDS ?? 60)));
const SEED = Number(process.env.DMR_SOAK_SEED ?? 20261125);
const BS = 4096;
const MAIN_BLOCKS = 8192;
/** The client's area; the blocks above it are the reserved area for unreadable blocks and scans. */
const CLIENT_BLOCKS = 7680;

interface Status {
  state: string; remappedBlocks: number; pendingBlocks: number; badSpareBlocks: number; quarantinedSpareBlocks: number;
  spareBlocksUsed: number; spareBlocksTotal: number; spareExhausted: boolean; readErrors: number; writeErrors: number;
  metadataSeq: number; failReason: string | null;
  stats: { reads: number; writes: number; flushes: number; discards: number; writeZeroes: number; autoRemaps: number; manualRemaps: number;
    commitFailures: number; flushErrors: number; spareErrors: number; otherErrors: number };
}

interface SoakDone {
  ops: Record<string, number>; bytesWritten: number; readBlocksChecked: number; finalBlocksChecked: number; finalNonZero: number;
  errors: string[]; trimErrors: Array<[number, number]>; finalMismatches: string[];
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function runPy(args: string[]): { done: Promise<{ code: number | null; stdout: string; stderr: string }>; ready: Promise<void>; kill: () => void } {
  const p = spawn(SYSTEM_PYTHON, [CLIENT, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  let readyResolve!: () => void;
  const ready = new Promise<void>((r) => { readyResolve = r; });
  p.stdout.setEncoding('utf8').on('data', (c: string) => { stdout += c; if (stdout.includes('READY')) readyResolve(); });
  p.stderr.setEncoding('utf8').on('data', (c: string) => { stderr += c; });
  const done = new Promise<{ code: number | null; stdout: string; stderr: string }>((res) => p.on('close', (code) => { readyResolve(); res({ code, stdout, stderr }); }));
  return { done, ready, kill: () => { if (p.exitCode === null) p.kill('SIGKILL'); } };
}

describe(`soak: ${SECONDS} s of mixed NBD I/O with random faults`, () => {
  let dir: string;
  let main: FaultDisk;
  let spare: FaultDisk;
  let d: Daemon | undefined;
  let killClient: (() => void) | undefined;

  beforeAll(async () => {
    dir = await makeTempDir('dmr-soak');
    main = await startFaultDisk({ dir, name: 'main', sizeBytes: MAIN_BLOCKS * BS });
    spare = await startFaultDisk({ dir, name: 'spare', sizeBytes: 16 << 20 });
  });

  afterAll(async () => {
    killClient?.();
    await spare?.setHang(false).catch(() => undefined);
    await main?.setHang(false).catch(() => undefined);
    if (d !== undefined) await d.stop('SIGKILL');
    await cleanupAll();
  });

  it('every acknowledged write reads back, the metadata is valid and the counts agree', async () => {
    d = await startDaemon(dir);
    const daemon = d;
    const nbdSock = join(dir, 'soak.nbd');
    const uri = `nbd+unix:///soak?socket=${nbdSock}`;
    const add = await ctl(daemon.sock, 'add', 'soak', '--main', main.path, '--spare', spare.path, '--format', '--nbd-unix', nbdSock);
    expect(add.code, add.stderr).toBe(0);
    const status = async (): Promise<Status> => {
      const r = await request(daemon.sock, 'status', { name: 'soak' });
      expect(r.ok, JSON.stringify(r)).toBe(true);
      return r.result as Status;
    };

    let rnd = SEED >>> 0 || 1;
    const rand = (n: number): number => {
      rnd ^= rnd << 13; rnd >>>= 0; rnd ^= rnd >>> 17; rnd ^= rnd << 5; rnd >>>= 0;
      return rnd % n;
    };
    const stopFile = join(dir, 'soak.stop');
    const modelFile = join(dir, 'soak.model.json');
    const client = runPy(['soak', uri, String(CLIENT_BLOCKS), String(SEED % 1000), stopFile, modelFile, '8']);
    killClient = client.kill;
    await client.ready;

    const writeBad: Array<[number, number]> = [];
    const readBad: Array<[number, number]> = [];
    const unreadable = new Set<number>();
    const f = { writeBadBlocks: 0, unreadableBlocks: 0, slowSpare: 0, mainHangs: 0, spareHangs: 0, manualRemapCalls: 0, manualRemapped: 0,
      manualAlready: 0, scans: 0, statusPolls: 0 };
    const started = Date.now();
    const until = started + SECONDS * 1000;

    // Status polling: running, and the counts only grow.
    let polling = true;
    let last: Status | undefined;
    const poller = (async (): Promise<void> => {
      while (polling) {
        const s = await status();
        f.statusPolls++;
        expect(s.state, `status: ${JSON.stringify(s)}`).toBe('running');
        expect(s.spareBlocksUsed).toBeGreaterThanOrEqual(s.remappedBlocks);
        expect(s.spareBlocksUsed).toBeLessThanOrEqual(s.spareBlocksTotal);
        if (last !== undefined) {
          for (const k of ['remappedBlocks', 'pendingBlocks', 'spareBlocksUsed', 'metadataSeq', 'readErrors', 'writeErrors'] as const) {
            expect(s[k], `${k} went down`).toBeGreaterThanOrEqual(last[k]);
          }
        }
        last = s;
        await sleep(250);
      }
    })();

    let scanJob: string | undefined;
    const scanReserved = async (): Promise<string> => {
      const r = await request(daemon.sock, 'scanStart', { name: 'soak', startBlock: CLIENT_BLOCKS, endBlock: MAIN_BLOCKS });
      expect(r.ok, JSON.stringify(r)).toBe(true);
      f.scans++;
      return (r.result as { jobId: string }).jobId;
    };
    const scanDone = async (jobId: string): Promise<{ state: string; unreadable: number }> => {
      for (;;) {
        const r = await request(daemon.sock, 'scanStatus', { jobId });
        expect(r.ok, JSON.stringify(r)).toBe(true);
        const j = (r.result as { job: { state: string; unreadable: number } }).job;
        if (j.state !== 'running' && j.state !== 'paused') return j;
        await sleep(100);
      }
    };

    while (Date.now() < until) {
      await sleep(200 + rand(600));
      const clientGone = await Promise.race([client.done.then(() => true), sleep(0).then(() => false)]);
      if (clientGone) break; // the client failed: its output tells why (checked below)
      switch (rand(7)) {
        case 0: { // blocks of the client's area start failing writes
          for (let i = 1 + rand(3); i > 0; i--) writeBad.push([rand(CLIENT_BLOCKS) * BS, BS]);
          f.writeBadBlocks = writeBad.length;
          await main.setBad({ write: writeBad, read: readBad });
          break;
        }
        case 1: { // an unreadable block in the reserved area
          const b = CLIENT_BLOCKS + rand(MAIN_BLOCKS - CLIENT_BLOCKS);
          if (!unreadable.has(b)) {
            unreadable.add(b);
            readBad.push([b * BS, BS]);
            f.unreadableBlocks = unreadable.size;
            await main.setBad({ write: writeBad, read: readBad });
          }
          break;
        }
        case 2: { // a slow spare for a while
          f.slowSpare++;
          await spare.setDelay({ write: 10 + rand(40), read: rand(10) });
          await sleep(500 + rand(1500));
          await spare.setDelay({});
          break;
        }
        case 3: { // a short hang of main or spare
          const disk = rand(2) === 0 ? main : spare;
          if (disk === main) f.mainHangs++;
          else f.spareHangs++;
          await disk.setHang(true);
          await sleep(100 + rand(400));
          await disk.setHang(false);
          break;
        }
        case 4:
        case 5: { // manual remap of random blocks of the client's area, racing its writes
          const blocks = Array.from({ length: 1 + rand(8) }, () => rand(CLIENT_BLOCKS));
          const r = await request(daemon.sock, 'remap', { name: 'soak', blocks });
          expect(r.ok, JSON.stringify(r)).toBe(true);
          f.manualRemapCalls++;
          for (const x of (r.result as { results: Array<{ block: number; result: string; reason?: string }> }).results) {
            expect(x.result, `manual remap of block ${x.block}: ${JSON.stringify(x)}`).toMatch(/^(remapped|already-remapped)$/);
            if (x.result === 'remapped') f.manualRemapped++;
            else f.manualAlready++;
          }
          break;
        }
        default: { // scan the reserved area (one at a time)
          if (scanJob === undefined || (await scanDone(scanJob)).state !== 'running') scanJob = await scanReserved();
          break;
        }
      }
    }
    await spare.setDelay({});
    await main.setHang(false);
    await spare.setHang(false);

    writeFileSync(stopFile, '');
    const c = await client.done;
    killClient = undefined;
    const doneLine = c.stdout.split('\n').find((l) => l.startsWith('DONE '));
    expect(doneLine, `soak client: code ${c.code}\n${c.stdout.slice(-2000)}\n${c.stderr.slice(-4000)}`).toBeDefined();
    const r = JSON.parse((doneLine as string).slice(5)) as SoakDone;
    expect(c.code).toBe(0);
    expect(r.errors, 'error answers during the soak').toEqual([]);
    expect(r.finalMismatches, 'blocks not holding what the model allows').toEqual([]);
    expect(r.finalBlocksChecked).toBe(CLIENT_BLOCKS);
    // A trim is answered EIO only when its range holds a block of main that fails writes (trims too).
    const badBlocks = new Set(writeBad.map(([o]) => o / BS));
    for (const [b, n] of r.trimErrors) {
      expect(Array.from({ length: n }, (_, k) => b + k).some((x) => badBlocks.has(x)), `trim of blocks ${b}+${n} failed EIO over no bad block`).toBe(true);
    }

    // A last scan of the reserved area finds every unreadable block; they are pending.
    if (scanJob !== undefined) await scanDone(scanJob);
    const lastScan = await scanDone(await scanReserved());
    expect(lastScan.state).toBe('done');
    expect(lastScan.unreadable).toBe(unreadable.size);
    polling = false;
    await poller;

    const s = await status();
    expect(s).toMatchObject({ state: 'running', pendingBlocks: unreadable.size, spareExhausted: false, badSpareBlocks: 0 });
    expect(s.stats.autoRemaps + s.stats.manualRemaps, 'remaps counted vs remapped blocks').toBe(s.remappedBlocks);
    expect(s.stats.manualRemaps).toBe(f.manualRemapped);
    expect(s.spareBlocksUsed).toBe(s.remappedBlocks + s.quarantinedSpareBlocks);
    expect(s.stats.commitFailures).toBe(0);
    expect(s.stats.flushErrors).toBe(0);
    expect(s.stats.otherErrors).toBe(0);
    expect(s.stats.flushes).toBeGreaterThanOrEqual(r.ops.flush);
    expect(s.stats.discards).toBeGreaterThanOrEqual(r.ops.trim);
    expect(s.stats.writeZeroes).toBeGreaterThanOrEqual(r.ops.zero);
    expect(s.stats.writes).toBeGreaterThanOrEqual(r.ops.write + r.ops.fua);
    expect(s.remappedBlocks).toBeGreaterThan(0);
    // Error-level lines: only the health verdict (64 remaps in its window make it "failing").
    expect(daemon.logs.filter((l) => l.level >= 50 && l.event !== 'health-changed'), 'error-level log lines').toEqual([]);
    expect(daemon.stderr).toBe('');

    // Remove, then the metadata on its own: valid, no spare block twice, the same counts.
    const rm = await ctl(daemon.sock, 'remove', 'soak');
    expect(rm.code, rm.stderr).toBe(0);
    const insp = await ctl(null, '--json', 'inspect', spare.path);
    expect(insp.code, insp.stdout + insp.stderr).toBe(0);
    const report = JSON.parse(insp.stdout) as { ok: boolean; counts: { remapped: number; pending: number } };
    expect(report.ok).toBe(true);
    expect(report.counts).toMatchObject({ remapped: s.remappedBlocks, pending: s.pendingBlocks });
    const off = await offlineState(spare.path);
    expect(off.doubleMapped, 'spare blocks mapped twice').toEqual([]);
    expect(off.state.remaps.size).toBe(s.remappedBlocks);

    // Added again from its metadata: the same counts, and every block checked once more.
    const again = await ctl(daemon.sock, 'add', 'soak', '--main', main.path, '--spare', spare.path, '--nbd-unix', nbdSock);
    expect(again.code, again.stderr).toBe(0);
    const s2 = await status();
    expect(s2).toMatchObject({ state: 'running', remappedBlocks: s.remappedBlocks, pendingBlocks: s.pendingBlocks });
    expect(existsSync(modelFile)).toBe(true);
    const chk = await runPy(['check', uri, String(CLIENT_BLOCKS), modelFile]).done;
    expect(chk.code, chk.stderr).toBe(0);
    const checked = JSON.parse(chk.stdout) as { checked: number; nonZero: number; bad: string[] };
    expect(checked.bad).toEqual([]);
    expect(checked.checked).toBe(CLIENT_BLOCKS);
    expect(await daemon.stop()).toBe(0);
    d = undefined;

    const secs = (Date.now() - started) / 1000;
    console.log(`soak: ${SECONDS} s (seed ${SEED}), ${secs.toFixed(0)} s in all\n`
      + `  client: ${r.ops.write} writes + ${r.ops.fua} FUA writes (${(r.bytesWritten / 1048576).toFixed(1)} MiB), ${r.ops.read} reads `
      + `(${r.readBlocksChecked} blocks checked on the fly), ${r.ops.trim} trims (${r.trimErrors.length} answered EIO over a bad block), ${r.ops.zero} write-zeroes, ${r.ops.flush} flushes; no other error\n`
      + `  faults: ${f.writeBadBlocks} blocks failing writes, ${f.unreadableBlocks} unreadable blocks (reserved area), ${f.slowSpare} slow-spare periods, `
      + `${f.mainHangs} main hangs, ${f.spareHangs} spare hangs; ${f.manualRemapCalls} manual remap calls (${f.manualRemapped} remapped, `
      + `${f.manualAlready} already remapped), ${f.scans} scans, ${f.statusPolls} status polls\n`
      + `  end: ${r.finalBlocksChecked} blocks checked against the model (${r.finalNonZero} holding data), again after re-adding from the metadata; `
      + `remapped ${s.remappedBlocks} (auto ${s.stats.autoRemaps}, manual ${s.stats.manualRemaps}), pending ${s.pendingBlocks}, `
      + `quarantined ${s.quarantinedSpareBlocks}, spare used ${s.spareBlocksUsed}/${s.spareBlocksTotal}, metadata seq ${s.metadataSeq}; `
      + `inspect ok, no spare block mapped twice; write errors ${s.writeErrors}, read errors ${s.readErrors}`);
  }, (SECONDS + 120) * 1000);
});
