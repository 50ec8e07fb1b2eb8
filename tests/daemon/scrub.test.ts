/**
 * The background scrub (config key `scrub`), against the real daemon with a
 * fault disk as main: with a tiny interval it scans in the background,
 * pauses while an NBD client (nbdsh) keeps reading, and while a manual scan
 * runs, resumes at the block where it stopped, finds the unreadable block
 * (which becomes pending), and stops with its device. Broken scrub configs
 * stop the daemon with exit 2 and a message naming the key.
 */
import { spawn } from 'node:child_process';
import { readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cleanupAll, makeTempDir, requireTools, startFaultDisk, type FaultDisk } from '../helpers/faultdisk.js';
import { DAEMON, REMAPCTL, ctl, runNode, startDaemon, type Daemon, type LogLine } from './helpers.js';

requireTools('nbdkit', 'nbdkit-python', 'nbdfuse', 'fusermount3', '/dev/fuse', 'nbdsh');

const SYS_ENV = { ...process.env, PATH: `/usr/bin:/bin:${process.env.PATH ?? ''}` };
const BS = 4096;
const BLOCKS = 4096; // 16 MiB
const BAD = 2000;

interface Scrub {
  lastPassEndedAt: string | null;
  state: string; pauseReason: string | null; nextBlock: number; passesDone: number; pauses: number; unreadable: number;
  current: { blocksDone: number; nextBlock: number; state: string } | null;
}

async function until<T>(f: () => Promise<T | null>, what: string, timeoutMs = 30_000): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await f();
    if (v !== null) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe('scrub config', () => {
  it('a broken "scrub" stops the daemon with exit 2, naming the key', async () => {
    const dir = await makeTempDir('dmr-scrub-cfg-');
    const cases: Array<[unknown, RegExp]> = [
      [5, /"scrub" must be an object \{intervalHours, rateMBps, idleMs\}, null or false, got 5/],
      [[1], /"scrub" must be an object/],
      [{ rateMBps: 0 }, /"scrub\.rateMBps" must be a number greater than 0 and at most 100000, got 0/],
      [{ rateMBps: '8' }, /"scrub\.rateMBps" must be a number/],
      [{ intervalHours: -1 }, /"scrub\.intervalHours" must be a number greater than 0/],
      [{ intervalHours: 1e-9 }, /"scrub\.intervalHours" must be at least 1 ms/],
      [{ intervalHours: 1e9 }, /"scrub\.intervalHours" must be a number greater than 0 and at most 87600/],
      [{ idleMs: 1.5 }, /"scrub\.idleMs" must be an integer number of milliseconds in 0\.\.3600000, got 1\.5/],
      [{ idleMs: -1 }, /"scrub\.idleMs" must be an integer/],
      [{ every: 3 }, /unknown key "scrub\.every" \(known: intervalHours, rateMBps, idleMs\)/],
    ];
    for (const [i, [scrub, msg]] of cases.entries()) {
      const cfg = join(dir, `cfg-${i}.json`);
      writeFileSync(cfg, JSON.stringify({ stateDir: join(dir, 'state'), controlSocket: join(dir, 'c.sock'), scrub }));
      const r = await runNode(DAEMON, ['--config', cfg]);
      expect(r.code, `${JSON.stringify(scrub)}: ${r.stderr}`).toBe(2);
      expect(r.stderr).toMatch(msg);
      expect(r.stderr).not.toMatch(/\n\s+at /); // no stack trace
    }
    // null and false switch it off; {} takes the defaults.
    for (const scrub of [null, false, {}]) {
      const cfg = join(dir, 'ok.json');
      writeFileSync(cfg, JSON.stringify({ scrub }));
      const d = await startDaemon(dir, { args: ['--config', cfg] });
      expect(await d.stop()).toBe(0);
    }
  });
});

describe('background scrub', () => {
  let dir: string;
  let disk: FaultDisk;
  let d: Daemon;

  beforeAll(async () => {
    dir = await makeTempDir('dmr-scrub-');
    disk = await startFaultDisk({ dir, name: 'main', sizeBytes: BLOCKS * BS });
    await disk.setBad({ read: [[BAD * BS, BS]] });
  });
  afterAll(async () => {
    if (d !== undefined) await d.stop();
    await cleanupAll();
  });

  it('scans in the background, pauses while a client is busy and during a manual scan, resumes where it stopped, finds the bad block', async () => {
    const cfg = join(dir, 'config.json');
    // A pass every 0.72 s, 16 MiB at 3 MiB/s (over 5 s a pass, so the client starts within the first), idle after 300 ms without client I/O.
    writeFileSync(cfg, JSON.stringify({ scrub: { intervalHours: 0.0002, rateMBps: 3, idleMs: 300 } }));
    d = await startDaemon(dir, { args: ['--config', cfg] });
    const spare = join(dir, 'spare.img');
    writeFileSync(spare, '');
    truncateSync(spare, 4 << 20);
    const nbd = join(dir, 'sb.nbd');
    const add = await ctl(d.sock, 'add', 'sb', '--main', disk.path, '--spare', spare, '--format', '--nbd-unix', nbd);
    expect(add.code, add.stderr).toBe(0);
    await d.waitLog((l) => l.event === 'scrub-scheduled' && l.device === 'sb');

    const scrub = async (): Promise<Scrub> => {
      const r = await ctl(d.sock, '--json', 'scan', 'sb', '--status');
      expect(r.code, r.stderr).toBe(0);
      return (JSON.parse(r.stdout) as { scrub: Scrub }).scrub;
    };

    // The first pass gets under way while nobody uses the device.
    const early = await until(async () => {
      const s = await scrub();
      return s.state === 'running' && (s.current?.blocksDone ?? 0) > 0 ? s : null;
    }, 'the first scrub pass under way');
    expect(early.passesDone).toBe(0);

    // A client that keeps reading (block 10, every 20 ms) until told to stop.
    const stop = join(dir, 'stop-client');
    const client = spawn('nbdsh', ['-u', `nbd+unix:///sb?socket=${nbd}`, '-c', [
      'import os, time',
      'n = 0',
      `while not os.path.exists(${JSON.stringify(stop)}):`,
      `    h.pread(${BS}, ${10 * BS})`,
      '    n += 1',
      '    time.sleep(0.02)',
      'print(n)',
    ].join('\n')], { env: SYS_ENV, stdio: ['ignore', 'pipe', 'pipe'] });
    let clientOut = '';
    client.stdout.setEncoding('utf8').on('data', (c: string) => { clientOut += c; });
    client.stderr.setEncoding('utf8').on('data', (c: string) => { clientOut += c; });
    const clientDone = new Promise<number | null>((res) => client.on('close', (code) => res(code)));

    // The scrub starts a pass and pauses for the client.
    const paused = await until(async () => {
      const s = await scrub();
      return s.state === 'paused' && /client I\/O/.test(s.pauseReason ?? '') ? s : null;
    }, 'the scrub paused for the client');
    console.log(`[scrub] paused: ${JSON.stringify({ reason: paused.pauseReason, nextBlock: paused.nextBlock, passes: paused.passesDone })}`);
    // While the client keeps reading, the scrub does not move.
    await new Promise((r) => setTimeout(r, 800));
    const still = await scrub();
    expect(still.state).toBe('paused');
    expect(still.nextBlock).toBe(paused.nextBlock);
    expect(still.current?.blocksDone).toBe(paused.current?.blocksDone);
    const pauseLog = d.logs.filter((l) => l.event === 'scrub-paused' && l.device === 'sb').at(-1) as LogLine;
    expect(pauseLog.reason).toMatch(/client I\/O/);
    expect(pauseLog.nextBlock).toBe(paused.nextBlock);

    writeFileSync(stop, '');
    expect(await clientDone, clientOut).toBe(0);
    console.log(`[scrub] the client read ${clientOut.trim()} times`);
    // It resumes at the block where it paused, and the pass finishes without starting over.
    const resumed = await d.waitLog((l) => l.event === 'scrub-resumed' && l.device === 'sb' && l.time as number >= (pauseLog.time as number), 10_000);
    expect(resumed.nextBlock).toBe(pauseLog.nextBlock);
    const fin = await d.waitLog((l) => l.event === 'scrub-finished' && l.device === 'sb' && l.jobId === pauseLog.jobId, 20_000);
    expect(paused.nextBlock).toBeGreaterThan(0);
    expect(fin).toMatchObject({ state: 'done', blocksTotal: BLOCKS, blocksDone: BLOCKS, nextBlock: BLOCKS }); // the first pass, not started over
    expect(fin.pausedMs as number).toBeGreaterThan(0);

    // Some pass found the bad block, and it is pending.
    const found = await d.waitLog((l) => l.event === 'scrub-unreadable' && l.device === 'sb', 20_000);
    expect(found).toMatchObject({ block: BAD, errno: 'EIO', pending: true });
    const st = JSON.parse((await ctl(d.sock, '--json', 'status', 'sb')).stdout) as { pendingBlocks: number };
    expect(st.pendingBlocks).toBe(1);
    const all = d.logs.filter((l) => l.event === 'scrub-unreadable').map((l) => l.block);
    expect(new Set(all)).toEqual(new Set([BAD])); // nothing else

    // A manual scan pauses the scrub too.
    const slow = spawn(process.execPath, [REMAPCTL, '--socket', d.sock, 'scan', 'sb', '--rate', '1'], { stdio: 'ignore' });
    const slowDone = new Promise<number | null>((res) => slow.on('close', (code) => res(code)));
    const byScan = await until(async () => {
      const s = await scrub();
      return s.state === 'paused' && /manual scan/.test(s.pauseReason ?? '') ? s : null;
    }, 'the scrub paused for a manual scan');
    expect(byScan.pauseReason).toBe('a manual scan of the device is running');
    expect((await ctl(d.sock, 'scan', 'sb', '--cancel')).code).toBe(0);
    expect(await slowDone).toBe(1);
    const plain = await ctl(d.sock, 'scan', 'sb', '--status');
    expect(plain.stdout).toMatch(/^sb: scrub (running|paused|waiting)/m);

    // Removal stops the scrub at once; the daemon then stops cleanly.
    const rm = await ctl(d.sock, '--json', 'remove', 'sb', '--timeout', '3000');
    expect(rm.code, rm.stderr).toBe(0);
    expect((JSON.parse(rm.stdout) as { timedOut: boolean }).timedOut).toBe(false);
    const scrubsBefore = d.logs.filter((l) => l.event === 'scrub-started').length;
    await new Promise((r) => setTimeout(r, 1500)); // two intervals: no pass of a removed device
    expect(d.logs.filter((l) => l.event === 'scrub-started').length).toBe(scrubsBefore);
    expect(await d.stop()).toBe(0);
  });

  it('a daemon restart resumes a pass at its block and keeps the passes done (scrub.json)', async () => {
    const cfg = join(dir, 'config-restart.json');
    writeFileSync(cfg, JSON.stringify({ scrub: { intervalHours: 0.0002, rateMBps: 8, idleMs: 0 } }));
    const stateDir = join(dir, 'state-restart');
    d = await startDaemon(dir, { args: ['--config', cfg], stateDir });
    const spare = join(dir, 'spare-restart.img');
    writeFileSync(spare, '');
    truncateSync(spare, 4 << 20);
    expect((await ctl(d.sock, 'add', 'sr', '--main', disk.path, '--spare', spare, '--format')).code).toBe(0);
    const scrubOf = async (x: Daemon): Promise<Scrub> =>
      (JSON.parse((await ctl(x.sock, '--json', 'scan', 'sr', '--status')).stdout) as { scrub: Scrub }).scrub;
    await until(async () => {
      const s = await scrubOf(d);
      return s.state === 'running' && (s.current?.nextBlock ?? 0) >= 512 ? s : null;
    }, 'a scrub pass under way');
    expect(await d.stop()).toBe(0);
    const saved = (JSON.parse(readFileSync(join(stateDir, 'scrub.json'), 'utf8')) as { devices: Record<string, { nextBlock: number; passesDone: number; blocks: number }> }).devices.sr;
    const stopped = d.logs.find((l) => l.event === 'scrub-finished' && l.device === 'sr') as LogLine;
    console.log(`[scrub] stopped at ${String(stopped.nextBlock)}, saved ${JSON.stringify(saved)}`);
    expect(stopped).toMatchObject({ state: 'cancelled', cancelReason: 'device is being removed' });
    expect(saved).toMatchObject({ blocks: BLOCKS, passesDone: 0 });
    expect(saved.nextBlock).toBeGreaterThan(0);
    expect(saved.nextBlock).toBeLessThanOrEqual(stopped.nextBlock as number);

    // The next daemon reassembles sr and resumes the pass at the saved block, within a second.
    d = await startDaemon(dir, { args: ['--config', cfg], stateDir });
    const sched = await d.waitLog((l) => l.event === 'scrub-scheduled' && l.device === 'sr');
    expect(sched).toMatchObject({ nextBlock: saved.nextBlock, passesDone: 0 });
    expect(sched.firstPassInMs as number).toBeLessThanOrEqual(1000);
    const resumed = await d.waitLog((l) => l.event === 'scrub-started' && l.device === 'sr');
    expect(resumed.startBlock).toBe(saved.nextBlock);
    const fin = await d.waitLog((l) => l.event === 'scrub-finished' && l.device === 'sr' && l.state === 'done', 20_000);
    expect(fin.blocksTotal).toBe(BLOCKS - saved.nextBlock);
    await until(async () => ((await scrubOf(d)).passesDone === 1 ? true : null), 'the pass counted');
    expect(await d.stop()).toBe(0);
    // A third start knows the pass was done, and when.
    d = await startDaemon(dir, { args: ['--config', cfg], stateDir });
    const sched3 = await d.waitLog((l) => l.event === 'scrub-scheduled' && l.device === 'sr');
    expect(sched3.passesDone as number).toBeGreaterThanOrEqual(1);
    const st = await scrubOf(d);
    expect(st.lastPassEndedAt).not.toBeNull();
    expect(await d.stop()).toBe(0);
  });
});
