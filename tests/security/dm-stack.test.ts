/**
 * A spare that overlaps the main through a device-mapper (or md) stack is
 * refused (issue 5, security): src/engine/stack-overlap.ts reads each dm
 * device's table and maps the used range through it. The host kernel has no
 * device-mapper, so here:
 *  - the table parser (pure): unit tests for each target it models
 *    (linear, multi-segment, flakey, delay, log-writes, error, zero), the
 *    conservative reading of the others, MAJ:MIN and path arguments;
 *    property tests (a generated table parses back to its segments and
 *    maps); fuzzing with random and mutated lines (returns, or throws a
 *    DmTableError, nothing else). DMR_FUZZ_SEED=N reproduces a run.
 *  - the walk down a stack, on a sysfs tree built in a temp folder (the
 *    layout the kernel uses: dev/block/MAJ:MIN links, `dev`, `size`, `dm/name`,
 *    `loop/backing_file`, `md` + `slaves/`), with the tables given to it;
 *    a property test compares it with a brute-force sector count.
 * The real devices are tested in the guest: tests/vm/guest-nbd.sh, section
 * "overlap through dm".
 */
import { mkdirSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  DmTableError, deviceLayers, layersOverlap, parseDmTable, segmentMaps, type StackOptions,
} from '../../src/engine/stack-overlap.js';
import { cleanup, tempDir } from '../daemon/helpers.js';

const seed = process.env.DMR_FUZZ_SEED !== undefined ? Number(process.env.DMR_FUZZ_SEED) >>> 0 : (Date.now() ^ (process.pid << 16)) >>> 0;
const SECTOR = 512;

describe('parseDmTable', () => {
  it('linear: the segment at OFFSET of the device, MAJ:MIN or a path', () => {
    expect(parseDmTable('0 2048 linear 7:0 1024\n')).toEqual([
      { start: 0, length: 2048, target: 'linear', args: ['7:0', '1024'], maps: [{ dev: '7:0', kind: 'exact', offset: 1024 }] },
    ]);
    expect(parseDmTable('0 8 linear /dev/loop3 0')[0].maps).toEqual([{ dev: '/dev/loop3', kind: 'exact', offset: 0 }]);
  });

  it('several segments, blank lines and surrounding blanks', () => {
    const t = parseDmTable('\n0 100 linear 7:0 0\n  100 8 error \n108 92 linear 7:0 108\n\n');
    expect(t.map((s) => [s.start, s.length, s.target])).toEqual([[0, 100, 'linear'], [100, 8, 'error'], [108, 92, 'linear']]);
    expect(t[1].maps).toEqual([]);
    expect(t[2].maps).toEqual([{ dev: '7:0', kind: 'exact', offset: 108 }]);
  });

  it('flakey (with and without features) and delay (read, write and flush devices) map exactly', () => {
    expect(parseDmTable('0 64 flakey 7:1 16 0 1')[0].maps).toEqual([{ dev: '7:1', kind: 'exact', offset: 16 }]);
    expect(parseDmTable('0 64 flakey 7:1 16 5 1 2 drop_writes error_writes')[0].maps).toEqual([{ dev: '7:1', kind: 'exact', offset: 16 }]);
    expect(parseDmTable('0 64 delay 7:2 100 20')[0].maps).toEqual([{ dev: '7:2', kind: 'exact', offset: 100 }]);
    expect(parseDmTable('0 64 delay 7:2 100 20 7:3 0 5')[0].maps).toEqual([
      { dev: '7:2', kind: 'exact', offset: 100 }, { dev: '7:3', kind: 'exact', offset: 0 },
    ]);
    expect(parseDmTable('0 64 delay 7:2 0 0 7:3 8 0 7:4 16 1')[0].maps.map((m) => `${m.dev}@${m.offset}`)).toEqual(['7:2@0', '7:3@8', '7:4@16']);
  });

  it('log-writes: the data device at the same sector (no segment offset), the whole log device', () => {
    expect(parseDmTable('0 24576 log-writes 7:0 7:1')[0].maps).toEqual([
      { dev: '7:0', kind: 'exact', offset: 0 }, { dev: '7:1', kind: 'whole', offset: 0, log: true },
    ]);
    // a second segment at sector 1000 reads sector 1000 of the data device
    expect(parseDmTable('0 1000 zero\n1000 500 log-writes 7:0 7:1')[1].maps[0]).toEqual({ dev: '7:0', kind: 'exact', offset: 1000 });
  });

  it('error and zero map to nothing', () => {
    expect(parseDmTable('0 8 error\n8 8 zero').flatMap((s) => s.maps)).toEqual([]);
  });

  it('other targets: the whole of every device the table names', () => {
    const crypt = parseDmTable('0 4096 crypt aes-xts-plain64 :64:logon:cryptsetup:1234-0 0 8:16 4096 1 allow_discards')[0];
    expect(crypt.maps).toEqual([{ dev: '8:16', kind: 'whole', offset: 0 }]);
    const pool = parseDmTable('0 20480 thin-pool 253:0 253:1 128 0 1 skip_block_zeroing')[0];
    expect(pool.maps.map((m) => [m.dev, m.kind])).toEqual([['253:0', 'whole'], ['253:1', 'whole']]);
    expect(parseDmTable('0 100 thin 253:2 1')[0].maps).toEqual([{ dev: '253:2', kind: 'whole', offset: 0 }]);
    const striped = parseDmTable('0 2048 striped 2 64 7:0 0 7:1 0')[0];
    expect(striped.maps.map((m) => m.dev)).toEqual(['7:0', '7:1']);
    expect(parseDmTable('0 2048 raid raid1 3 0 region_size 1024 2 - 7:0 - /dev/loop1')[0].maps.map((m) => m.dev)).toEqual(['7:0', '/dev/loop1']);
    expect(parseDmTable('0 8 some-new-target 9:9 9:9 x')[0].maps).toEqual([{ dev: '9:9', kind: 'whole', offset: 0 }]);
  });

  it('a modelled target with arguments it does not expect is read conservatively', () => {
    expect(parseDmTable('0 8 linear 7:0')[0].maps).toEqual([{ dev: '7:0', kind: 'whole', offset: 0 }]);
    expect(parseDmTable('0 8 linear 7:0 x')[0].maps).toEqual([{ dev: '7:0', kind: 'whole', offset: 0 }]);
    expect(parseDmTable('0 8 linear 7:0 0 extra 7:1')[0].maps.map((m) => [m.dev, m.kind])).toEqual([['7:0', 'whole'], ['7:1', 'whole']]);
    expect(parseDmTable('0 8 delay 7:0 0 1 7:1 0')[0].maps.map((m) => m.kind)).toEqual(['whole', 'whole']);
    expect(parseDmTable('0 8 log-writes 7:0')[0].maps).toEqual([{ dev: '7:0', kind: 'whole', offset: 0 }]);
    expect(parseDmTable('0 8 flakey 7:0 0 1')[0].maps).toEqual([{ dev: '7:0', kind: 'whole', offset: 0 }]);
  });

  it('text that is not a table is a DmTableError', () => {
    for (const bad of ['linear 7:0 0', '0 linear', '0 8', 'x 8 linear 7:0 0', '0 0 linear 7:0 0', '-1 8 error', '0 8 !bad',
      'a: 0 8 linear 7:0 0', `0 ${2 ** 60} error`, '0 1.5 error', '0x10 8 error', 'No devices found']) {
      expect(() => parseDmTable(bad), bad).toThrow(DmTableError);
    }
  });
});

/** A table segment of a modelled target, and the maps it must parse to. */
const segArb = fc.oneof(
  fc.record({ target: fc.constant('linear'), dev: fc.constantFrom('7:0', '259:12', '/dev/loop9'), off: fc.nat({ max: 1 << 30 }) })
    .map(({ target, dev, off }) => ({ target, args: [dev, String(off)], maps: [{ dev, kind: 'exact', offset: off }] })),
  fc.record({ dev: fc.constantFrom('8:0', '/dev/sdb'), off: fc.nat({ max: 1 << 30 }), up: fc.nat(100), down: fc.nat(100), feats: fc.constantFrom([], ['1', 'drop_writes'], ['2', 'error_writes', 'random_read_corrupt']) })
    .map(({ dev, off, up, down, feats }) => ({ target: 'flakey', args: [dev, String(off), String(up), String(down), ...feats], maps: [{ dev, kind: 'exact', offset: off }] })),
  fc.array(fc.record({ dev: fc.constantFrom('7:1', '7:2'), off: fc.nat({ max: 1 << 20 }), ms: fc.nat(500) }), { minLength: 1, maxLength: 3 })
    .map((gs) => ({ target: 'delay', args: gs.flatMap((g) => [g.dev, String(g.off), String(g.ms)]), maps: gs.map((g) => ({ dev: g.dev, kind: 'exact', offset: g.off })) })),
  fc.constantFrom('error', 'zero').map((target) => ({ target, args: [] as string[], maps: [] as object[] })),
  fc.constant({ target: 'log-writes', args: ['7:3', '7:4'], maps: [] as object[] }), // maps depend on the start: filled below
  fc.record({ devs: fc.uniqueArray(fc.constantFrom('9:1', '9:2', '/dev/vdc'), { minLength: 1, maxLength: 3 }) })
    .map(({ devs }) => ({ target: 'crypt', args: ['aes-xts-plain64', '0', '0', ...devs.flatMap((d) => [d, '0'])], maps: devs.map((dev) => ({ dev, kind: 'whole', offset: 0 })) })),
);

describe('parseDmTable properties', () => {
  it('a generated table parses back to its segments and maps', () => {
    fc.assert(fc.property(fc.array(fc.tuple(fc.integer({ min: 1, max: 1 << 24 }), segArb), { minLength: 1, maxLength: 12 }), fc.constantFrom(' ', '  ', '\t'),
      (segs, sep) => {
        let at = 0;
        const want = segs.map(([length, s]) => {
          const start = at;
          at += length;
          const maps = s.target === 'log-writes' ? [{ dev: '7:3', kind: 'exact', offset: start }, { dev: '7:4', kind: 'whole', offset: 0, log: true }] : s.maps;
          return { start, length, target: s.target, args: s.args, maps };
        });
        const text = want.map((w) => [w.start, w.length, w.target, ...w.args].join(sep)).join('\n') + '\n';
        expect(parseDmTable(text)).toEqual(want);
      }), { seed, numRuns: 300 });
  });

  it('fuzz: random and mutated lines return segments or throw a DmTableError, nothing else', () => {
    const tokens = fc.constantFrom('0', '8', '2048', '-1', '1e3', '007', '18446744073709551616', 'linear', 'flakey', 'delay', 'log-writes', 'error', 'zero',
      'crypt', '7:0', '253:1', ':1', '7:', '/dev/loop0', '/', '-', '', '\u0000', 'é', '\r', '#');
    const lineArb = fc.oneof(
      fc.string({ unit: 'binary', maxLength: 80 }),
      fc.array(tokens, { maxLength: 10 }).chain((ts) => fc.constantFrom(' ', '\t', '  ').map((s) => ts.join(s))),
    );
    let parsed = 0;
    let refused = 0;
    fc.assert(fc.property(fc.array(lineArb, { maxLength: 6 }), (lines) => {
      const text = lines.join('\n');
      try {
        const t = parseDmTable(text);
        parsed++;
        for (const s of t) {
          expect(Number.isSafeInteger(s.start) && Number.isSafeInteger(s.length) && s.length > 0).toBe(true);
          expect(Number.isSafeInteger((s.start + s.length) * SECTOR)).toBe(true);
          for (const m of s.maps) {
            expect(['exact', 'whole']).toContain(m.kind);
            expect(Number.isSafeInteger(m.offset * SECTOR)).toBe(true);
            expect(s.args.includes(m.dev)).toBe(true);
          }
        }
      } catch (err) {
        if (!(err instanceof DmTableError)) throw err;
        refused++;
      }
    }), { seed, numRuns: 3000 });
    console.log(`dm table fuzz seed=${seed} (DMR_FUZZ_SEED=${seed} to reproduce): ${parsed} parsed, ${refused} refused`);
    expect(parsed).toBeGreaterThan(0);
    expect(refused).toBeGreaterThan(0);
  });

  it('segmentMaps never names a device the arguments do not name', () => {
    fc.assert(fc.property(fc.constantFrom('linear', 'flakey', 'delay', 'log-writes', 'error', 'zero', 'x'), fc.array(fc.constantFrom('7:0', '1', 'a', '/dev/x', '9:9'), { maxLength: 9 }), fc.nat(1000),
      (target, args, start) => {
        for (const m of segmentMaps(target, args, start)) expect(args).toContain(m.dev);
      }), { seed, numRuns: 500 });
  });
});

// ---------------------------------------------------------------- the walk, on a sysfs tree

interface FakeDev { name: string; devNo: string; sectors: number; dm?: string; loopFile?: string; md?: string[]; partOf?: string; partStart?: number }

/** Builds the sysfs layout the walk reads under `root`. */
function fakeSysfs(root: string, devs: FakeDev[]): void {
  mkdirSync(join(root, 'dev/block'), { recursive: true });
  const dirOf = (d: FakeDev): string => d.partOf !== undefined ? join(root, 'devices/virtual/block', d.partOf, d.name) : join(root, 'devices/virtual/block', d.name);
  for (const d of devs) {
    const dir = dirOf(d);
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, 'dev'), `${d.devNo}\n`);
    writeFileSync(join(dir, 'size'), `${d.sectors}\n`);
    if (d.dm !== undefined) {
      mkdirSync(join(dir, 'dm'));
      writeFileSync(join(dir, 'dm/name'), `${d.dm}\n`);
    }
    if (d.loopFile !== undefined) {
      mkdirSync(join(dir, 'loop'));
      writeFileSync(join(dir, 'loop/backing_file'), `${d.loopFile}\n`);
      writeFileSync(join(dir, 'loop/offset'), '0\n');
    }
    if (d.partOf !== undefined) {
      writeFileSync(join(dir, 'partition'), '1\n');
      writeFileSync(join(dir, 'start'), `${d.partStart ?? 0}\n`);
    }
    symlinkSync(dir, join(root, 'dev/block', d.devNo));
  }
  for (const d of devs) {
    if (d.md === undefined) continue;
    mkdirSync(join(dirOf(d), 'md'));
    mkdirSync(join(dirOf(d), 'slaves'));
    for (const s of d.md) symlinkSync(dirOf(devs.find((x) => x.name === s) as FakeDev), join(dirOf(d), 'slaves', s));
  }
}

describe('the walk down a dm/md stack (sysfs tree in a temp folder)', () => {
  let dir: string;
  let root: string;
  let image: string;
  const tables = new Map<string, string>();
  let reads = 0;
  const opts = (): StackOptions => ({
    sysRoot: root,
    readDmTable: (major, minor) => { reads++; return tables.get(`${major}:${minor}`) ?? null; },
  });
  const LOOP = 8192; // sectors of loop0 (4 MiB)
  /** Loads the table of dm device 253:N and returns its layers. */
  const dm = (n: number, table: string): ReturnType<typeof deviceLayers> => {
    tables.set(`253:${n}`, table);
    return deviceLayers(`253:${n}`, opts());
  };

  beforeAll(() => {
    dir = tempDir('dmr-dmstack-');
    root = join(dir, 'sys');
    image = join(dir, 'disk.img');
    writeFileSync(image, Buffer.alloc(0));
    fakeSysfs(root, [
      { name: 'loop0', devNo: '7:0', sectors: LOOP, loopFile: image },
      { name: 'loop1', devNo: '7:1', sectors: 2048 },
      { name: 'loop2', devNo: '7:2', sectors: LOOP },
      { name: 'loop2p1', devNo: '259:0', sectors: 4096, partOf: 'loop2', partStart: 2048 },
      ...Array.from({ length: 8 }, (_, i) => ({ name: `dm-${i}`, devNo: `253:${i}`, sectors: LOOP, dm: `d${i}` })),
      { name: 'md0', devNo: '9:0', sectors: 2048, md: ['loop1'] },
    ]);
  });
  afterAll(() => {
    if (dir !== undefined) cleanup(dir);
  });

  it('two dm-linear devices over overlapping parts of one loop device: the loop device and both ranges', () => {
    const a = dm(0, '0 2048 linear 7:0 0');
    const b = dm(1, '0 2048 linear 7:0 1024');
    expect(a.map((l) => l.what)).toEqual(['/dev/mapper/d0', '/dev/loop0', image]);
    expect(a[1]).toMatchObject({ key: 'block:7:0', start: 0, end: 2048 * SECTOR });
    expect(a[2]).toMatchObject({ key: `file:${statSync(image).dev}:${statSync(image).ino}`, start: 0, end: 2048 * SECTOR });
    expect(layersOverlap(a, b)).toEqual({ layer: '/dev/loop0', a: [0, 2048 * SECTOR], b: [1024 * SECTOR, 3072 * SECTOR], sameDevice: false });
  });

  it('disjoint dm-linear ranges of one loop device do not overlap; adjacent ones neither', () => {
    expect(layersOverlap(dm(0, '0 2048 linear 7:0 0'), dm(1, '0 2048 linear 7:0 2048'))).toBeNull();
    expect(layersOverlap(dm(0, '0 2048 linear 7:0 4096'), dm(1, '0 2048 linear 7:0 0'))).toBeNull();
  });

  it('delay and flakey over an overlapping part are caught', () => {
    const a = dm(0, '0 2048 linear 7:0 0');
    expect(layersOverlap(a, dm(1, '0 1024 delay 7:0 2000 0'))).toMatchObject({ layer: '/dev/loop0', b: [2000 * SECTOR, 3024 * SECTOR] });
    expect(layersOverlap(a, dm(1, '0 1024 flakey 7:0 1500 5 0'))).toMatchObject({ layer: '/dev/loop0', b: [1500 * SECTOR, 2524 * SECTOR] });
    expect(layersOverlap(a, dm(1, '0 1024 delay 7:0 2048 0'))).toBeNull();
    // delay's write device is where the writes land
    expect(layersOverlap(a, dm(1, '0 1024 delay 7:0 4096 0 7:0 0 0'))).toMatchObject({ layer: '/dev/loop0', b: [0, 1024 * SECTOR] });
  });

  it('a path argument resolves to the device it names', () => {
    const a = dm(0, '0 2048 linear 7:0 0');
    expect(layersOverlap(a, dm(1, '0 8 linear /dev/loop0 100'))).toMatchObject({ layer: '/dev/loop0', b: [100 * SECTOR, 108 * SECTOR] });
  });

  it('multi-segment: only the segments the range covers, each mapped at its own offset', () => {
    // d2: sectors 0..1000 -> loop0 5000.., 1000..1008 error, 1008..2048 -> loop0 0..
    const m = dm(2, '0 1000 linear 7:0 5000\n1000 8 error\n1008 1040 linear 7:0 0');
    expect(m.filter((l) => l.key === 'block:7:0').map((l) => [l.start / SECTOR, l.end / SECTOR])).toEqual([[5000, 6000], [0, 1040]]);
    expect(layersOverlap(m, dm(3, '0 100 linear 7:0 6000'))).toBeNull();
    expect(layersOverlap(m, dm(3, '0 100 linear 7:0 1000'))).toMatchObject({ layer: '/dev/loop0', a: [0, 1040 * SECTOR], b: [1000 * SECTOR, 1100 * SECTOR] });
  });

  it('two levels: dm over dm over a partition of a loop device', () => {
    tables.set('253:4', '0 4096 linear 259:0 0'); // d4 = all of loop2p1 (loop2 sectors 2048..6144)
    const a = dm(5, '0 100 linear 253:4 10'); // loop2 sectors 2058..2158
    expect(a.map((l) => l.what)).toEqual(['/dev/mapper/d5', '/dev/mapper/d4', '/dev/loop2p1', '/dev/loop2']);
    expect(a[3]).toMatchObject({ start: 2058 * SECTOR, end: 2158 * SECTOR });
    expect(layersOverlap(a, dm(6, '0 8 linear 7:2 2157'))).toMatchObject({ layer: '/dev/loop2', b: [2157 * SECTOR, 2165 * SECTOR] });
    expect(layersOverlap(a, dm(6, '0 8 linear 7:2 2158'))).toBeNull();
  });

  it('main and spare as disjoint segments of one log-writes device are accepted; a path onto its log device is not', () => {
    // d4 = log-writes over data loop0 and log loop1, as tests/vm/guest-crash.sh builds it
    tables.set('253:4', '0 8192 log-writes 7:0 7:1');
    const main = dm(5, '0 100 linear 253:4 0\n100 8 error\n108 916 linear 253:4 108');
    const spare = dm(6, '0 2048 linear 253:4 1024');
    expect(main.filter((l) => l.key === 'block:7:1')).toEqual([{ key: 'block:7:1', what: '/dev/loop1', start: 0, end: 2048 * SECTOR, via: 'block:253:4' }]);
    expect(layersOverlap(main, spare)).toBeNull();
    expect(layersOverlap(main, dm(7, '0 8 linear 253:4 1020'))).toMatchObject({ layer: '/dev/mapper/d4' });
    // anything else on the log device is refused, both ways round
    const onLog = dm(7, '0 8 linear 7:1 2000');
    expect(layersOverlap(main, onLog)).toMatchObject({ layer: '/dev/loop1', a: [0, 2048 * SECTOR], b: [2000 * SECTOR, 2008 * SECTOR] });
    expect(layersOverlap(onLog, spare)).toMatchObject({ layer: '/dev/loop1' });
  });

  it('a target it does not model counts as the whole of its devices; md as the whole of its slaves', () => {
    const a = dm(0, '0 8 linear 7:0 8000');
    expect(layersOverlap(a, dm(1, '0 100 crypt aes-xts-plain64 :64:logon:k 0 7:0 0'))).toMatchObject({ layer: '/dev/loop0', b: [0, LOOP * SECTOR] });
    const md = deviceLayers('9:0', opts());
    expect(md.map((l) => l.what)).toEqual(['/dev/md0', '/dev/loop1']);
    expect(layersOverlap(md, dm(1, '0 8 linear 7:1 2040'))).toMatchObject({ layer: '/dev/loop1', a: [0, 2048 * SECTOR] });
  });

  it('a table that cannot be read or parsed: that device is not descended (as before), nothing thrown', () => {
    tables.delete('253:1');
    const a = dm(0, '0 2048 linear 7:0 0');
    expect(deviceLayers('253:1', opts()).map((l) => l.what)).toEqual(['/dev/mapper/d1']);
    expect(layersOverlap(a, deviceLayers('253:1', opts()))).toBeNull();
    expect(dm(1, 'd1: 0 2048 linear 7:0 0').map((l) => l.what)).toEqual(['/dev/mapper/d1']);
    // a device the table names that does not exist is skipped, the others still followed
    expect(dm(1, '0 8 linear 7:99 0\n8 8 linear 7:0 0').map((l) => l.what)).toEqual(['/dev/mapper/d1', '/dev/loop0', image]);
  });

  it('each table is read once per walk, however many segments lead to it', () => {
    tables.set('253:4', '0 8192 log-writes 7:0 7:1');
    const segs = Array.from({ length: 50 }, (_, i) => `${i * 16} 8 linear 253:4 ${i * 16}\n${i * 16 + 8} 8 error`).join('\n');
    reads = 0;
    const m = dm(5, segs);
    expect(reads).toBe(2);
    expect(m.filter((l) => l.key === 'block:7:1')).toHaveLength(1);
    expect(m.filter((l) => l.key === 'block:7:0')).toHaveLength(50);
  });

  it('property: two random linear/error tables over loop0 overlap exactly when they share a loop0 sector', () => {
    const seg = fc.record({ len: fc.integer({ min: 1, max: 600 }), kind: fc.constantFrom('linear', 'linear', 'error'), off: fc.nat(LOOP - 600) });
    fc.assert(fc.property(fc.array(seg, { minLength: 1, maxLength: 5 }), fc.array(seg, { minLength: 1, maxLength: 5 }), (sa, sb) => {
      const table = (ss: typeof sa): string => {
        let at = 0;
        return ss.map((s) => { const l = `${at} ${s.len} ${s.kind}${s.kind === 'linear' ? ` 7:0 ${s.off}` : ''}`; at += s.len; return l; }).join('\n');
      };
      const used = (ss: typeof sa): Set<number> => new Set(ss.flatMap((s) => s.kind === 'linear' ? Array.from({ length: s.len }, (_, i) => s.off + i) : []));
      const ua = used(sa);
      const shared = [...used(sb)].some((x) => ua.has(x));
      const c = layersOverlap(dm(0, table(sa)), dm(1, table(sb)));
      expect(c !== null).toBe(shared);
      if (c !== null) {
        expect(c.layer).toBe('/dev/loop0');
        expect(c.a[0] < c.b[1] && c.b[0] < c.a[1]).toBe(true);
      }
    }), { seed, numRuns: 300 });
  });
});
