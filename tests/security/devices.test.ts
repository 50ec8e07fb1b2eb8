/**
 * Security (issue 5), through the real daemon and remapctl:
 *  - a block device that is mounted (held with O_EXCL by the kernel) is
 *    refused as main and as spare, with EBUSY and exit 5;
 *  - a loop device already used as another device's main is refused;
 *  - a spare that overlaps the main is refused: the same file, and two loop
 *    devices over the same image (or a loop device over the main file);
 *  - TCP exports bind where told (127.0.0.1), a host is required (no
 *    implicit 0.0.0.0), and no wildcard listener appears.
 * Needs root and loop devices; skipped otherwise. Every loop device is
 * detached and every mount undone in afterAll, even after a failure.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cleanup, ctl, startDaemon, tempDir, type Daemon } from '../daemon/helpers.js';

const canLoop = process.getuid?.() === 0 && existsSync('/dev/loop-control');

function img(path: string, size: number): string {
  writeFileSync(path, '');
  truncateSync(path, size);
  return path;
}

function sh(cmd: string, args: string[]): string {
  return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim();
}

/** Listening TCP sockets from /proc/net/tcp{,6}: "addr:port" in hex as the kernel prints them. */
function listeners(port: number): string[] {
  const out: string[] = [];
  const hexPort = port.toString(16).toUpperCase().padStart(4, '0');
  for (const f of ['/proc/net/tcp', '/proc/net/tcp6']) {
    if (!existsSync(f)) continue;
    for (const line of readFileSync(f, 'utf8').split('\n').slice(1)) {
      const cols = line.trim().split(/\s+/);
      if (cols.length < 4 || cols[3] !== '0A') continue; // 0A = LISTEN
      if (cols[1].endsWith(`:${hexPort}`)) out.push(cols[1]);
    }
  }
  return out;
}

describe.skipIf(!canLoop)('refusals of held, shared and overlapping devices', () => {
  let dir: string;
  let d: Daemon | undefined;
  const loops: string[] = [];
  const mounts: string[] = [];
  const figures: string[] = [];
  const sock = (): string => (d as Daemon).sock;

  const losetup = (file: string, extra: string[] = []): string => {
    const dev = sh('losetup', ['--find', '--show', ...extra, file]);
    loops.push(dev);
    return dev;
  };

  beforeAll(async () => {
    dir = tempDir('dmr-sec-');
    d = await startDaemon(dir);
  });

  afterAll(async () => {
    try {
      if (d !== undefined) await d.stop();
    } finally {
      for (const m of mounts.reverse()) {
        try { sh('umount', [m]); } catch { try { sh('umount', ['-l', m]); } catch { /* already gone */ } }
      }
      for (const l of loops.reverse()) {
        try { sh('losetup', ['-d', l]); } catch { /* already detached */ }
      }
      if (dir !== undefined) cleanup(dir);
      console.log(`\nsecurity refusals:\n${figures.map((f) => `  ${f}`).join('\n')}\n`);
    }
  });

  it('a mounted block device is refused as main and as spare (O_EXCL: EBUSY, exit 5)', async () => {
    const fsImg = img(join(dir, 'fs.img'), 32 << 20);
    const loop = losetup(fsImg);
    sh('mkfs.ext4', ['-q', '-F', loop]);
    const mnt = join(dir, 'mnt');
    mkdirSync(mnt);
    sh('mount', [loop, mnt]);
    mounts.push(mnt);
    const spare = img(join(dir, 'spare-a.img'), 8 << 20);
    const asMain = await ctl(sock(), 'add', 'held', '--main', loop, '--spare', spare, '--format');
    expect(asMain.code, asMain.stderr).toBe(5);
    expect(asMain.stderr).toMatch(/EBUSY/);
    expect(asMain.stderr).toContain(loop);
    const main = img(join(dir, 'main-a.img'), 32 << 20);
    const asSpare = await ctl(sock(), '--json', 'add', 'held2', '--main', main, '--spare', loop, '--format');
    expect(asSpare.code, asSpare.stderr).toBe(5);
    expect(JSON.parse(asSpare.stdout)).toMatchObject({ ok: false, error: { code: 'BUSY' } });
    expect(asSpare.stderr).toMatch(/EBUSY/);
    // The filesystem was not touched: still mounted and its superblock intact.
    expect(sh('findmnt', ['-n', '-o', 'SOURCE', mnt])).toBe(loop);
    expect((await ctl(sock(), '--json', 'list')).stdout).not.toMatch(/held/);
    figures.push(`mounted ${loop} as --main: exit ${asMain.code}: ${asMain.stderr.trim().split('\n')[0]}`);
    figures.push(`mounted ${loop} as --spare: exit ${asSpare.code} BUSY`);
  });

  it('a loop device already used as another device\'s main is refused (exit 5), by path and by another name', async () => {
    const mainImg = img(join(dir, 'main-b.img'), 32 << 20);
    const loop = losetup(mainImg);
    const ok = await ctl(sock(), 'add', 'b0', '--main', loop, '--spare', img(join(dir, 'spare-b0.img'), 8 << 20), '--format');
    expect(ok.code, ok.stderr).toBe(0);
    const again = await ctl(sock(), 'add', 'b1', '--main', loop, '--spare', img(join(dir, 'spare-b1.img'), 8 << 20), '--format');
    expect(again.code, again.stderr).toBe(5);
    expect(again.stderr).toMatch(/already used by device "b0"/);
    // Another name of the same device (a second device node, not a symlink): only O_EXCL catches it.
    const [maj, min] = sh('lsblk', ['-dno', 'MAJ:MIN', loop]).trim().split(':');
    const alias = join(dir, 'alias-node');
    sh('mknod', [alias, 'b', maj, min]);
    const viaAlias = await ctl(sock(), 'add', 'b2', '--main', alias, '--spare', img(join(dir, 'spare-b2.img'), 8 << 20), '--format');
    expect(viaAlias.code, viaAlias.stderr).toBe(5);
    expect(viaAlias.stderr).toMatch(/EBUSY/);
    // Held as a spare too.
    const asSpare = await ctl(sock(), 'add', 'b3', '--main', img(join(dir, 'main-b3.img'), 32 << 20), '--spare', loop, '--format');
    expect(asSpare.code, asSpare.stderr).toBe(5);
    expect((await ctl(sock(), 'remove', 'b0')).code).toBe(0);
    figures.push(`${loop} in use by b0, again as main: exit ${again.code}: ${again.stderr.trim()}`);
    figures.push(`same device as ${alias}: exit ${viaAlias.code}: ${viaAlias.stderr.trim()}`);
  });

  it('a spare that overlaps the main is refused: same file, two loop devices over one image, a loop device over the main file', async () => {
    const mainImg = img(join(dir, 'main-c.img'), 32 << 20);
    const same = await ctl(sock(), 'add', 'c0', '--main', mainImg, '--spare', mainImg, '--format');
    expect(same.code, same.stderr).not.toBe(0);
    expect([2, 5]).toContain(same.code);
    figures.push(`same file as main and spare: exit ${same.code}: ${same.stderr.trim()}`);

    const loopA = losetup(mainImg);
    const loopB = losetup(mainImg);
    const two = await ctl(sock(), '--json', 'add', 'c1', '--main', loopA, '--spare', loopB, '--format');
    expect(two.code, two.stdout + two.stderr).toBe(2);
    expect(JSON.parse(two.stdout)).toMatchObject({ ok: false, error: { code: 'INVALID_ARGUMENT' } });
    expect(two.stderr).toMatch(/overlaps the main/);
    figures.push(`main ${loopA}, spare ${loopB} over one image: exit ${two.code}: ${two.stderr.trim()}`);

    // A spare loop device over the tail of the main file (offset): still overlapping.
    const loopTail = losetup(mainImg, ['--offset', String(24 << 20)]);
    const tail = await ctl(sock(), 'add', 'c2', '--main', mainImg, '--spare', loopTail, '--format');
    expect(tail.code, tail.stderr).toBe(2);
    expect(tail.stderr).toMatch(/overlaps the main/);
    figures.push(`main file, spare ${loopTail} over its tail: exit ${tail.code}`);

    // Disjoint ranges of one image are not an overlap: main = first 16 MiB, spare = last 8 MiB.
    const loopHead = losetup(mainImg, ['--sizelimit', String(16 << 20)]);
    const loopEnd = losetup(mainImg, ['--offset', String(24 << 20)]);
    const disjoint = await ctl(sock(), 'add', 'c3', '--main', loopHead, '--spare', loopEnd, '--format');
    expect(disjoint.code, disjoint.stderr).toBe(0);
    expect((await ctl(sock(), 'remove', 'c3')).code).toBe(0);
    // Nothing half-added.
    expect(JSON.parse((await ctl(sock(), '--json', 'list')).stdout)).toEqual([]);
  });

  it('TCP exports listen where told (127.0.0.1); a host is required; no wildcard listener', async () => {
    const port = 20000 + (process.pid % 20000);
    const main = img(join(dir, 'main-t.img'), 32 << 20);
    const spare = img(join(dir, 'spare-t.img'), 8 << 20);
    for (const bad of [String(port), `:${port}`]) {
      const r = await ctl(sock(), 'add', 't0', '--main', main, '--spare', spare, '--format', '--nbd-tcp', bad);
      expect(r.code, `--nbd-tcp ${bad}: ${r.stderr}`).toBe(2);
    }
    const ok = await ctl(sock(), 'add', 't0', '--main', main, '--spare', spare, '--format', '--nbd-tcp', `127.0.0.1:${port}`);
    expect(ok.code, ok.stderr).toBe(0);
    const l = listeners(port);
    const ssOut = sh('ss', ['-Hltn', `sport = :${port}`]);
    figures.push(`--nbd-tcp 127.0.0.1:${port}: listeners ${JSON.stringify(l)} (0100007F = 127.0.0.1); ss: ${ssOut.replace(/\s+/g, ' ')}`);
    figures.push(`--nbd-tcp ${port} and :${port} (no host): exit 2 (usage), so no implicit 0.0.0.0`);
    expect(l).toEqual([`0100007F:${port.toString(16).toUpperCase().padStart(4, '0')}`]);
    expect(ssOut).toMatch(new RegExp(`127\\.0\\.0\\.1:${port}\\b`));
    // Local address column only (the peer column of a listener reads 0.0.0.0:*).
    const local = ssOut.split('\n').map((line) => line.trim().split(/\s+/)[3]);
    expect(local).toEqual([`127.0.0.1:${port}`]);
    expect((await ctl(sock(), 'remove', 't0')).code).toBe(0);
    expect(listeners(port)).toEqual([]);
  });
});
