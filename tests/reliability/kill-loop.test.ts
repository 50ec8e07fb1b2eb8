/**
 * kill -9 loop through NBD (issue 5). The real daemon serves a device whose
 * main is a fault disk with blocks that fail writes (more every cycle, so
 * writes keep remapping) and whose spare is a plain file, exported on an
 * NBD unix socket. Each cycle: a libnbd client (nbd_client.py) writes random
 * extents with random tags at queue depth 8 and logs every issue and every
 * acknowledgement; the daemon gets SIGKILL at a random moment; `remapctl
 * inspect` of the spare must be ok with no spare block mapped twice; a new
 * daemon reassembles the device from devices.json; `remapctl status --json`
 * counts what inspect counted; and every block reads back (through NBD) as
 * its last acknowledged write, or a write issued after it that was in
 * flight at the kill (the page cache survives kill -9, so acknowledged
 * means durable enough here; power loss is power-loss.test.ts).
 *
 *   DMR_KILL_CYCLES=200 npx vitest run tests/reliability/kill-loop.test.ts
 */
import { spawn } from 'node:child_process';
import { readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cleanupAll, makeTempDir, requireTools, startFaultDisk, SYSTEM_PYTHON, type FaultDisk } from '../helpers/faultdisk.js';
import { ctl, startDaemon, type Daemon } from '../daemon/helpers.js';
import { offlineState } from '../engine/fixtures.js';

requireTools('nbdkit', 'nbdkit-python', 'nbdfuse', 'fusermount3', '/dev/fuse', SYSTEM_PYTHON);

const CLIENT = new URL('./nbd_client.py', import.meta.url).pathname;
const CYCLES = Number(process.env.DMR_KILL_CYCLES ?? 15);
const BS = 4096;
const BLOCKS = 1024;

interface Write { tag: number; block: number; count: number; acked: boolean }

function parseLog(text: string): { writes: Write[]; errors: string[]; lost: number } {
  const lines = text.slice(0, text.lastIndexOf('\n') + 1).split('\n').slice(0, -1);
  const writes = new Map<number, Write>();
  const errors: string[] = [];
  let lost = 0;
  for (const line of lines) {
    const f = line.split(' ');
    if (f[0] === 'I') writes.set(Number(f[1]), { tag: Number(f[1]), block: Number(f[2]), count: Number(f[3]), acked: false });
    else if (f[0] === 'A') {
      const w = writes.get(Number(f[1]));
      if (w === undefined) throw new Error(`ack of unknown write: ${line}`);
      w.acked = true;
    } else if (f[0] === 'E') errors.push(line);
    else if (f[0] === 'L') lost++;
    else throw new Error(`unknown log line: ${line}`);
  }
  return { writes: [...writes.values()], errors, lost };
}

/**
 * Per block written this cycle, the tags it may hold: its last acknowledged
 * write and any issued after it; with none acknowledged, what it held
 * before (`base`) and any issued. Writes are in issue order.
 */
function acceptable(writes: Write[], base: Map<number, number>): { sets: Map<number, Set<number>>; ackedBlocks: number } {
  const per = new Map<number, Array<{ tag: number; acked: boolean }>>();
  for (const w of writes) {
    for (let k = 0; k < w.count; k++) {
      const l = per.get(w.block + k) ?? [];
      l.push({ tag: w.tag + k, acked: w.acked });
      per.set(w.block + k, l);
    }
  }
  const sets = new Map<number, Set<number>>();
  let ackedBlocks = 0;
  for (const [block, l] of per) {
    let from = -1;
    for (let i = 0; i < l.length; i++) if (l[i].acked) from = i;
    const s = new Set<number>();
    if (from < 0) s.add(base.get(block) ?? 0);
    else ackedBlocks++;
    for (let i = Math.max(from, 0); i < l.length; i++) s.add(l[i].tag);
    sets.set(block, s);
  }
  return { sets, ackedBlocks };
}

function py(args: string[], onStdout?: (s: string) => void): { done: Promise<{ code: number | null; stdout: string; stderr: string }>; kill: () => void } {
  const p = spawn(SYSTEM_PYTHON, [CLIENT, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  p.stdout.setEncoding('utf8').on('data', (c: string) => { stdout += c; onStdout?.(stdout); });
  p.stderr.setEncoding('utf8').on('data', (c: string) => { stderr += c; });
  const done = new Promise<{ code: number | null; stdout: string; stderr: string }>((res) => p.on('close', (code) => res({ code, stdout, stderr })));
  return { done, kill: () => { if (p.exitCode === null) p.kill('SIGKILL'); } };
}

interface Status { state: string; remappedBlocks: number; pendingBlocks: number; spareBlocksUsed: number }

async function quiesce(disk: FaultDisk): Promise<void> {
  let last = -1;
  let still = 0;
  const end = Date.now() + 15_000;
  while (still < 3) {
    if (Date.now() > end) throw new Error('fault disk did not go quiet after the kill');
    await new Promise((r) => setTimeout(r, 100));
    const s = await disk.stats();
    const a = s.reads + s.writes + s.flushes + s.zeros + s.trims + s.blocked * 1e9;
    still = a === last ? still + 1 : 0;
    last = a;
  }
}

describe('kill -9 loop through NBD', () => {
  let dir: string;
  let disk: FaultDisk;
  let d: Daemon | undefined;
  beforeAll(async () => {
    dir = await makeTempDir('dmr-killloop');
    disk = await startFaultDisk({ dir, name: 'main', sizeBytes: BLOCKS * BS });
  });
  afterAll(async () => {
    if (d !== undefined) await d.stop('SIGKILL');
    await cleanupAll();
  });

  it(`every acknowledged write reads back after each of ${CYCLES} kills, status agrees with the metadata`, async () => {
    const spare = join(dir, 'spare.img');
    writeFileSync(spare, '');
    truncateSync(spare, 16 << 20);
    const sock = join(dir, 'kl.nbd');
    const uri = `nbd+unix:///kl?socket=${sock}`;
    d = await startDaemon(dir);
    const add = await ctl(d.sock, 'add', 'kl', '--main', disk.path, '--spare', spare, '--format', '--nbd-unix', sock);
    expect(add.code, add.stderr).toBe(0);

    let rnd = 777;
    const rand = (n: number): number => { rnd = (rnd * 1103515245 + 12345) >>> 0; return (rnd >>> 16) % n; };
    const base = new Map<number, number>();
    const badWrite: Array<[number, number]> = [];
    const totals = { acked: 0, issued: 0, ackedBlocks: 0, blockChecks: 0, inFlightLanded: 0 };
    let remapped = 0;
    for (let cycle = 0; cycle < CYCLES; cycle++) {
      for (let i = 0; i < 3; i++) badWrite.push([rand(BLOCKS) * BS, BS]);
      await disk.setBad({ write: badWrite });
      const logPath = join(dir, `client-${cycle}.log`);
      const daemon = d as Daemon;
      let timer: NodeJS.Timeout | undefined;
      const client = py(['write', uri, String(BLOCKS), String(cycle + 1), logPath, '8'], (out) => {
        if (timer === undefined && out.includes('READY')) timer = setTimeout(() => daemon.proc.kill('SIGKILL'), 100 + rand(700));
      });
      const guard = setTimeout(client.kill, 30_000);
      const c = await client.done;
      clearTimeout(guard);
      clearTimeout(timer);
      expect(c.code, `client: ${c.stderr}`).toBe(0);
      expect(await daemon.exited).toBe(null); // killed by the signal
      expect(daemon.proc.signalCode).toBe('SIGKILL');
      await quiesce(disk);

      const log = parseLog(readFileSync(logPath, 'utf8'));
      expect(log.errors, 'the daemon answered writes with errors').toEqual([]);
      totals.issued += log.writes.length;
      totals.acked += log.writes.filter((w) => w.acked).length;
      const { sets, ackedBlocks } = acceptable(log.writes, base);
      totals.ackedBlocks += ackedBlocks;

      // what the kill left: valid metadata, no spare block mapped twice
      const insp = await ctl(null, '--json', 'inspect', spare);
      expect(insp.code, `cycle ${cycle}: inspect: ${insp.stdout}${insp.stderr}`).toBe(0);
      const report = JSON.parse(insp.stdout) as { ok: boolean; counts: { remapped: number; pending: number } };
      expect(report.ok).toBe(true);
      const off = await offlineState(spare);
      expect(off.doubleMapped, `cycle ${cycle}: spare blocks mapped twice`).toEqual([]);
      expect(off.state.remaps.size).toBe(report.counts.remapped);

      // a new daemon reassembles the device from devices.json
      d = await startDaemon(dir);
      const st = await ctl(d.sock, '--json', 'status', 'kl');
      expect(st.code, st.stderr).toBe(0);
      const s = JSON.parse(st.stdout) as Status;
      expect(s.state).toBe('running');
      expect(s.remappedBlocks, `cycle ${cycle}: status vs inspect`).toBe(report.counts.remapped);
      expect(s.pendingBlocks).toBe(report.counts.pending);
      expect(s.spareBlocksUsed).toBeGreaterThanOrEqual(s.remappedBlocks);
      remapped = s.remappedBlocks;

      const dump = await py(['dump', uri, String(BLOCKS)]).done;
      expect(dump.code, dump.stderr).toBe(0);
      const tags = JSON.parse(dump.stdout) as number[];
      expect(tags.length).toBe(BLOCKS);
      for (let block = 0; block < BLOCKS; block++) {
        const got = tags[block];
        const allowed = sets.get(block) ?? new Set([base.get(block) ?? 0]);
        if (!allowed.has(got)) {
          const hist = log.writes.filter((w) => w.block <= block && block < w.block + w.count).map((w) => `${w.tag + block - w.block}${w.acked ? ' acked' : ''}`);
          expect.fail(`cycle ${cycle}: block ${block} reads ${got === -1 ? 'torn/foreign data' : got === -2 ? 'EIO' : `tag ${got}`}, `
            + `allowed ${[...allowed].join(',')}; writes this cycle: ${hist.join('; ')}`);
        }
        if (sets.has(block) && got !== [...allowed][0]) totals.inFlightLanded++;
        base.set(block, got);
        totals.blockChecks++;
      }
    }
    console.log(`kill -9 loop: cycles ${CYCLES}, writes issued ${totals.issued}, acknowledged ${totals.acked}, `
      + `blocks verified holding their last acknowledged write (or a later in-flight one) ${totals.ackedBlocks}, block checks ${totals.blockChecks}, `
      + `in-flight writes found landed ${totals.inFlightLanded}, remapped blocks ${remapped}`);
    expect(remapped).toBeGreaterThan(0);
    expect(totals.ackedBlocks).toBeGreaterThan(CYCLES);
    expect(await (d as Daemon).stop()).toBe(0);
    d = undefined;
  }, 600_000);
});
