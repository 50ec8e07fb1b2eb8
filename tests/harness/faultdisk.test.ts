// Tests of the fault-injecting disk helper, driven through real tools
// (dd with O_DIRECT, and an O_DIRECT python probe that reports errno names).
import { createHash } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  cleanupAll,
  dioProbe,
  makeTempDir,
  mountsUnder,
  PLUGIN_PATH,
  removeTempDir,
  requireTools,
  runCommand,
  startFaultDisk,
  type FaultDisk,
} from '../helpers/faultdisk.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const BS = 4096;

requireTools('nbdkit', 'nbdfuse', 'fusermount3', 'dd', 'nbdkit-python', '/dev/fuse', '/usr/bin/python3');

function dd(args: string[], timeoutMs = 15_000) {
  return runCommand('dd', ['status=none', ...args], { timeoutMs });
}

function sha256(buf: Buffer): string {
  return createHash('sha256').update(buf).digest('hex');
}

async function readBacking(file: string, offset: number, length: number): Promise<Buffer> {
  const fh = await fs.open(file, 'r');
  try {
    const buf = Buffer.alloc(length);
    await fh.read(buf, 0, length, offset);
    return buf;
  } finally {
    await fh.close();
  }
}

function pidsOfPlugin(): number[] {
  // our (this worker's) live processes whose command line names the plugin
  // script (read-only look at /proc). nbdkit is a direct child of the test
  // process; only children count, since other test files running in the
  // other worker start their own fault disks at the same time.
  const out: number[] = [];
  for (const ent of readdirProc()) {
    try {
      const cmd = readFileSync(`/proc/${ent}/cmdline`, 'utf8');
      const stat = readFileSync(`/proc/${ent}/stat`, 'utf8');
      // after "(comm) ": state ppid ...
      const [state, ppid] = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      if (cmd.includes(PLUGIN_PATH) && state !== 'Z' && Number(ppid) === process.pid) out.push(Number(ent));
    } catch {
      // raced with exit
    }
  }
  return out;
}

function readdirProc(): string[] {
  return readdirSync('/proc').filter((e) => /^\d+$/.test(e));
}

let work: string;

beforeAll(async () => {
  work = await makeTempDir('faultdisk-test');
});

afterAll(async () => {
  await cleanupAll();
  // nothing of ours may survive the run
  expect(mountsUnder(work, true)).toEqual([]);
  expect(pidsOfPlugin()).toEqual([]);
});

describe('helpers', () => {
  it('requireTools names the missing tool', () => {
    expect(() => requireTools('dd', 'no-such-tool-xyz')).toThrow(/no-such-tool-xyz/);
    expect(() => requireTools('dd')).not.toThrow();
  });

  it('makeTempDir is under /var/tmp on a real disk and removeTempDir removes it', async () => {
    const d = await makeTempDir('faultdisk-tmp');
    expect(d.startsWith('/var/tmp/faultdisk-tmp-')).toBe(true);
    const r = await runCommand('stat', ['-f', '-c', '%T', d]);
    expect(r.stdout.trim()).not.toBe('tmpfs');
    await removeTempDir(d);
    await expect(fs.stat(d)).rejects.toThrow(/ENOENT/);
  });
});

describe('fault disk', () => {
  let disk: FaultDisk;

  beforeAll(async () => {
    disk = await startFaultDisk({ dir: work, name: 'main', sizeBytes: 16 * MiB });
  });

  afterAll(async () => {
    if (!disk) return; // startFaultDisk failed; cleanupAll() still runs
    await disk.stop();
    expect(mountsUnder(disk.mountDir, true)).toEqual([]);
  });

  it('exposes a regular file of the right size, with O_DIRECT I/O reaching the backing file', async () => {
    const st = await fs.stat(disk.path);
    expect(st.isFile()).toBe(true);
    expect(st.size).toBe(16 * MiB);
    expect(disk.backingFile).toBe(path.join(work, 'main.img'));

    const before = await disk.stats();
    const w = await dioProbe('write', disk.path, 64 * KiB, 2 * BS, { fill: 0x5a });
    expect(w).toMatchObject({ ok: true, bytes: 2 * BS });
    const back = await readBacking(disk.backingFile, 64 * KiB, 2 * BS);
    expect(back.equals(Buffer.alloc(2 * BS, 0x5a))).toBe(true);

    const r = await dioProbe('read', disk.path, 64 * KiB, 2 * BS);
    expect(r).toEqual({ ok: true, bytes: 2 * BS, sha256: sha256(Buffer.alloc(2 * BS, 0x5a)) });

    // dd with O_DIRECT both ways, and an fsync that reaches the plugin as a flush
    const dw = await dd(['if=/dev/zero', `of=${disk.path}`, `bs=${BS}`, 'count=4', 'seek=100', 'oflag=direct', 'conv=notrunc,fsync']);
    expect(dw.code, dw.stderr).toBe(0);
    const dr = await dd([`if=${disk.path}`, 'of=/dev/null', `bs=${BS}`, 'count=4', 'skip=100', 'iflag=direct']);
    expect(dr.code, dr.stderr).toBe(0);

    const after = await disk.stats();
    expect(after.writes - before.writes).toBeGreaterThanOrEqual(2);
    expect(after.reads - before.reads).toBeGreaterThanOrEqual(2);
    expect(after.flushes - before.flushes).toBeGreaterThanOrEqual(1);
    expect(after.writeBytes - before.writeBytes).toBe(2 * BS + 4 * BS);
  });

  it('fails exactly the bad ranges with EIO, neighbours succeed', async () => {
    const badR = 40 * BS;
    const badW = 50 * BS;
    await disk.setBad({ read: [[badR, BS]], write: [[badW, BS]] });

    // exact errno as seen by the reader/writer of the FUSE file
    expect(await dioProbe('read', disk.path, badR, BS)).toEqual({ ok: false, errno: 'EIO', phase: 'io' });
    expect(await dioProbe('write', disk.path, badW, BS)).toEqual({ ok: false, errno: 'EIO', phase: 'io' });
    // a request that only overlaps the range fails too
    expect(await dioProbe('read', disk.path, badR - BS, 2 * BS)).toMatchObject({ ok: false, errno: 'EIO' });
    // the other kind of request to the same place is fine
    expect(await dioProbe('write', disk.path, badR, BS)).toMatchObject({ ok: true });
    expect(await dioProbe('read', disk.path, badW, BS)).toMatchObject({ ok: true });

    // dd oflag=direct: the bad block fails, the blocks either side are written
    const pattern = path.join(work, 'pattern.bin');
    await fs.writeFile(pattern, Buffer.alloc(BS, 0xc3));
    const ddw = (blk: number) =>
      dd([`if=${pattern}`, `of=${disk.path}`, `bs=${BS}`, 'count=1', `seek=${blk}`, 'oflag=direct', 'conv=notrunc']);
    const bad = await ddw(50);
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toMatch(/Input\/output error/);
    expect((await ddw(49)).code).toBe(0);
    expect((await ddw(51)).code).toBe(0);
    expect((await readBacking(disk.backingFile, 49 * BS, BS)).equals(Buffer.alloc(BS, 0xc3))).toBe(true);
    expect((await readBacking(disk.backingFile, 51 * BS, BS)).equals(Buffer.alloc(BS, 0xc3))).toBe(true);
    expect((await readBacking(disk.backingFile, 50 * BS, BS)).equals(Buffer.alloc(BS, 0xc3))).toBe(false);

    // dd iflag=direct on the bad read block fails with EIO, neighbours read
    const rd = (blk: number) => dd([`if=${disk.path}`, 'of=/dev/null', `bs=${BS}`, 'count=1', `skip=${blk}`, 'iflag=direct']);
    const r40 = await rd(40);
    expect(r40.code).not.toBe(0);
    expect(r40.stderr).toMatch(/Input\/output error/);
    expect((await rd(39)).code).toBe(0);
    expect((await rd(41)).code).toBe(0);

    const s = await disk.stats();
    expect(s.readErrors).toBeGreaterThanOrEqual(3);
    expect(s.writeErrors).toBeGreaterThanOrEqual(2);

    // clearing the list takes effect for the next request
    await disk.setBad({});
    expect((await ddw(50)).code).toBe(0);
    expect((await rd(40)).code).toBe(0);
  });

  it('hangs requests while on and lets them complete when released', async () => {
    await disk.setHang(true);
    const t0 = Date.now();
    const pending = dd([`if=${disk.path}`, 'of=/dev/null', `bs=${BS}`, 'count=1', 'skip=7', 'iflag=direct']);
    let finished = false;
    void pending.then(() => (finished = true));
    await disk.waitBlocked(1);
    await new Promise((r) => setTimeout(r, 300));
    expect(finished).toBe(false);
    await disk.setHang(false);
    const r = await pending;
    expect(r.code, r.stderr).toBe(0);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(300);
    expect((await disk.stats()).blocked).toBe(0);
  });

  it('writesOnly hang: reads pass until a write blocks, then nbdfuse queues everything behind it', async () => {
    await disk.setHang(true, { writesOnly: true });
    expect(await dioProbe('read', disk.path, 9 * BS, BS, { timeoutMs: 5_000 })).toMatchObject({ ok: true });
    const w = dioProbe('write', disk.path, 9 * BS, BS, { fill: 0x11 });
    let wDone = false;
    void w.then(() => (wDone = true));
    await disk.waitBlocked(1);
    // nbdfuse 1.14 (one connection in --command mode) sends no new request
    // while it waits for a reply, so this read waits behind the hung write
    // even though the plugin would serve it. If this starts failing, nbdfuse
    // got better and writesOnly hangs became truly writes-only.
    const r = dioProbe('read', disk.path, 10 * BS, BS);
    let rDone = false;
    void r.then(() => (rDone = true));
    await new Promise((res) => setTimeout(res, 300));
    expect(wDone).toBe(false);
    expect(rDone).toBe(false);
    await disk.setHang(false);
    expect(await w).toMatchObject({ ok: true, bytes: BS });
    expect(await r).toMatchObject({ ok: true, bytes: BS });
  });

  it('adds the configured delay', async () => {
    await disk.setDelay({ read: 150 });
    const t0 = Date.now();
    expect(await dioProbe('read', disk.path, 0, BS)).toMatchObject({ ok: true });
    expect(Date.now() - t0).toBeGreaterThanOrEqual(150);
    await disk.setDelay({});
  });
});

describe('fault disk lifecycle', () => {
  it('keeps data across restarts on the same backing file', async () => {
    const backing = path.join(work, 'persist.img');
    const a = await startFaultDisk({ dir: work, name: 'p1', sizeBytes: 4 * MiB, backingFile: backing });
    expect(await dioProbe('write', a.path, 3 * BS, BS, { fill: 0x77 })).toMatchObject({ ok: true });
    await a.stop();
    const b = await startFaultDisk({ dir: work, name: 'p2', sizeBytes: 4 * MiB, backingFile: backing });
    expect(await dioProbe('read', b.path, 3 * BS, BS)).toEqual({
      ok: true,
      bytes: BS,
      sha256: sha256(Buffer.alloc(BS, 0x77)),
    });
    await b.stop();
  });

  it('stop() releases a hung request and unmounts', async () => {
    const d = await startFaultDisk({ dir: work, name: 'hs', sizeBytes: 4 * MiB });
    await d.setHang(true);
    const pending = dd([`if=${d.path}`, 'of=/dev/null', `bs=${BS}`, 'count=1', 'iflag=direct']);
    await d.waitBlocked(1);
    await d.stop();
    const r = await pending;
    expect(r.timedOut).toBe(false);
    expect(mountsUnder(d.mountDir, true)).toEqual([]);
  });

  it('kill(): the FUSE file then fails I/O (ECONNABORTED, then ENOTCONN) and stop() still cleans up', async () => {
    const d = await startFaultDisk({ dir: work, name: 'k', sizeBytes: 4 * MiB });
    expect(await dioProbe('read', d.path, 0, BS)).toMatchObject({ ok: true });
    const pid = d.nbdkitPid;
    await d.kill();
    expect(pidsOfPlugin()).not.toContain(pid);
    await expect(d.stats()).rejects.toThrow(/kill/);

    const first = await dioProbe('read', d.path, 0, BS);
    expect(first.ok).toBe(false);
    if (!first.ok) expect(['ECONNABORTED', 'ENOTCONN', 'EIO', 'ENXIO']).toContain(first.errno);
    const later = await dioProbe('write', d.path, 0, BS);
    expect(later.ok).toBe(false);
    if (!later.ok) expect(['ECONNABORTED', 'ENOTCONN', 'EIO', 'ENXIO']).toContain(later.errno);
    const ddr = await dd([`if=${d.path}`, 'of=/dev/null', `bs=${BS}`, 'count=1', 'iflag=direct']);
    expect(ddr.code).not.toBe(0);
    console.log(`after kill(): first I/O -> ${first.ok ? 'ok' : first.errno}, later -> ${later.ok ? 'ok' : `${later.errno} (${later.phase})`}, dd: ${ddr.stderr.trim()}`);

    await d.stop();
    expect(mountsUnder(d.mountDir, true)).toEqual([]);
    await d.stop(); // idempotent
  });
});
