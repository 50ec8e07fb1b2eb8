/**
 * A spare that overlaps the main through the block stack is refused (issue
 * 5, security), on real loop devices with a partition table: an image with
 * an MBR (written here, two partitions, as sfdisk would) attached with
 * `losetup -P` (and `partx -a` where the kernel parses no MBR), so
 * /dev/loopN has partitions /dev/loopNp1 and /dev/loopNp2.
 * The exclusive open alone would only say EBUSY for some of these (a
 * claimed partition keeps its whole disk from being claimed, and the other
 * way round); src/engine/stack-overlap.ts compares where each side keeps
 * its bytes through sysfs (partition start/size, loop backing file and
 * offset) and names the shared layer and both byte ranges.
 *
 *  - main /dev/loopN, spare /dev/loopNp2                 -> exit 2, overlap
 *  - main /dev/loopNp1, spare /dev/loopN                 -> exit 2, overlap
 *  - main = the image file, spare /dev/loopNp2           -> exit 2, overlap
 *  - main /dev/loopNp1, spare /dev/loopNp2 (disjoint)    -> accepted
 *  - device a0 on /dev/loopNp1, then a1 on /dev/loopN    -> exit 5, names a0
 *  - main = the image file, `spare add` /dev/loopNp2     -> exit 5, overlap
 *  - y0 on the image file, `spare add` /dev/loopNp1 to y1 -> exit 5, names y0
 *
 * Needs root and loop devices; skipped otherwise. The loop device is
 * detached in afterAll, even after a failure.
 */
import { execFileSync } from 'node:child_process';
import { closeSync, existsSync, openSync, readFileSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { basename, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cleanup, ctl, startDaemon, tempDir, type Daemon } from '../daemon/helpers.js';

const canLoop = process.getuid?.() === 0 && existsSync('/dev/loop-control');
const MIB = 1 << 20;
const SECTOR = 512;
/** Partitions in sectors: p1 = 1..17 MiB, p2 = 17..31 MiB of a 32 MiB image. */
const P1 = { start: MIB / SECTOR, sectors: 16 * MIB / SECTOR };
const P2 = { start: 17 * MIB / SECTOR, sectors: 14 * MIB / SECTOR };

function sh(cmd: string, args: string[]): string {
  return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim();
}

/** A 32 MiB image with an MBR holding two Linux partitions (P1, P2). */
function partitionedImage(path: string): void {
  writeFileSync(path, '');
  truncateSync(path, 32 * MIB);
  const mbr = Buffer.alloc(SECTOR);
  [P1, P2].forEach((p, i) => {
    const e = 446 + 16 * i;
    mbr[e + 4] = 0x83; // Linux; CHS fields left zero (LBA is what Linux reads)
    mbr.writeUInt32LE(p.start, e + 8);
    mbr.writeUInt32LE(p.sectors, e + 12);
  });
  mbr[510] = 0x55;
  mbr[511] = 0xaa;
  const fd = openSync(path, 'r+');
  try {
    writeSync(fd, mbr, 0, SECTOR, 0);
  } finally {
    closeSync(fd);
  }
}

/** Waits for a device node; throws after `ms` unless `ms` was given (then answers whether it appeared). */
async function waitFor(path: string, ms?: number): Promise<boolean> {
  for (let i = 0; i < (ms ?? 2000) / 20 && !existsSync(path); i++) await new Promise((r) => setTimeout(r, 20));
  if (!existsSync(path) && ms === undefined) throw new Error(`${path} did not appear`);
  return existsSync(path);
}

describe.skipIf(!canLoop)('a spare overlapping the main through partitions of a loop device is refused', () => {
  let dir: string;
  let d: Daemon | undefined;
  let loop = '';
  let image = '';
  const figures: string[] = [];
  const sock = (): string => (d as Daemon).sock;

  beforeAll(async () => {
    dir = tempDir('dmr-part-');
    image = join(dir, 'disk.img');
    partitionedImage(image);
    loop = sh('losetup', ['--find', '--show', '-P', image]);
    // A kernel without an MBR parser (CONFIG_MSDOS_PARTITION off, as on the
    // CI host) scans nothing: partx reads the table and adds the partitions
    // through BLKPG instead.
    if (!(await waitFor(`${loop}p1`, 500))) sh('partx', ['-a', loop]);
    await waitFor(`${loop}p1`);
    await waitFor(`${loop}p2`);
    d = await startDaemon(dir);
  });

  afterAll(async () => {
    try {
      if (d !== undefined) await d.stop();
    } finally {
      if (loop !== '') {
        try { sh('partx', ['-d', loop]); } catch { /* no partitions left */ }
        try { sh('losetup', ['-d', loop]); } catch { /* already detached */ }
      }
      if (dir !== undefined) cleanup(dir);
      console.log(`\npartition overlap refusals:\n${figures.map((f) => `  ${f}`).join('\n')}\n`);
    }
  });

  it('the kernel sees the two partitions where the MBR puts them', () => {
    const sys = `/sys/class/block/${basename(loop)}`;
    expect(Number(readFileSync(`${sys}/${basename(loop)}p1/start`, 'utf8'))).toBe(P1.start);
    expect(Number(readFileSync(`${sys}/${basename(loop)}p2/start`, 'utf8'))).toBe(P2.start);
    expect(Number(readFileSync(`${sys}/${basename(loop)}p2/size`, 'utf8'))).toBe(P2.sectors);
  });

  it('main = the whole disk, spare = its partition 2: exit 2, the shared disk and both ranges named', async () => {
    const r = await ctl(sock(), '--json', 'add', 'w2', '--main', loop, '--spare', `${loop}p2`, '--format');
    expect(r.code, r.stdout + r.stderr).toBe(2);
    expect(JSON.parse(r.stdout)).toMatchObject({ ok: false, error: { code: 'INVALID_ARGUMENT' } });
    const p2 = [P2.start * SECTOR, (P2.start + P2.sectors) * SECTOR];
    expect(r.stderr).toContain(`spare ${loop}p2 overlaps the main ${loop}: both are stored on ${loop} (bytes ${p2[0]}..${p2[1]} and 0..${32 * MIB})`);
    expect(r.stderr).toContain('device w2');
    figures.push(`main ${loop}, spare ${loop}p2: exit ${r.code}: ${r.stderr.trim()}`);
  });

  it('main = partition 1, spare = the whole disk: exit 2, overlap', async () => {
    const r = await ctl(sock(), 'add', 'p1w', '--main', `${loop}p1`, '--spare', loop, '--format');
    expect(r.code, r.stderr).toBe(2);
    expect(r.stderr).toContain(`spare ${loop} overlaps the main ${loop}p1: both are stored on ${loop} (bytes 0..${32 * MIB} and ${P1.start * SECTOR}..${(P1.start + P1.sectors) * SECTOR})`);
    figures.push(`main ${loop}p1, spare ${loop}: exit ${r.code}: ${r.stderr.trim()}`);
  });

  it('main = the image file, spare = partition 2 of a loop device over it: exit 2, the image named', async () => {
    const r = await ctl(sock(), 'add', 'fp2', '--main', image, '--spare', `${loop}p2`, '--format');
    expect(r.code, r.stderr).toBe(2);
    expect(r.stderr).toContain(`spare ${loop}p2 overlaps the main ${image}: both are stored on ${image}`);
    figures.push(`main ${image}, spare ${loop}p2: exit ${r.code}: ${r.stderr.trim()}`);
  });

  it('disjoint partitions are accepted; the whole disk is then refused to another device, naming it', async () => {
    const ok = await ctl(sock(), 'add', 'a0', '--main', `${loop}p1`, '--spare', `${loop}p2`, '--format');
    expect(ok.code, ok.stderr).toBe(0);
    writeFileSync(join(dir, 'a1-spare.img'), '');
    truncateSync(join(dir, 'a1-spare.img'), 4 * MIB);
    const busy = await ctl(sock(), '--json', 'add', 'a1', '--main', loop, '--spare', join(dir, 'a1-spare.img'), '--format');
    expect(busy.code, busy.stdout + busy.stderr).toBe(5);
    expect(JSON.parse(busy.stdout)).toMatchObject({ ok: false, error: { code: 'BUSY' } });
    expect(busy.stderr).toContain(`${loop} overlaps ${loop}p1, used by device "a0": both are stored on ${loop}`);
    const partAgain = await ctl(sock(), 'add', 'a2', '--main', join(dir, 'a1-spare.img'), '--spare', `${loop}p2`, '--format');
    expect(partAgain.code).toBe(5);
    expect((await ctl(sock(), 'remove', 'a0')).code).toBe(0);
    expect(JSON.parse((await ctl(sock(), '--json', 'list')).stdout)).toEqual([]);
    figures.push(`main ${loop}p1, spare ${loop}p2: accepted`);
    figures.push(`then ${loop} for another device: exit ${busy.code}: ${busy.stderr.trim()}`);
  });
  it('an extra spare (spare add) on a partition of a loop device over the main image is refused', async () => {
    writeFileSync(join(dir, 'x0-spare.img'), '');
    truncateSync(join(dir, 'x0-spare.img'), 4 * MIB);
    const ok = await ctl(sock(), 'add', 'x0', '--main', image, '--spare', join(dir, 'x0-spare.img'), '--format', '--pool-reserve', '16M');
    expect(ok.code, ok.stderr).toBe(0);
    const r = await ctl(sock(), '--json', 'spare', 'add', 'x0', `${loop}p2`, '--format');
    expect(r.code, r.stdout + r.stderr).toBe(5);
    expect(r.stderr).toContain(`spare ${loop}p2 is already used as main of this device (${loop}p2 overlaps ${image}: both are stored on ${image}`);
    const list = await ctl(sock(), '--json', 'spare', 'list', 'x0');
    expect(list.code, list.stderr).toBe(0);
    expect(JSON.stringify(JSON.parse(list.stdout))).not.toContain(`${loop}p2`);
    expect((await ctl(sock(), 'remove', 'x0')).code).toBe(0);
    figures.push(`main ${image}, spare add ${loop}p2: exit ${r.code}: ${r.stderr.trim()}`);
  });
  it('spare add of a partition over another device\'s main image is refused, naming that device', async () => {
    for (const f of ['y0-spare.img', 'y1-main.img', 'y1-spare.img']) {
      writeFileSync(join(dir, f), '');
      truncateSync(join(dir, f), (f === 'y1-main.img' ? 16 : 4) * MIB);
    }
    expect((await ctl(sock(), 'add', 'y0', '--main', image, '--spare', join(dir, 'y0-spare.img'), '--format')).code).toBe(0);
    const y1 = await ctl(sock(), 'add', 'y1', '--main', join(dir, 'y1-main.img'), '--spare', join(dir, 'y1-spare.img'), '--format', '--pool-reserve', '16M');
    expect(y1.code, y1.stderr).toBe(0);
    const r = await ctl(sock(), '--json', 'spare', 'add', 'y1', `${loop}p1`, '--format');
    expect(r.code, r.stdout + r.stderr).toBe(5);
    expect(r.stderr).toContain(`${loop}p1 overlaps ${image}, used by device "y0": both are stored on ${image}`);
    expect((await ctl(sock(), 'remove', 'y1')).code).toBe(0);
    expect((await ctl(sock(), 'remove', 'y0')).code).toBe(0);
    figures.push(`device y0 on ${image}, spare add ${loop}p1 to y1: exit ${r.code}: ${r.stderr.trim()}`);
  });
});
