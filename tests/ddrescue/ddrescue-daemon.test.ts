/**
 * remapctl export/import --ddrescue against real peers (issue 6):
 * - export: the mapfile is read by GNU ddrescuelog (its '-' blocks are
 *   exactly the remapped and pending blocks) and by nbdkit's ddrescue
 *   filter, which then fails reads of exactly those blocks of the raw main;
 * - import: bad areas of a mapfile over a main whose blocks are really
 *   unreadable (the fault disk): readable blocks are copied to the spare
 *   and read back through NBD even after main stops reading them, an
 *   unreadable one becomes pending (EIO); an import of a mapfile that GNU
 *   ddrescue itself wrote over that disk; refusals (malformed mapfile, a
 *   mapfile of a bigger disk, a missing file) with their exit codes.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync, readdirSync, truncateSync, writeFileSync } from 'node:fs';
import { BLOCKS, BS, HAVE_DDRESCUE, SIZE, nbdBlocks, patternImage, run } from './helpers.js';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cleanupAll, makeTempDir, requireTools, startFaultDisk, type FaultDisk } from '../helpers/faultdisk.js';
import { ctl, request, startDaemon, type Daemon } from '../daemon/helpers.js';

requireTools('nbdkit', 'nbdkit-python', 'nbdfuse', 'fusermount3', '/dev/fuse', 'nbdsh');

/** Block numbers of the bad-sector ('-') areas, as GNU ddrescuelog lists them. */
function ddrescuelogBad(map: string): number[] {
  const out = execFileSync('ddrescuelog', ['-b', String(BS), '-l-', map], { encoding: 'utf8' });
  return out.split('\n').filter((l) => l.trim() !== '').map(Number);
}

describe('remapctl export/import --ddrescue', () => {
  let dir: string;
  let d: Daemon;
  let disk: FaultDisk;
  let nbd: string;
  beforeAll(async () => {
    dir = await makeTempDir('dmr-ddrescue');
    patternImage(join(dir, 'plain.img'));
    patternImage(join(dir, 'faulty.img'));
    disk = await startFaultDisk({ dir, name: 'main', sizeBytes: SIZE, backingFile: join(dir, 'faulty.img') });
    for (const s of ['spare1.img', 'spare2.img']) {
      writeFileSync(join(dir, s), '');
      truncateSync(join(dir, s), 8 << 20);
    }
    d = await startDaemon(dir);
    nbd = join(dir, 'f.nbd');
    expect((await ctl(d.sock, 'add', 'p', '--main', join(dir, 'plain.img'), '--spare', join(dir, 'spare1.img'), '--format')).code).toBe(0);
    expect((await ctl(d.sock, 'add', 'f', '--main', disk.path, '--spare', join(dir, 'spare2.img'), '--format', '--nbd-unix', nbd)).code).toBe(0);
  }, 60_000);
  afterAll(async () => {
    if (d !== undefined) await d.stop();
    await cleanupAll();
  });

  it('export: ddrescuelog and nbdkit\'s ddrescue filter see exactly the remapped blocks as bad', async () => {
    const remapped = [5, 6, 7, 100, 2000, BLOCKS - 1];
    expect((await ctl(d.sock, 'remap', 'p', ...remapped.map(String))).code).toBe(0);
    const map = join(dir, 'p.map');
    const r = await ctl(d.sock, '--json', 'export', 'p', '--ddrescue', map);
    expect(r.code).toBe(0);
    const j = JSON.parse(r.stdout) as { remappedBlocks: number; pendingBlocks: number; badAreas: number; areas: number; file: string };
    expect(j).toMatchObject({ remappedBlocks: 6, pendingBlocks: 0, badAreas: 4, areas: 8, file: map });
    const text = readFileSync(map, 'utf8');
    expect(text).toContain('0x00005000  0x00003000  -\n');
    if (HAVE_DDRESCUE) expect(ddrescuelogBad(map)).toEqual(remapped);
    const probe = [0, 4, 5, 6, 7, 8, 99, 100, 101, 1999, 2000, 2001, BLOCKS - 2, BLOCKS - 1];
    const got = await nbdBlocks({ nbdkitArgs: ['--filter=ddrescue', 'file', `file=${join(dir, 'plain.img')}`, `ddrescue-mapfile=${map}`] }, probe);
    for (const b of probe) expect([b, got[b]]).toEqual([b, remapped.includes(b) ? 'EIO' : b]);
    // Written atomically: no temporary file is left beside it, and a second export replaces it.
    expect((await ctl(d.sock, 'export', 'p', '--ddrescue', map)).code).toBe(0);
    expect(readdirSync(dir).filter((f) => f.includes('.tmp-'))).toEqual([]);
  }, 60_000);

  it('import: readable bad-area blocks are copied to the spare, an unreadable one becomes pending; export then lists both', async () => {
    // Block 10 is really unreadable on main; 11, 12 and 30 still read.
    await disk.setBad({ read: [[10 * BS, BS]] });
    const map = join(dir, 'f.map');
    writeFileSync(map, [
      '# Mapfile. Created by GNU ddrescue version 1.27', '# current_pos  current_status  current_pass', '0x00000000     +               1',
      '#      pos        size  status',
      `0x00000000  0x${(10 * BS).toString(16)}  +`,
      `0x${(10 * BS).toString(16)}  0x${(3 * BS).toString(16)}  -`,
      `0x${(13 * BS).toString(16)}  0x${(17 * BS + 512).toString(16)}  +`,
      `0x${(30 * BS + 512).toString(16)}  0x200  -`,
      `0x${(30 * BS + 1024).toString(16)}  0x${(10 * BS - 1024).toString(16)}  +`,
      `0x${(40 * BS).toString(16)}  0x${BS.toString(16)}  *`,
      `0x${(41 * BS).toString(16)}  0x${(SIZE - 41 * BS).toString(16)}  +`, '',
    ].join('\n'));
    const r = await ctl(d.sock, '--json', 'import', 'f', '--ddrescue', map);
    expect(r.code).toBe(1); // one block could not be copied
    const j = JSON.parse(r.stdout) as { blocks: number; remapped: number; pending: number; failed: number; areas: number;
      ranges: Array<{ first: number; count: number; remapped: number; pending: number; problems: Array<{ block: number; result: string; reason: string }> }> };
    expect(j).toMatchObject({ blocks: 4, remapped: 3, pending: 1, failed: 0, areas: 2 });
    expect(j.ranges.map((x) => [x.first, x.count, x.remapped, x.pending])).toEqual([[10, 3, 2, 1], [30, 1, 1, 0]]);
    expect(j.ranges[0].problems[0]).toMatchObject({ block: 10, result: 'pending' });
    expect(j.ranges[0].problems[0].reason).toContain('EIO');
    // Main now fails every one of them: the device serves 11, 12 and 30 from the spare, with the old data.
    await disk.setBad({ read: [[10 * BS, 3 * BS], [30 * BS, BS]] });
    const got = await nbdBlocks({ uri: `nbd+unix:///f?socket=${nbd}` }, [9, 10, 11, 12, 13, 30, 40]);
    expect(got).toEqual({ 9: 9, 10: 'EIO', 11: 11, 12: 12, 13: 13, 30: 30, 40: 40 });
    // Human output names each range and the pending block.
    const h = await ctl(d.sock, 'import', 'f', '--ddrescue', map, '--statuses', '-*');
    expect(h.code).toBe(1);
    expect(h.stdout).toContain('f: blocks 10-12: 0 remapped, 2 already remapped, 1 pending (unreadable)');
    expect(h.stdout).toContain('  block 10: pending: block 10 is unreadable (EIO)');
    expect(h.stdout).toContain('f: block 40: 1 remapped');
    // Export: remapped (11, 12, 30, 40) and pending (10) blocks are the bad areas.
    const out = join(dir, 'f-out.map');
    const e = await ctl(d.sock, '--json', 'export', 'f', '--ddrescue', out);
    expect(JSON.parse(e.stdout)).toMatchObject({ remappedBlocks: 4, pendingBlocks: 1, badAreas: 3 });
    if (HAVE_DDRESCUE) expect(ddrescuelogBad(out)).toEqual([10, 11, 12, 30, 40]);
    await disk.setBad({});
  }, 60_000);

  it.skipIf(!HAVE_DDRESCUE)('import of a mapfile written by a real GNU ddrescue run over the failing disk', async () => {
    await disk.setBad({ read: [[200 * BS, 2 * BS], [3000 * BS + 1024, 512]] });
    const map = join(dir, 'rescue.map');
    // A rescue of the whole failing main to a scratch image, as an operator would run it.
    await run('ddrescue', ['-f', '-b', '512', '-r', '1', disk.path, join(dir, 'rescue.img'), map], 120_000);
    expect(ddrescuelogBad(map).length).toBeGreaterThan(0);
    const r = await ctl(d.sock, '--json', 'import', 'f', '--ddrescue', map);
    const j = JSON.parse(r.stdout) as { pending: number; remapped: number; ranges: Array<{ first: number; count: number; pending: number }> };
    // ddrescue found exactly the unreadable blocks; they become pending (nothing readable to copy).
    expect(j.ranges.map((x) => [x.first, x.count, x.pending])).toEqual([[200, 2, 2], [3000, 1, 1]]);
    expect(r.code).toBe(1);
    await disk.setBad({});
  }, 180_000);

  it('refuses a malformed mapfile naming the line, a mapfile of a bigger disk, a missing file, bad --statuses', async () => {
    const bad = join(dir, 'bad.map');
    writeFileSync(bad, '0 + 1\n0 4096 +\n8192 4096 -\n');
    const a = await ctl(d.sock, 'import', 'f', '--ddrescue', bad);
    expect(a.code).toBe(2);
    expect(a.stderr).toContain(`import f: mapfile ${bad}: line 3: block at 8192 leaves a gap after the previous block, which ends at 4096`);
    const big = join(dir, 'big.map');
    writeFileSync(big, `0 + 1\n0 0x${SIZE.toString(16)} +\n0x${SIZE.toString(16)} 0x1000 -\n`);
    const b = await ctl(d.sock, '--json', 'import', 'f', '--ddrescue', big);
    expect(b.code).toBe(2);
    expect(b.stderr).toContain('line 3: area 33554432+4096 (\'-\') ends past the device\'s 33554432 bytes of whole blocks');
    const c = await ctl(d.sock, '--json', 'import', 'f', '--ddrescue', join(dir, 'nope.map'));
    expect(c.code).toBe(8);
    expect((JSON.parse(c.stdout) as { error: { code: string } }).error.code).toBe('NOT_FOUND');
    expect((await ctl(d.sock, 'import', 'f', '--ddrescue', bad, '--statuses', '+')).code).toBe(2);
    expect((await ctl(d.sock, 'import', 'nodev', '--ddrescue', bad)).code).toBe(2); // the mapfile is checked first
    expect((await ctl(d.sock, 'import', 'nodev', '--ddrescue', big)).code).toBe(4);
    expect((await ctl(d.sock, 'export', 'nodev', '--ddrescue', join(dir, 'x.map'))).code).toBe(4);
    expect((await ctl(d.sock, 'export', 'f', '--ddrescue', join(dir, 'no-such-dir', 'x.map'))).code).toBe(8);
  }, 60_000);

  it('control protocol: malformed ddrescue-import and unremap arguments are refused with stable codes, naming the argument', async () => {
    const cases: Array<[string, Record<string, unknown>, string, string]> = [
      ['ddrescue-import', { name: 'f' }, 'BAD_REQUEST', 'argument "ranges" must be a non-empty array'],
      ['ddrescue-import', { name: 'f', ranges: [] }, 'BAD_REQUEST', 'argument "ranges" must be a non-empty array'],
      ['ddrescue-import', { name: 'f', ranges: [[1]] }, 'BAD_REQUEST', '[1] is not [firstBlock, count]'],
      ['ddrescue-import', { name: 'f', ranges: [[1, 0]] }, 'BAD_REQUEST', '[1,0] is not [firstBlock, count]'],
      ['ddrescue-import', { name: 'f', ranges: [[-1, 2]] }, 'BAD_REQUEST', '[-1,2] is not [firstBlock, count]'],
      ['ddrescue-import', { name: 'f', ranges: [['1', 2]] }, 'BAD_REQUEST', 'is not [firstBlock, count]'],
      ['ddrescue-import', { name: 'f', ranges: [[BLOCKS - 1, 2]] }, 'INVALID_ARGUMENT', `blocks ${BLOCKS - 1}..${BLOCKS} are outside device "f"`],
      ['ddrescue-import', { name: 'f', ranges: Array.from({ length: 130 }, () => [0, 8000]) }, 'INVALID_ARGUMENT', 'more than 1000000 blocks in one import on device "f"'],
      ['ddrescue-import', { name: 'nope', ranges: [[0, 1]] }, 'UNKNOWN_DEVICE', 'nope'],
      ['ddrescue-export', {}, 'BAD_REQUEST', 'argument "name"'],
      ['unremap', { name: 'f' }, 'BAD_REQUEST', 'give exactly one of "all": true or "blocks"'],
      ['unremap', { name: 'f', all: true, blocks: [1] }, 'BAD_REQUEST', 'give exactly one of "all": true or "blocks"'],
      ['unremap', { name: 'f', all: 'yes' }, 'BAD_REQUEST', 'argument "all" must be true or false'],
      ['unremap', { name: 'f', blocks: [1.5] }, 'BAD_REQUEST', 'argument "blocks" must be a non-empty array'],
      ['unremap', { name: 'f', blocks: [] }, 'BAD_REQUEST', 'argument "blocks" must be a non-empty array'],
      ['unremap', { name: 'nope', all: true }, 'UNKNOWN_DEVICE', 'nope'],
    ];
    for (const [cmd, args, code, text] of cases) {
      const a = await request(d.sock, cmd, args);
      expect([cmd, args, a.ok]).toEqual([cmd, args, false]);
      const err = a.error as { code: string; message: string };
      expect([cmd, args, err.code]).toEqual([cmd, args, code]);
      expect(err.message).toContain(text);
    }
    // The device is untouched and still serves.
    expect(((await request(d.sock, 'status', { name: 'f' })).result as { state: string }).state).toBe('running');
  }, 60_000);
});
