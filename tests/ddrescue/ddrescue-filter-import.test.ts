/**
 * remapctl import --ddrescue against nbdkit's ddrescue filter: the main is
 * an image served through `--filter=cow --filter=ddrescue` (the ddrescue
 * filter fails reads of its mapfile's bad areas; cow over it, with 4 KiB
 * blocks, makes the disk writable without widening the failure) and
 * exposed as a file by nbdfuse. The mapfile given to import marks more
 * blocks bad than the filter fails, so the import copies the readable ones
 * and leaves the unreadable one pending.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeTempDir, removeTempDir, requireTools } from '../helpers/faultdisk.js';
import { ctl, startDaemon, type Daemon } from '../daemon/helpers.js';
import { BS, SIZE, nbdBlocks, patternImage, run } from './helpers.js';

requireTools('nbdkit', 'nbdfuse', 'fusermount3', '/dev/fuse', 'nbdsh');

function mapfile(bad: Array<[first: number, count: number]>): string {
  const lines = ['# Mapfile. Created by a dm-remapd test', '# current_pos  current_status  current_pass', '0x00000000     +               1', '#      pos        size  status'];
  let at = 0;
  for (const [first, count] of bad) {
    if (first * BS > at) lines.push(`0x${at.toString(16)}  0x${(first * BS - at).toString(16)}  +`);
    lines.push(`0x${(first * BS).toString(16)}  0x${(count * BS).toString(16)}  -`);
    at = (first + count) * BS;
  }
  if (at < SIZE) lines.push(`0x${at.toString(16)}  0x${(SIZE - at).toString(16)}  +`);
  return `${lines.join('\n')}\n`;
}

async function until(what: string, ok: () => boolean, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe('remapctl import --ddrescue over nbdkit\'s ddrescue filter', () => {
  let dir: string;
  let d: Daemon | undefined;
  let nbdkit: ChildProcess | undefined;
  let fuse: ChildProcess | undefined;
  let mnt: string;
  beforeAll(async () => {
    dir = await makeTempDir('dmr-ddrescue-filter');
    patternImage(join(dir, 'disk.img'));
    writeFileSync(join(dir, 'filter.map'), mapfile([[20, 1]]));
    const sock = join(dir, 'nbdkit.sock');
    nbdkit = spawn('nbdkit', ['-f', '-U', sock, '--filter=cow', '--filter=ddrescue', 'file', join(dir, 'disk.img'),
      `ddrescue-mapfile=${join(dir, 'filter.map')}`, 'cow-block-size=4096'], { stdio: 'ignore' });
    await until('the nbdkit socket', () => existsSync(sock));
    mnt = join(dir, 'mnt');
    mkdirSync(mnt);
    fuse = spawn('nbdfuse', ['-C', '1', join(mnt, 'main'), '--unix', sock], { stdio: 'ignore' });
    await until('the nbdfuse file', () => existsSync(join(mnt, 'main')));
    writeFileSync(join(dir, 'spare.img'), '');
    truncateSync(join(dir, 'spare.img'), 8 << 20);
    d = await startDaemon(dir);
  }, 60_000);
  afterAll(async () => {
    if (d !== undefined) await d.stop();
    if (fuse !== undefined) spawnSync('fusermount3', ['-u', mnt]);
    fuse?.kill('SIGKILL');
    nbdkit?.kill('SIGTERM');
    await removeTempDir(dir);
  });

  it('copies the readable blocks of the bad areas, leaves the unreadable one pending, and a write makes it whole', async () => {
    if (d === undefined) throw new Error('no daemon');
    const nbd = join(dir, 'g.nbd');
    const add = await ctl(d.sock, 'add', 'g', '--main', join(mnt, 'main'), '--spare', join(dir, 'spare.img'), '--format', '--nbd-unix', nbd);
    expect(add.code, add.stderr).toBe(0);
    const uri = `nbd+unix:///g?socket=${nbd}`;
    // Through the filter, block 20 fails and its neighbours read.
    expect(await nbdBlocks({ uri }, [19, 20, 21])).toEqual({ 19: 19, 20: 'EIO', 21: 21 });
    const map = join(dir, 'import.map');
    writeFileSync(map, mapfile([[19, 3], [100, 1]]));
    const r = await ctl(d.sock, '--json', 'import', 'g', '--ddrescue', map);
    expect(r.code, r.stderr).toBe(1); // block 20 could not be copied
    expect(JSON.parse(r.stdout)).toMatchObject({ blocks: 4, remapped: 3, pending: 1, failed: 0, areas: 2 });
    expect(await nbdBlocks({ uri }, [18, 19, 20, 21, 22, 100])).toEqual({ 18: 18, 19: 19, 20: 'EIO', 21: 21, 22: 22, 100: 100 });
    const st = JSON.parse((await ctl(d.sock, '--json', 'status', 'g')).stdout) as { remappedBlocks: number; pendingBlocks: number };
    expect(st).toMatchObject({ remappedBlocks: 3, pendingBlocks: 1 });
    // The next write of the pending block remaps it; it then reads back.
    await run('nbdsh', ['-u', uri, '-c', `h.pwrite(int(7777).to_bytes(4, "little") * ${BS / 4}, 20 * ${BS})`]);
    expect(await nbdBlocks({ uri }, [20])).toEqual({ 20: 7777 });
    const st2 = JSON.parse((await ctl(d.sock, '--json', 'status', 'g')).stdout) as { remappedBlocks: number; pendingBlocks: number };
    expect(st2).toMatchObject({ remappedBlocks: 4, pendingBlocks: 0 });
    expect((await ctl(d.sock, 'remove', 'g')).code).toBe(0);
  }, 120_000);
});
