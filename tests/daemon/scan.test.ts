/**
 * remapctl scan against the real daemon, whose main is a fault disk
 * (nbdkit + nbdfuse, tests/helpers/faultdisk.ts) with known unreadable
 * blocks, exported over NBD so that a real client (nbdsh) can read them.
 *
 * - the scan finds exactly the bad blocks, they become pending (status);
 * - --json events parse, one per line, and progress is monotonic;
 * - plain (non-terminal) output and the terminal bar (under script(1));
 * - --range limits the scan; bad ranges are usage errors naming the device and range;
 * - --rate: the rate limiter's own accounting (throttledMs) is used, and the
 *   throughput stays under a loose bound;
 * - --remap-unreadable --zero without --yes-destroy-unreadable-data is a usage
 *   error that sends nothing to the disk; with it the blocks read back as
 *   zeroes and are remapped;
 * - Ctrl-C cancels the job (exit 130); a device removed mid-scan stops the
 *   scan, within the removal's deadline.
 */
import { execFile, spawn } from 'node:child_process';
import { truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cleanupAll, makeTempDir, requireTools, startFaultDisk, type FaultDisk } from '../helpers/faultdisk.js';
import { REMAPCTL, ctl, request, startDaemon, type Daemon } from './helpers.js';

requireTools('nbdkit', 'nbdkit-python', 'nbdfuse', 'fusermount3', '/dev/fuse', 'nbdsh');

const SYS_ENV = { ...process.env, PATH: `/usr/bin:/bin:${process.env.PATH ?? ''}` };
const BS = 4096;
const MIB = 1024 * 1024;
const BLOCKS = 4096; // 16 MiB
const BAD = [300, 1000, 1001, 3000];

interface Snap {
  jobId: string; state: string; startBlock: number; endBlock: number; blocksDone: number; blocksTotal: number; percent: number;
  unreadable: number; unreadableBlocks: number[]; pending: number; zeroed: number; remapFailed: unknown[]; elapsedMs: number;
  bytesDone: number; limitBytesPerSec: number | null; throttledMs: number; throttledChunks: number; cancelReason: string | null; exitCode?: number;
}
interface Status { remappedBlocks: number; pendingBlocks: number; metadataSeq: number; spareBlocksUsed: number }

function events(stdout: string): Array<Record<string, unknown>> {
  return stdout.trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
}

function result(stdout: string): Snap {
  const ev = events(stdout);
  const last = ev[ev.length - 1];
  expect(last.event).toBe('result');
  return last as unknown as Snap;
}

/** errno name of an NBD read of one block, or "ok:<hex of the first 8 bytes>:<all zero>". */
function nbdRead(uri: string, block: number): Promise<string> {
  const code = [
    'import errno',
    'try:',
    `    b = h.pread(${BS}, ${block * BS})`,
    '    print("ok:" + b[:8].hex() + ":" + str(b == bytes(len(b))))',
    'except nbd.Error as e:',
    '    print(errno.errorcode.get(e.errnum, e.errnum))',
  ].join('\n');
  return new Promise((res, rej) => {
    execFile('nbdsh', ['-u', uri, '-c', code], { encoding: 'utf8', timeout: 30_000, env: SYS_ENV }, (err, stdout) => (err ? rej(err) : res(stdout.trim())));
  });
}

/** remapctl as a child we can signal; resolves with code and output. */
function spawnCtl(args: string[]): { child: ReturnType<typeof spawn>; done: Promise<{ code: number | null; stdout: string; stderr: string }>; lines: string[] } {
  const child = spawn(process.execPath, [REMAPCTL, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  const lines: string[] = [];
  child.stdout.setEncoding('utf8').on('data', (c: string) => {
    stdout += c;
    lines.push(...c.split('\n').filter((l) => l !== ''));
  });
  child.stderr.setEncoding('utf8').on('data', (c: string) => { stderr += c; });
  const done = new Promise<{ code: number | null; stdout: string; stderr: string }>((res) => child.on('close', (code) => res({ code, stdout, stderr })));
  return { child, done, lines };
}

async function until(pred: () => boolean, what: string, timeoutMs = 15_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe('remapctl scan through the daemon', () => {
  let dir: string;
  let disk: FaultDisk;
  let d: Daemon;
  let uri: string;
  let nbd: string;
  let spare: string;

  beforeAll(async () => {
    dir = await makeTempDir('dmr-scan-');
    disk = await startFaultDisk({ dir, name: 'main', sizeBytes: BLOCKS * BS });
    spare = join(dir, 'spare.img');
    writeFileSync(spare, '');
    truncateSync(spare, 4 * MIB);
    nbd = join(dir, 'sc.nbd');
    uri = `nbd+unix:///sc?socket=${nbd}`;
    d = await startDaemon(dir);
    const add = await ctl(d.sock, 'add', 'sc', '--main', disk.path, '--spare', spare, '--format', '--nbd-unix', nbd);
    expect(add.code, add.stderr).toBe(0);
    await disk.setBad({ read: BAD.map((b): [number, number] => [b * BS, BS]) });
  });
  afterAll(async () => {
    if (d !== undefined) await d.stop();
    await cleanupAll();
  });

  const status = async (): Promise<Status> => {
    const r = await ctl(d.sock, '--json', 'status', 'sc');
    expect(r.code, r.stderr).toBe(0);
    return JSON.parse(r.stdout) as Status;
  };

  it('finds exactly the unreadable blocks, which become pending; --json events parse and progress is monotonic', async () => {
    expect((await status()).pendingBlocks).toBe(0);
    const r = await ctl(d.sock, '--json', 'scan', 'sc');
    expect(r.code, r.stderr).toBe(1); // unreadable blocks were found (and left pending)
    const ev = events(r.stdout);
    expect(ev[0]).toMatchObject({ event: 'started', device: 'sc', startBlock: 0, endBlock: BLOCKS, blockSize: BS, blocksDone: 0 });
    const progress = ev.filter((e) => e.event === 'progress');
    expect(progress.length).toBeGreaterThanOrEqual(1);
    for (let i = 1; i < progress.length; i++) {
      expect(progress[i].blocksDone as number).toBeGreaterThanOrEqual(progress[i - 1].blocksDone as number);
      expect(progress[i].percent as number).toBeGreaterThanOrEqual(progress[i - 1].percent as number);
      expect(progress[i].unreadable as number).toBeGreaterThanOrEqual(progress[i - 1].unreadable as number);
    }
    expect(ev.filter((e) => e.event === 'unreadable').map((e) => e.block)).toEqual(BAD);
    const res = result(r.stdout);
    console.log(`[scan] whole device: ${res.blocksDone} blocks in ${res.elapsedMs} ms, unreadable ${JSON.stringify(res.unreadableBlocks)}`);
    expect(res).toMatchObject({ state: 'done', blocksDone: BLOCKS, blocksTotal: BLOCKS, percent: 100, unreadable: BAD.length, unreadableBlocks: BAD,
      pending: BAD.length, zeroed: 0, throttledMs: 0, limitBytesPerSec: null, exitCode: 1 });
    const s = await status();
    expect(s.pendingBlocks).toBe(BAD.length);
    expect(s.remappedBlocks).toBe(0);
    // The daemon logged the start, each block and the result, with the device.
    const fin = await d.waitLog((l) => l.event === 'scan-finished' && l.jobId === res.jobId);
    expect(fin).toMatchObject({ device: 'sc', state: 'done', unreadable: BAD.length, unreadableBlocks: BAD });
    expect(d.logs.filter((l) => l.event === 'scan-unreadable' && l.jobId === res.jobId).map((l) => l.block)).toEqual(BAD);
    // --status shows the job.
    const st = await ctl(d.sock, 'scan', 'sc', '--status');
    expect(st.code, st.stderr).toBe(0);
    expect(st.stdout).toContain(`last scan job ${res.jobId}`);
    expect(st.stdout).toContain('4 unreadable: 300, 1000, 1001, 3000');
    expect(st.stdout).toContain('scrub off');
  });

  it('plain output without a terminal, and a progress bar in one (script(1))', async () => {
    const r = await ctl(d.sock, 'scan', 'sc', '--range', '900-1100');
    expect(r.code, r.stderr).toBe(1);
    expect(r.stdout).toMatch(/^scan sc: blocks 900\.\.1099 \(800\.0 KiB\), job scan-\d+-\d+$/m);
    expect(r.stdout).toMatch(/^sc: block 1000 is unreadable$/m);
    expect(r.stdout).toMatch(/^sc: block 1001 is unreadable$/m);
    expect(r.stdout).toMatch(/^scan sc done: 200\/200 blocks \(800\.0 KiB\) of 900\.\.1099 in /m);
    expect(r.stdout).toMatch(/^2 unreadable: 1000, 1001$/m);
    expect(r.stdout).not.toContain('\r');
    const tty = await new Promise<string>((res) => {
      execFile('script', ['-qec', `${process.execPath} ${REMAPCTL} --socket ${d.sock} scan sc --range 0-2048 --rate 8`, '/dev/null'],
        { encoding: 'utf8', timeout: 30_000 }, (_err, stdout) => res(stdout));
    });
    expect(tty).toMatch(/\r\x1b\[K\[#*\.*\] \d+\.\d% \d+\.\d MiB\/s ETA \S+ errors \d/);
    expect(tty).toMatch(/sc: block 300 is unreadable/);
    expect(tty).toMatch(/scan sc done: 2048\/2048 blocks/);
  });

  it('--range limits the scan; bad ranges are usage errors naming the device and the range', async () => {
    const a = await ctl(d.sock, '--json', 'scan', 'sc', '--range', '0-1000');
    expect(a.code, a.stderr).toBe(1);
    expect(result(a.stdout)).toMatchObject({ state: 'done', startBlock: 0, endBlock: 1000, blocksDone: 1000, unreadableBlocks: [300] });
    const b = await ctl(d.sock, '--json', 'scan', 'sc', '--range', '4M-8M'); // blocks 1024..2047: none bad
    expect(b.code, b.stderr).toBe(0);
    expect(result(b.stdout)).toMatchObject({ state: 'done', startBlock: 1024, endBlock: 2048, blocksDone: 1024, unreadable: 0 });
    const c = await ctl(d.sock, '--json', 'scan', 'sc', '--range', '2999-');
    expect(result(c.stdout)).toMatchObject({ startBlock: 2999, endBlock: BLOCKS, unreadableBlocks: [3000] });
    const cases: Array<[string, RegExp]> = [
      ['3000-100', /scan sc: --range: range "3000-100" is reversed/],
      ['0-4097', /scan sc: --range: range "0-4097" ends at block 4097, past the end of the device \(4096 blocks of 4096 bytes\)/],
      ['5000-', /scan sc: --range: range "5000-" starts at block 5000, past the end/],
      ['1K-8K', /scan sc: --range: range "1K-8K": byte offset 1024 is not a multiple of the 4096-byte block size/],
      ['1-2-3', /scan sc: --range: range "1-2-3" must be START-END/],
      ['7-7', /scan sc: --range: range "7-7" is empty/],
    ];
    const jobsBefore = d.logs.filter((l) => l.event === 'scan-started').length;
    for (const [range, msg] of cases) {
      const r = await ctl(d.sock, 'scan', 'sc', '--range', range);
      expect(r.code, `${range}: ${r.stderr}`).toBe(2);
      expect(r.stderr).toMatch(msg);
    }
    expect(d.logs.filter((l) => l.event === 'scan-started').length).toBe(jobsBefore); // none of them started a job
    // The daemon checks the range too (a client that skips remapctl's checks).
    const rev = await request(d.sock, 'scanStart', { name: 'sc', startBlock: 10, endBlock: 5 });
    expect(rev).toMatchObject({ ok: false, error: { code: 'INVALID_ARGUMENT', message: 'scanStart: range of blocks 10..5 (end exclusive) of device "sc" is reversed' } });
    const past = await request(d.sock, 'scanStart', { name: 'sc', startBlock: 0, endBlock: BLOCKS + 1 });
    expect(past).toMatchObject({ ok: false, error: { code: 'INVALID_ARGUMENT' } });
    expect(JSON.stringify(past)).toMatch(/goes past the end of device \\"sc\\" \(4096 blocks of 4096 bytes\)/);
    const nope = await ctl(d.sock, 'scan', 'nope');
    expect(nope.code).toBe(4);
    expect(nope.stderr).toMatch(/no device named "nope"/);
  });

  it('--rate uses the rate limiter (its own accounting) and keeps the throughput under a loose bound', async () => {
    const rate = 4; // MiB/s over 8 MiB: the limiter must hold back 7 of the 8 chunks
    const r = await ctl(d.sock, '--json', 'scan', 'sc', '--range', '0-8M', '--rate', String(rate));
    const res = result(r.stdout);
    console.log(`[scan] --rate ${rate}: ${res.bytesDone} bytes in ${res.elapsedMs} ms, limiter waited ${res.throttledMs} ms over ${res.throttledChunks} chunks`);
    expect(res).toMatchObject({ state: 'done', blocksDone: 2048, limitBytesPerSec: rate * MIB });
    expect(res.throttledChunks).toBeGreaterThanOrEqual(6);
    expect(res.throttledMs).toBeGreaterThan(0);
    // 1 MiB of burst, then at most `rate`: 8 MiB cannot take less than 7/rate s. Very loose: 1.5x the limit.
    expect(res.bytesDone / (res.elapsedMs / 1000)).toBeLessThan(rate * MIB * 1.5);
    const fast = result((await ctl(d.sock, '--json', 'scan', 'sc', '--range', '0-8M')).stdout);
    expect(fast).toMatchObject({ limitBytesPerSec: null, throttledMs: 0, throttledChunks: 0 });
  });

  it('--remap-unreadable --zero needs --yes-destroy-unreadable-data (nothing touched without it); with it the blocks read back as zeroes, remapped', async () => {
    expect(await nbdRead(uri, 300)).toBe('EIO');
    const before = await status();
    const io = await disk.stats();
    for (const args of [['--remap-unreadable', '--zero'], ['--remap-unreadable'], ['--zero'], ['--yes-destroy-unreadable-data'],
      ['--remap-unreadable', '--yes-destroy-unreadable-data']]) {
      const r = await ctl(d.sock, 'scan', 'sc', '--range', '250-350', ...args);
      expect(r.code, `${args.join(' ')}: ${r.stderr}`).toBe(2);
      expect(r.stderr).toMatch(/^remapctl: scan sc: /);
    }
    const refused = await ctl(d.sock, 'scan', 'sc', '--remap-unreadable', '--zero');
    expect(refused.stderr).toMatch(/--remap-unreadable --zero replaces every unreadable block of sc with zeroes for good; add --yes-destroy-unreadable-data to confirm/);
    // Nothing reached the disk or the metadata.
    expect((await disk.stats()).reads).toBe(io.reads);
    expect(await status()).toMatchObject({ pendingBlocks: before.pendingBlocks, remappedBlocks: before.remappedBlocks, metadataSeq: before.metadataSeq });
    // The daemon refuses it too without the confirmation (a client that skips remapctl).
    const a = await request(d.sock, 'scanStart', { name: 'sc', remapUnreadable: 'zero' });
    expect(a).toMatchObject({ ok: false, error: { code: 'BAD_REQUEST' } });
    expect(JSON.stringify(a)).toMatch(/confirmDestroyUnreadableData/);

    const r = await ctl(d.sock, '--json', 'scan', 'sc', '--range', '250-1002', '--remap-unreadable', '--zero', '--yes-destroy-unreadable-data');
    expect(r.code, r.stderr).toBe(0);
    expect(result(r.stdout)).toMatchObject({ state: 'done', unreadableBlocks: [300, 1000, 1001], zeroed: 3, remapFailed: [] });
    const after = await status();
    expect(after.remappedBlocks).toBe(before.remappedBlocks + 3);
    expect(after.pendingBlocks).toBe(before.pendingBlocks - 3);
    for (const b of [300, 1000, 1001]) expect(await nbdRead(uri, b)).toBe('ok:0000000000000000:True');
    expect(await nbdRead(uri, 3000)).toBe('EIO'); // outside the range: still unreadable
    // A second scan over them reads them from the spare: nothing unreadable left there.
    const again = await ctl(d.sock, '--json', 'scan', 'sc', '--range', '250-1002');
    expect(again.code, again.stderr).toBe(0);
    expect(result(again.stdout).unreadable).toBe(0);
  });

  it('Ctrl-C cancels the job (exit 130)', async () => {
    const p = spawnCtl(['--socket', d.sock, '--json', 'scan', 'sc', '--rate', '1']);
    await until(() => p.lines.some((l) => l.includes('"event":"progress"')), 'first progress event');
    p.child.kill('SIGINT');
    const r = await p.done;
    expect(r.code, r.stderr).toBe(130);
    const res = result(r.stdout);
    expect(res).toMatchObject({ state: 'cancelled', cancelReason: 'cancelled by request', exitCode: 130 });
    expect(res.blocksDone).toBeLessThan(BLOCKS);
    await d.waitLog((l) => l.event === 'scan-finished' && l.jobId === res.jobId && l.state === 'cancelled');
    // The device is free for the next scan.
    const st = await ctl(d.sock, '--json', 'scan', 'sc', '--status');
    expect((JSON.parse(st.stdout) as { job: Snap }).job.state).toBe('cancelled');
  });

  it('a second scan of the same device is refused while one runs (exit 5); --cancel stops it', async () => {
    const p = spawnCtl(['--socket', d.sock, '--json', 'scan', 'sc', '--rate', '1']);
    await until(() => p.lines.some((l) => l.includes('"event":"started"')), 'scan start');
    const second = await ctl(d.sock, 'scan', 'sc');
    expect(second.code).toBe(5);
    expect(second.stderr).toMatch(/device "sc" is already being scanned \(job scan-\d+-\d+, [\d.]+%\); cancel it first \(remapctl scan sc --cancel\)/);
    const c = await ctl(d.sock, 'scan', 'sc', '--cancel');
    expect(c.code, c.stderr).toBe(0);
    expect(c.stdout).toMatch(/^sc: scan job scan-\d+-\d+ cancelled$/m);
    const r = await p.done;
    expect(r.code).toBe(1); // cancelled, but not by this remapctl's Ctrl-C
    expect(result(r.stdout)).toMatchObject({ state: 'cancelled', cancelReason: 'cancelled by request' });
    expect((await ctl(d.sock, 'scan', 'sc', '--cancel')).code).toBe(1); // nothing left to cancel
  });

  it('a device removed mid-scan stops the scan cleanly, within the removal deadline', async () => {
    // A slow disk, so that a chunk read is in flight when the removal starts; and a rate-limit wait pending.
    await disk.setDelay({ read: 50 });
    const p = spawnCtl(['--socket', d.sock, '--json', 'scan', 'sc', '--rate', '2']);
    await until(() => p.lines.some((l) => /"event":"progress".*"blocksDone":[1-9]/.test(l)), 'scan under way');
    const rm = await ctl(d.sock, '--json', 'remove', 'sc', '--timeout', '3000');
    expect(rm.code, rm.stderr).toBe(0);
    const report = JSON.parse(rm.stdout) as { timedOut: boolean; elapsedMs: number; requestsAbandoned: number };
    console.log(`[scan] removal mid-scan: ${JSON.stringify(report)}`);
    expect(report.timedOut).toBe(false);
    expect(report.requestsAbandoned).toBe(0);
    expect(report.elapsedMs).toBeLessThan(3000);
    const r = await p.done;
    expect(r.code).toBe(1);
    const res = result(r.stdout);
    expect(res).toMatchObject({ state: 'cancelled', cancelReason: 'device is being removed' });
    expect(res.blocksDone).toBeLessThan(BLOCKS);
    await disk.setDelay({});
    // The daemon is still healthy and stops at once (no timer or promise of the scan holds it).
    expect((await ctl(d.sock, 'list')).code).toBe(0);
    const t0 = Date.now();
    expect(await d.stop()).toBe(0);
    console.log(`[scan] daemon stop after the removal: ${Date.now() - t0} ms`);
  });
});
