/**
 * Through NBD with a faulty main: the real daemon serves a fault disk
 * (nbdkit + nbdfuse, tests/helpers/faultdisk.ts) as --main with a plain
 * file as spare, added by remapctl with an NBD unix export. Real clients
 * (qemu-io with -P patterns, nbdsh) write over injected bad ranges and read
 * an unreadable block; remapctl status --json counts what happened; after a
 * SIGTERM and a fresh start (reassembled from devices.json) the remaps, the
 * pending block and the data are still there.
 */
import { execFileSync } from 'node:child_process';
import { openSync, readSync, closeSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cleanupAll, makeTempDir, requireTools, startFaultDisk, type FaultDisk } from '../helpers/faultdisk.js';
import { run } from '../nbd/nbd-fixtures.js';
import { ctl, startDaemon, type Daemon } from './helpers.js';

requireTools('nbdkit', 'nbdkit-python', 'nbdfuse', 'fusermount3', '/dev/fuse', 'qemu-io', 'nbdsh');

// nbdsh runs `python3` from PATH and needs the system's python3-nbd: put /usr/bin first.
const SYS_ENV = { ...process.env, PATH: `/usr/bin:/bin:${process.env.PATH ?? ''}` };
const BS = 4096;

interface Status {
  state: string; remappedBlocks: number; pendingBlocks: number; readErrors: number; writeErrors: number;
  spareBlocksUsed: number; spareBlocksTotal: number; metadataSeq: number; exports: string[];
}

async function status(d: Daemon, name: string): Promise<Status> {
  const r = await ctl(d.sock, '--json', 'status', name);
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as Status;
}

/** qemu-io commands against the export; fails the test on a failed command or a pattern mismatch. */
async function qemuIo(uri: string, ...cmds: string[]): Promise<string> {
  const r = await run('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), uri]);
  const out = r.stdout + r.stderr;
  expect(r.code, out).toBe(0);
  expect(out).not.toMatch(/Pattern verification failed|error|failed/i);
  return out;
}

function nbdsh(uri: string, code: string): string {
  return execFileSync('nbdsh', ['-u', uri, '-c', code], { encoding: 'utf8', timeout: 30_000, env: SYS_ENV }).trim();
}

/** Bytes of the image behind the fault disk (what main really holds). */
function onMain(img: string, offset: number, length: number): Buffer {
  const fd = openSync(img, 'r');
  try {
    const b = Buffer.alloc(length);
    readSync(fd, b, 0, length, offset);
    return b;
  } finally {
    closeSync(fd);
  }
}

describe('NBD export of a faulty main through the daemon', () => {
  let dir: string;
  let disk: FaultDisk | undefined;
  let d: Daemon | undefined;
  beforeAll(async () => {
    dir = await makeTempDir('dmr-faulty-');
    disk = await startFaultDisk({ dir, name: 'main', sizeBytes: 32 << 20 });
  });
  afterAll(async () => {
    if (d !== undefined) await d.stop();
    await cleanupAll();
  });

  it('writes over bad blocks succeed and are counted; an unreadable block is EIO and pending; all of it survives a restart', async () => {
    const fd = disk as FaultDisk;
    const spare = join(dir, 'spare.img');
    writeFileSync(spare, '');
    truncateSync(spare, 4 << 20);
    const nbd = join(dir, 'fm.nbd');
    const uri = `nbd+unix:///fm?socket=${nbd}`;
    d = await startDaemon(dir);
    const add = await ctl(d.sock, 'add', 'fm', '--main', fd.path, '--spare', spare, '--format', '--nbd-unix', nbd);
    expect(add.code, add.stderr).toBe(0);
    expect(add.stdout).toMatch(/^added fm: 32\.0 MiB, block size 4096, 0 remapped, 0 pending/);

    // Bad for writes: block 100, blocks 200-201 and block 520; unreadable: block 300 (never written) and 520.
    await fd.setBad({ write: [[100 * BS, BS], [200 * BS, 2 * BS], [520 * BS, BS]], read: [[300 * BS, BS], [520 * BS, BS]] });

    // 64 KiB over block 100 (blocks 96..111), exactly blocks 200-201, and 1 MiB over block 520 (512..767).
    await qemuIo(uri, `write -P 0xa1 ${96 * BS} 64k`, `write -P 0xb2 ${200 * BS} 8k`, `write -P 0xc3 ${512 * BS} 1M`, 'flush');
    await qemuIo(uri, `read -P 0xa1 ${96 * BS} 64k`, `read -P 0xb2 ${200 * BS} 8k`, `read -P 0xc3 ${512 * BS} 1M`);
    const s1 = await status(d, 'fm');
    console.log(`[faulty main] after the writes: ${JSON.stringify({ remapped: s1.remappedBlocks, writeErrors: s1.writeErrors, readErrors: s1.readErrors, spareUsed: s1.spareBlocksUsed, spareTotal: s1.spareBlocksTotal, seq: s1.metadataSeq })}`);
    expect(s1).toMatchObject({ state: 'running', remappedBlocks: 4, pendingBlocks: 0, spareBlocksUsed: 4 });
    expect(s1.writeErrors).toBeGreaterThanOrEqual(3); // one failed extent write per client write at least
    // The bad blocks' data is on the spare only: main still holds zeroes there, while its neighbours got the pattern.
    expect(onMain(fd.backingFile, 100 * BS, BS).every((b) => b === 0)).toBe(true);
    expect(onMain(fd.backingFile, 99 * BS, BS).every((b) => b === 0xa1)).toBe(true);
    expect(onMain(fd.backingFile, 201 * BS, BS).every((b) => b === 0)).toBe(true);

    // A never-written unreadable block: EIO for the NBD client, then pending.
    const errno = nbdsh(uri, [
      'import errno',
      'try:',
      `    h.pread(${BS}, ${300 * BS})`,
      '    print("read ok")',
      'except nbd.Error as e:',
      '    print(errno.errorcode.get(e.errnum, e.errnum))',
    ].join('\n'));
    expect(errno).toBe('EIO');
    const s2 = await status(d, 'fm');
    expect(s2).toMatchObject({ state: 'running', remappedBlocks: 4, pendingBlocks: 1 });
    expect(s2.readErrors).toBeGreaterThanOrEqual(1);
    // Block 520 is unreadable on main too, but was written through us: it is served from the spare.
    await qemuIo(uri, `read -P 0xc3 ${520 * BS} 4k`);
    // remapctl remap of the unreadable block refuses to invent its data, says why, and exits 1.
    const rm = await ctl(d.sock, 'remap', 'fm', '300');
    expect(rm.code).toBe(1);
    expect(rm.stdout).toMatch(/^fm: block 300 not remapped: block 300 is unreadable \(EIO\); it is remapped on its next write$/m);

    // Restart: SIGTERM, then a new daemon on the same state folder reassembles fm from devices.json.
    expect(await d.stop()).toBe(0);
    d = await startDaemon(dir);
    const s3 = await status(d, 'fm');
    console.log(`[faulty main] after the restart: ${JSON.stringify({ state: s3.state, remapped: s3.remappedBlocks, pending: s3.pendingBlocks, seq: s3.metadataSeq })}`);
    expect(s3).toMatchObject({ state: 'running', remappedBlocks: 4, pendingBlocks: 1, spareBlocksUsed: 4, readErrors: 0, writeErrors: 0 });
    expect(s3.exports).toContain(`nbd+unix:///fm?socket=${nbd}`);
    await qemuIo(uri, `read -P 0xa1 ${96 * BS} 64k`, `read -P 0xb2 ${200 * BS} 8k`, `read -P 0xc3 ${512 * BS} 1M`);
    // Still unreadable after the restart (nothing was invented for it) ...
    expect(nbdsh(uri, `import errno\ntry:\n    h.pread(${BS}, ${300 * BS})\n    print("read ok")\nexcept nbd.Error as e:\n    print(errno.errorcode.get(e.errnum, e.errnum))`)).toBe('EIO');
    // ... until it is written: the write goes to a new spare block and clears the pending state.
    await qemuIo(uri, `write -P 0xd4 ${300 * BS} 4k`, `read -P 0xd4 ${300 * BS} 4k`);
    const s4 = await status(d, 'fm');
    expect(s4).toMatchObject({ state: 'running', remappedBlocks: 5, pendingBlocks: 0 });
    expect(await d.stop()).toBe(0);
    d = undefined;
  });
});
