/**
 * remapctl import-dmr4 end to end: an old main and an old dm-remap spare with
 * known sector data and a DMR4 table (overlapping entries, an entry inside
 * the first 640 KiB), decoded with --dry-run, imported through the real
 * daemon, and read back byte by byte through the NBD export; plus the
 * refusals (missing, corrupt, truncated old spare) that create nothing.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cleanup, ctl, startDaemon, tempDir, type Daemon } from '../daemon/helpers.js';
import { cleanupAll, requireTools, startFaultDisk } from '../helpers/faultdisk.js';
import { META, buildImage, buildRecord, type EntrySpec } from './dmr4-builder.js';

// nbdsh runs `python3` from PATH and needs the system's python3-nbd: put /usr/bin first.
const SYS_ENV = { ...process.env, PATH: `/usr/bin:/bin:${process.env.PATH ?? ''}` };
const SECTOR = 512;
const BS = 4096;
const MAIN_BYTES = 8 << 20;
const OLD_SPARE_BYTES = 2 << 20;

/** Every sector of the main and of the old spare is recognisable: a tag, its number, then a fill byte. */
function sectorData(tag: string, sector: number): Buffer {
  const b = Buffer.alloc(SECTOR, (sector * 7 + tag.charCodeAt(0)) & 0xff);
  b.write(`${tag}${sector}.`, 0, 'latin1');
  return b;
}

function image(tag: string, bytes: number, from = 0): Buffer {
  const b = Buffer.alloc(bytes);
  for (let s = from; s < bytes / SECTOR; s++) sectorData(tag, s).copy(b, s * SECTOR);
  return b;
}

const ENTRIES: EntrySpec[] = [
  { original: 8, spare: 1300 }, // 0: block 1, first sector
  { original: 9, spare: 1301, flags: 1 }, // 1: block 1, second sector (stored "pending": still a remap)
  { original: 100, spare: 1400 }, // 2: block 12, sector 4 of 8
  { original: 200, spare: 100 }, // 3: block 25: spare sector in the old metadata area
  { original: 300, spare: 1500 }, // 4: block 37 \ share one spare sector
  { original: 301, spare: 1500 }, // 5: block 37 /
  { original: 400, spare: 1600 }, // 6: block 50 \ one main sector twice
  { original: 400, spare: 1601 }, // 7: block 50 /
  { original: 500, spare: 1700, flags: 1 }, // 8: block 62
  { original: 16383, spare: 1800 }, // 9: the main's last sector, block 2047
];
const DATA_SECTORS: Array<[number, number]> = [[8, 1300], [9, 1301], [100, 1400], [500, 1700], [16383, 1800]];
const LOST_BLOCKS = [25, 37, 50];

function nbdsh(uri: string, code: string): string {
  return execFileSync('nbdsh', ['-u', uri, '-c', code], { encoding: 'utf8', timeout: 60_000, env: SYS_ENV });
}

/** Reads every block through NBD into `out`; returns the blocks that failed, with their errno name. */
function readAllBlocks(uri: string, out: string): Array<[number, string]> {
  const code = [
    'import json',
    'bad = []',
    `f = open(${JSON.stringify(out)}, "wb")`,
    `for b in range(${MAIN_BYTES / BS}):`,
    '    try:',
    `        d = h.pread(${BS}, b * ${BS})`,
    '    except nbd.Error as e:',
    '        bad.append([b, e.errno])',
    `        d = bytes(${BS})`,
    '    f.write(d)',
    'f.close()',
    'print(json.dumps(bad))',
  ].join('\n');
  return JSON.parse(nbdsh(uri, code)) as Array<[number, string]>;
}

describe('remapctl import-dmr4', () => {
  let dir: string;
  let d: Daemon;
  let mainPath: string;
  let oldSpare: string;
  let mainBytes: Buffer;
  let oldBytes: Buffer;

  beforeAll(async () => {
    dir = tempDir('dmr-dmr4-');
    mainPath = join(dir, 'main.img');
    mainBytes = image('M', MAIN_BYTES);
    writeFileSync(mainPath, mainBytes);
    oldSpare = join(dir, 'old-spare.img');
    // copy 0: the current table (seq 5); copy 1: an older one (seq 4); copy 2:
    // a newer one (seq 9) whose CRC is broken; copies 3 and 4 never written.
    const corrupt = buildRecord({ seq: 9, timestamp: 50, entries: [{ original: 1, spare: 1290 }] });
    corrupt[500] ^= 0x40;
    const meta = buildImage([
      buildRecord({ seq: 5, timestamp: 40, entries: ENTRIES }),
      buildRecord({ seq: 4, timestamp: 30, entries: ENTRIES.slice(0, 2) }),
      corrupt,
    ], META);
    oldBytes = Buffer.concat([meta, image('S', OLD_SPARE_BYTES, META / SECTOR).subarray(META)]);
    writeFileSync(oldSpare, oldBytes);
    d = await startDaemon(dir);
  });

  afterAll(async () => {
    await d?.stop();
    cleanup(dir);
  });

  it('--dry-run decodes the old spare without a daemon: copies, chosen table, overlapping entries', async () => {
    const r = await ctl(null, '--socket', join(dir, 'no-daemon.sock'), '--json', 'import-dmr4', '--dry-run', '--from', oldSpare);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const j = JSON.parse(r.stdout) as {
      path: string; spareBytes: number; chosen: number; seq: number;
      copies: Array<{ index: number; offset: number; valid: boolean; problem: string | null; seq: number | null }>;
      table: Array<{ index: number; originalSector: number; spareSector: number; problems: string[] }>;
      overlapping: Array<{ index: number; problems: string[] }>;
    };
    expect(j.spareBytes).toBe(OLD_SPARE_BYTES);
    expect(j.copies.map((c) => [c.offset, c.valid, c.valid ? c.seq : null])).toEqual([
      [0, true, 5], [131072, true, 4], [262144, false, null], [393216, false, null], [524288, false, null],
    ]);
    expect(j.copies[2].problem).toMatch(/^CRC mismatch/);
    expect(j.copies[3].problem).toBe('empty (all zero)');
    expect(j.chosen).toBe(0);
    expect(j.seq).toBe(5);
    expect(j.table.map((e) => [e.originalSector, e.spareSector])).toEqual(ENTRIES.map((e) => [e.original, e.spare]));
    expect(j.overlapping.map((e) => [e.index, e.problems])).toEqual([
      [3, ['metadata-area']], [4, ['shared-spare-sector']], [5, ['shared-spare-sector']], [6, ['duplicate-original']], [7, ['duplicate-original']],
    ]);
    const human = await ctl(null, 'import-dmr4', '--dry-run', '--from', oldSpare);
    expect(human.code).toBe(0);
    expect(human.stdout).toMatch(/copy 0 at 0: valid, seq 5, timestamp 40, 10 entries {2}<- chosen/);
    expect(human.stdout).toMatch(/copy 2 at 262144: invalid: CRC mismatch/);
    expect(human.stdout).toMatch(/8 -> 1300/);
    expect(human.stdout).toMatch(/entry 3: sector 200 -> 100 \(metadata-area\)/);
  });

  it('imports through the daemon: remapped sectors read the old spare, the rest of each block the main, overlapping blocks EIO until rewritten', async () => {
    const spare = join(dir, 'new-spare.img');
    writeFileSync(spare, '');
    truncateSync(spare, 4 << 20);
    const sock = join(dir, 'd.nbd');
    const uri = `nbd+unix:///d?socket=${sock}`;
    const r = await ctl(d.sock, '--json', 'import-dmr4', 'd', '--from', oldSpare, '--main', mainPath, '--spare', spare, '--format', '--nbd-unix', sock);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const j = JSON.parse(r.stdout) as {
      device: { name: string; remappedBlocks: number; pendingBlocks: number; badSpareBlocks: number; exports: string[] };
      import: { chosenCopy: number; seq: number; entries: number; dataBlocks: number[]; sectorsImported: number;
        pendingBlocks: Array<{ block: number; entries: number[]; problems: string[] }>; outsideEntries: number[] };
    };
    expect(j.import).toMatchObject({ chosenCopy: 0, seq: 5, entries: 10, dataBlocks: [1, 12, 62, 2047], sectorsImported: 5, outsideEntries: [] });
    expect(j.import.pendingBlocks).toEqual([
      { block: 25, entries: [3], problems: ['metadata-area'] },
      { block: 37, entries: [4, 5], problems: ['shared-spare-sector'] },
      { block: 50, entries: [6, 7], problems: ['duplicate-original'] },
    ]);
    // lost blocks hold a spare block marked bad (docs/DMR4.md)
    expect(j.device).toMatchObject({ name: 'd', remappedBlocks: 7, pendingBlocks: 3, badSpareBlocks: 3 });

    const out = join(dir, 'read.img');
    const failed = readAllBlocks(uri, out);
    expect(failed).toEqual(LOST_BLOCKS.map((b) => [b, 'EIO']));
    const expected = Buffer.from(mainBytes);
    for (const [orig, sp] of DATA_SECTORS) oldBytes.copy(expected, orig * SECTOR, sp * SECTOR, (sp + 1) * SECTOR);
    for (const b of LOST_BLOCKS) expected.fill(0, b * BS, (b + 1) * BS);
    const got = readFileSync(out);
    expect(got.length).toBe(MAIN_BYTES);
    if (!got.equals(expected)) {
      const firstDiff = got.findIndex((v, i) => v !== expected[i]);
      throw new Error(`device differs from the expected bytes first at byte ${firstDiff} (sector ${Math.floor(firstDiff / SECTOR)})`);
    }
    // spot check against the tags: the import put old-spare sectors there
    expect(got.subarray(8 * SECTOR, 8 * SECTOR + 6).toString('latin1')).toBe('S1300.');
    expect(got.subarray(10 * SECTOR, 10 * SECTOR + 4).toString('latin1')).toBe('M10.');
    // the import never writes the main
    expect(readFileSync(mainPath).equals(mainBytes)).toBe(true);

    const logged = await d.waitLog((l) => l.event === 'import-dmr4' && l.device === 'd');
    expect(logged).toMatchObject({ from: oldSpare, copy: 0, seq: '5', entries: 10, dataBlocks: 4, sectors: 5, pendingBlocks: LOST_BLOCKS, outsideEntries: [] });

    // a lost block is readable again once rewritten
    expect(nbdsh(uri, `h.pwrite(b"\\x5a" * ${BS}, 37 * ${BS}); h.flush(); print(h.pread(${BS}, 37 * ${BS}) == b"\\x5a" * ${BS})`).trim()).toBe('True');

    // and everything survives a daemon restart
    expect(await d.stop()).toBe(0);
    d = await startDaemon(dir);
    const again = readAllBlocks(uri, out);
    expect(again).toEqual([[25, 'EIO'], [50, 'EIO']]);
    const got2 = readFileSync(out);
    expected.fill(0x5a, 37 * BS, 38 * BS);
    expect(got2.equals(expected)).toBe(true);
    expect((await ctl(d.sock, 'remove', 'd')).code).toBe(0);

    // importing again onto that spare is refused (exit 1), and the device is not added
    const again2 = await ctl(d.sock, 'import-dmr4', 'd2', '--from', oldSpare, '--main', mainPath, '--spare', spare);
    expect(again2.code).toBe(1);
    expect(again2.stderr).toMatch(/the new spare already holds 7 remapped and 2 pending block\(s\); import-dmr4 needs a freshly formatted spare/);
    expect((JSON.parse((await ctl(d.sock, '--json', 'list')).stdout) as Array<{ name: string }>).map((x) => x.name)).not.toContain('d2');
  });

  it('a missing, corrupt or truncated old spare: clear errors, documented exit codes, nothing created', async () => {
    const spare2 = join(dir, 'spare2.img');
    writeFileSync(spare2, '');
    truncateSync(spare2, 4 << 20);
    const main2 = join(dir, 'main2.img');
    writeFileSync(main2, '');
    truncateSync(main2, 4 << 20);
    const corrupt = join(dir, 'corrupt.img');
    const c = Buffer.from(oldBytes);
    c[8] ^= 1; // copy 0: seq byte, CRC no longer matches
    c[131072 + 296] ^= 1; // copy 1: active_remaps
    writeFileSync(corrupt, c);
    const truncated = join(dir, 'truncated.img');
    writeFileSync(truncated, oldBytes.subarray(0, 100_000));
    const missing = join(dir, 'nope.img');

    const cases: Array<[string, number, string, RegExp]> = [
      [missing, 8, 'NOT_FOUND', /old spare .*nope\.img does not exist/],
      [corrupt, 7, 'CORRUPT_METADATA', /no valid DMR4 copy: copy 0 at 0: CRC mismatch.*copy 1 at 131072: CRC mismatch/],
      [truncated, 7, 'NO_METADATA', /100000 bytes, smaller than the 655360-byte DMR4 metadata area/],
    ];
    for (const [from, exit, code, msg] of cases) {
      const dry = await ctl(null, '--json', 'import-dmr4', '--dry-run', '--from', from);
      expect(dry.code, `dry-run ${from}: ${dry.stderr}`).toBe(exit);
      expect(dry.stderr).toMatch(msg);
      expect((JSON.parse(dry.stdout) as { error: { code: string } }).error.code).toBe(code);
      const r = await ctl(d.sock, '--json', 'import-dmr4', 'e', '--from', from, '--main', main2, '--spare', spare2, '--format');
      expect(r.code, `import ${from}: ${r.stderr}`).toBe(exit);
      expect(r.stderr).toMatch(msg);
      expect((JSON.parse(r.stdout) as { error: { code: string } }).error.code).toBe(code);
    }
    // nothing created: no device, the new spare never formatted
    const list = JSON.parse((await ctl(d.sock, '--json', 'list')).stdout) as Array<{ name: string }>;
    expect(list.map((x) => x.name)).not.toContain('e');
    expect(readFileSync(spare2).every((b) => b === 0)).toBe(true);

    // the old spare as the new spare: refused before anything is written to it
    const before = readFileSync(oldSpare);
    const same = await ctl(d.sock, '--json', 'import-dmr4', 'e', '--from', oldSpare, '--main', main2, '--spare', oldSpare, '--format');
    expect(same.code, same.stderr).toBe(2);
    expect(same.stderr).toMatch(/the new spare .*old-spare\.img is the old spare/);
    expect(readFileSync(oldSpare).equals(before)).toBe(true);

    // usage errors
    expect((await ctl(d.sock, 'import-dmr4', '--from', oldSpare)).code).toBe(2);
    expect((await ctl(d.sock, 'import-dmr4', 'e', '--from', oldSpare, '--main', main2)).code).toBe(2);
    expect((await ctl(null, 'import-dmr4', 'e', '--dry-run', '--from', oldSpare)).code).toBe(2);
  });
  it('--spare-tail with 512-byte blocks: every sector is its own block; an entry past the shrunk device is reported, not imported', async () => {
    const main3 = join(dir, 'main3.img');
    writeFileSync(main3, mainBytes);
    const sock = join(dir, 't.nbd');
    const r = await ctl(d.sock, '--json', 'import-dmr4', 't', '--from', oldSpare, '--main', main3, '--spare-tail', '1M', '--block-size', '512', '--format', '--nbd-unix', sock);
    expect(r.code, r.stderr).toBe(0);
    const j = JSON.parse(r.stdout) as { import: { blockSize: number; dataBlocks: number[]; pendingBlocks: Array<{ block: number; entries: number[] }>; outsideEntries: number[] } };
    expect(j.import.blockSize).toBe(512);
    expect(j.import.dataBlocks).toEqual([8, 9, 100, 500]);
    expect(j.import.pendingBlocks.map((p) => [p.block, p.entries])).toEqual([[200, [3]], [300, [4]], [301, [5]], [400, [6, 7]]]);
    expect(j.import.outsideEntries).toEqual([9]);
    const uri = `nbd+unix:///t?socket=${sock}`;
    const code = [
      'import json',
      'res = {}',
      'for s in [8, 9, 10, 100, 299, 300, 301, 302, 400, 500]:',
      '    try:',
      '        res[s] = h.pread(512, s * 512)[:8].decode("latin1")',
      '    except nbd.Error as e:',
      '        res[s] = e.errno',
      'print(json.dumps(res))',
    ].join('\n');
    expect(JSON.parse(nbdsh(uri, code))).toEqual({
      8: sectorData('S', 1300).subarray(0, 8).toString('latin1'), 9: sectorData('S', 1301).subarray(0, 8).toString('latin1'),
      10: sectorData('M', 10).subarray(0, 8).toString('latin1'), 100: sectorData('S', 1400).subarray(0, 8).toString('latin1'),
      299: sectorData('M', 299).subarray(0, 8).toString('latin1'), 300: 'EIO', 301: 'EIO', 302: sectorData('M', 302).subarray(0, 8).toString('latin1'),
      400: 'EIO', 500: sectorData('S', 1700).subarray(0, 8).toString('latin1'),
    });
    expect((await ctl(d.sock, 'remove', 't')).code).toBe(0);
  });

  it('a failing main: a block whose remapped sector is unreadable is read sector by sector; one with another unreadable sector is lost', async () => {
    requireTools('nbdkit', 'nbdfuse', 'nbdkit-python', '/dev/fuse');
    const backing = join(dir, 'faulty-main.img');
    writeFileSync(backing, mainBytes);
    const disk = await startFaultDisk({ dir, name: 'fmain', sizeBytes: MAIN_BYTES, backingFile: backing });
    try {
      // sector 8 (remapped: its data comes from the old spare) and sector 97
      // (block 12 = sectors 96..103, not remapped, whose data is gone)
      await disk.setBad({ read: [[8 * SECTOR, SECTOR], [97 * SECTOR, SECTOR]] });
      const spare = join(dir, 'fspare.img');
      writeFileSync(spare, '');
      truncateSync(spare, 4 << 20);
      const sock = join(dir, 'f.nbd');
      const r = await ctl(d.sock, '--json', 'import-dmr4', 'f', '--from', oldSpare, '--main', disk.path, '--spare', spare, '--format', '--nbd-unix', sock);
      expect(r.code, r.stderr).toBe(0);
      const j = JSON.parse(r.stdout) as { import: { dataBlocks: number[]; pendingBlocks: Array<{ block: number; problems: string[]; detail?: string }> } };
      expect(j.import.dataBlocks).toEqual([1, 62, 2047]);
      expect(j.import.pendingBlocks.map((p) => [p.block, p.problems])).toEqual([
        [12, ['main-unreadable']], [25, ['metadata-area']], [37, ['shared-spare-sector']], [50, ['duplicate-original']],
      ]);
      expect(j.import.pendingBlocks[0].detail).toBe('main sector 97 is unreadable (EIO)');
      // the whole-block reads of blocks 1 and 12 failed, then sector 97 alone
      expect((await disk.stats()).readErrors).toBe(3);
      const uri = `nbd+unix:///f?socket=${sock}`;
      const code = [
        'import json',
        'out = []',
        'for b in [1, 12]:',
        '    try:',
        `        out.append(h.pread(${BS}, b * ${BS}).hex())`,
        '    except nbd.Error as e:',
        '        out.append(e.errno)',
        'print(json.dumps(out))',
      ].join('\n');
      const [b1, b12] = JSON.parse(nbdsh(uri, code)) as string[];
      const want1 = Buffer.from(mainBytes.subarray(BS, 2 * BS));
      oldBytes.copy(want1, 0, 1300 * SECTOR, 1302 * SECTOR);
      expect(b1).toBe(want1.toString('hex'));
      expect(b12).toBe('EIO');
      expect((await ctl(d.sock, 'remove', 'f')).code).toBe(0);
    } finally {
      await disk.stop();
      await cleanupAll();
    }
  });
});
