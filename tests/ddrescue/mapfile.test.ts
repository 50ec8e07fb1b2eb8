/**
 * The GNU ddrescue mapfile codec (src/cli/ddrescue-map.ts): real mapfile
 * shapes, every error names its line, property tests (write -> parse round
 * trip, device areas cover the device exactly) and a seeded fuzz of broken
 * and random input (only MapfileError, never another exception).
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  MapfileError, blocksOfArea, compactAreas, deviceAreas, formatMapfile, mergeBlockRanges, parseMapfile, rangesOfBlocks,
  type AreaStatus, type MapArea, type Mapfile, type PassStatus,
} from '../../src/cli/ddrescue-map.js';
import { Rng } from '../fuzz/rng.js';

const DDRESCUE_127 = `# Mapfile. Created by GNU ddrescue version 1.27
# Command line: ddrescue -d /dev/sdb disk.img disk.map
# Start time:   2024-01-01 10:00:00
# Current time: 2024-01-01 10:05:00
# Finished
# current_pos  current_status  current_pass
0x00A00000     +               1
#      pos        size  status
0x00000000  0x00005000  +
0x00005000  0x00001000  -
0x00006000  0x00002000  /
0x00008000  0x00000200  *
0x00008200  0x00007E00  ?
0x00010000  0x009F0000  +
`;

function strip(m: Mapfile): Mapfile {
  return { ...m, areas: m.areas.map(({ pos, size, status }) => ({ pos, size, status })) };
}

function errorOf(text: string): MapfileError {
  try {
    parseMapfile(text);
  } catch (err) {
    if (err instanceof MapfileError) return err;
    throw err;
  }
  throw new Error(`parsed without error: ${JSON.stringify(text)}`);
}

describe('ddrescue mapfile parser', () => {
  it('reads a mapfile as ddrescue 1.27 writes it, with line numbers', () => {
    const m = parseMapfile(DDRESCUE_127);
    expect(m.currentPos).toBe(0xa00000);
    expect(m.currentStatus).toBe('+');
    expect(m.currentPass).toBe(1);
    expect(m.areas.map((a) => [a.pos, a.size, a.status, a.line])).toEqual([
      [0, 0x5000, '+', 9], [0x5000, 0x1000, '-', 10], [0x6000, 0x2000, '/', 11], [0x8000, 0x200, '*', 12], [0x8200, 0x7e00, '?', 13], [0x10000, 0x9f0000, '+', 14],
    ]);
  });

  it('reads old mapfiles (no pass), decimal and octal numbers, CRLF, tabs and trailing comments', () => {
    const m = parseMapfile('# old\r\n0 ?\r\n0\t4096\t+  # first\r\n4096 010000 -\r\n0x2000 512 + #x\r\n\r\n');
    expect(m.currentPass).toBeUndefined();
    expect(m.currentStatus).toBe('?');
    expect(strip(m).areas).toEqual([{ pos: 0, size: 4096, status: '+' }, { pos: 4096, size: 4096, status: '-' }, { pos: 0x2000, size: 512, status: '+' }]);
    // '#' not after whitespace is not a comment start: it is a bad status.
    expect(errorOf('0 +\n0 512 +#\n').message).toBe('line 2: unknown block status "+#" (one of ? * / - +)');
  });

  it('a status line alone is a valid (empty) map', () => {
    expect(parseMapfile('0x0 ? 1\n').areas).toEqual([]);
  });

  it.each([
    ['', 'no status line: the mapfile is empty or holds only comments'],
    ['# only\n# comments\n', 'no status line: the mapfile is empty or holds only comments'],
    ['0x0\n', 'line 1: status line must be "POSITION STATUS [PASS]", got 1 field(s): "0x0"'],
    ['0 X 1\n', 'line 1: status line: unknown status "X" (one of ? * / - F G +)'],
    ['0 + 0\n', 'line 1: status line: pass "0" is not a positive decimal integer'],
    ['-1 + 1\n', 'line 1: status line position "-1" is not a non-negative integer (decimal, 0x hex or 0 octal)'],
    ['0 + 1\n0 512\n', 'line 2: data block line must be "POSITION SIZE STATUS", got 2 field(s): "0 512"'],
    ['0 + 1\n0 512 + extra\n', 'line 2: data block line must be "POSITION SIZE STATUS", got 4 field(s): "0 512 + extra"'],
    ['0 + 1\n0 512 F\n', 'line 2: unknown block status "F" (one of ? * / - +)'],
    ['0 + 1\n0 0 +\n', 'line 2: block size is 0'],
    ['0 + 1\n0 0x1g +\n', 'line 2: size "0x1g" is not a non-negative integer (decimal, 0x hex or 0 octal)'],
    ['0 + 1\n0 09 +\n', 'line 2: size "09" is not a non-negative integer (decimal, 0x hex or 0 octal)'],
    ['0 + 1\n0 1.5 +\n', 'line 2: size "1.5" is not a non-negative integer (decimal, 0x hex or 0 octal)'],
    ['0 + 1\n0x20000000000000 1 +\n', 'line 2: position "0x20000000000000" is too large (over 2^53 - 1)'],
    ['0 + 1\n0x1FFFFFFFFFFFFF 1 +\n', 'line 2: block ends past 2^53 - 1 (position 9007199254740991, size 1)'],
    ['0 + 1\n0 512 +\n1024 512 -\n', 'line 3: block at 1024 leaves a gap after the previous block, which ends at 512'],
    ['0 + 1\n# c\n0 512 +\n256 512 -\n', 'line 4: block at 256 overlaps the previous block, which ends at 512'],
    ['0 + 1\n0 512 \u0000+\n', 'line 2: unexpected control character 0x00'],
  ])('refuses %j: %s', (text, message) => {
    const e = errorOf(text);
    expect(e.message).toBe(message);
  });
});

describe('ddrescue mapfile writer and conversions', () => {
  it('device areas: bad blocks as "-", the rest "+", merged, covering the whole device (a partial last block included)', () => {
    const size = 10 * 4096 + 512;
    expect(deviceAreas(size, 4096, [[2, 1], [3, 2], [7, 1], [9, 1]])).toEqual([
      { pos: 0, size: 8192, status: '+' }, { pos: 8192, size: 12288, status: '-' }, { pos: 20480, size: 8192, status: '+' },
      { pos: 28672, size: 4096, status: '-' }, { pos: 32768, size: 4096, status: '+' }, { pos: 36864, size: 4096, status: '-' },
      { pos: 40960, size: 512, status: '+' },
    ]);
    expect(deviceAreas(8192, 4096, [])).toEqual([{ pos: 0, size: 8192, status: '+' }]);
    expect(deviceAreas(8192, 4096, [[0, 2]])).toEqual([{ pos: 0, size: 8192, status: '-' }]);
  });

  it('blocks touched by an area include partial blocks at both ends', () => {
    expect(blocksOfArea({ pos: 4095, size: 2, status: '-' }, 4096)).toEqual([0, 2]);
    expect(blocksOfArea({ pos: 4096, size: 4096, status: '-' }, 4096)).toEqual([1, 1]);
    expect(blocksOfArea({ pos: 512, size: 512, status: '-' }, 4096)).toEqual([0, 1]);
    expect(mergeBlockRanges([[5, 2], [0, 1], [6, 3], [1, 1], [20, 1]])).toEqual([[0, 2], [5, 4], [20, 1]]);
    expect(rangesOfBlocks([1, 2, 3, 7, 9, 10])).toEqual([[1, 3], [7, 1], [9, 2]]);
  });

  it('writes what ddrescue writes: comments, status line, hex areas', () => {
    const text = formatMapfile({ currentPos: 0, currentStatus: '+', currentPass: 1, areas: [{ pos: 0, size: 0x5000, status: '+' }, { pos: 0x5000, size: 0x1000, status: '-' }] },
      ['Mapfile. test']);
    expect(text).toBe('# Mapfile. test\n# current_pos  current_status  current_pass\n0x00000000     +               1\n#      pos        size  status\n'
      + '0x00000000  0x00005000  +\n0x00005000  0x00001000  -\n');
  });
});

const areaStatus = fc.constantFrom<AreaStatus>('?', '*', '/', '-', '+');
const passStatus = fc.constantFrom<PassStatus>('?', '*', '/', '-', 'F', 'G', '+');
const mapfileArb = fc.record({
  currentPos: fc.maxSafeNat(),
  currentStatus: passStatus,
  currentPass: fc.option(fc.integer({ min: 1, max: 1_000_000 }), { nil: undefined }),
  start: fc.integer({ min: 0, max: 2 ** 40 }),
  parts: fc.array(fc.tuple(fc.integer({ min: 1, max: 2 ** 36 }), areaStatus), { maxLength: 60 }),
}).map((r): Mapfile => {
  let pos = r.start;
  const areas: MapArea[] = r.parts.map(([size, status]) => {
    const a = { pos, size, status };
    pos += size;
    return a;
  });
  const m: Mapfile = { currentPos: r.currentPos, currentStatus: r.currentStatus, areas };
  if (r.currentPass !== undefined) m.currentPass = r.currentPass;
  return m;
});

describe('ddrescue mapfile properties', () => {
  it('parse(format(m)) == m, with any heading comments', () => {
    fc.assert(fc.property(mapfileArb, fc.array(fc.string({ maxLength: 30 }), { maxLength: 4 }), (m, comments) => {
      expect(strip(parseMapfile(formatMapfile(m, comments)))).toEqual(m);
    }), { numRuns: 300 });
  });

  it('device areas cover [0, size) contiguously, alternate status, and their "-" blocks are exactly the given blocks', () => {
    fc.assert(fc.property(fc.constantFrom(512, 4096), fc.integer({ min: 1, max: 3000 }), fc.integer({ min: 0, max: 4095 }),
      fc.array(fc.tuple(fc.nat(3000), fc.integer({ min: 1, max: 20 })), { maxLength: 40 }), (bs, blocks, tail, ranges) => {
        const size = blocks * bs + (tail % bs);
        const bad = ranges.map(([f, c]): [number, number] => [Math.min(f, blocks - 1), Math.min(c, blocks - Math.min(f, blocks - 1))]);
        const areas = deviceAreas(size, bs, bad);
        let at = 0;
        for (let i = 0; i < areas.length; i++) {
          expect(areas[i].pos).toBe(at);
          expect(areas[i].size).toBeGreaterThan(0);
          if (i > 0) expect(areas[i].status).not.toBe(areas[i - 1].status);
          at += areas[i].size;
        }
        expect(at).toBe(size);
        expect(compactAreas(areas)).toEqual(areas);
        const want = new Set<number>();
        for (const [f, c] of bad) for (let b = f; b < f + c; b++) want.add(b);
        const got = new Set<number>();
        for (const a of areas.filter((x) => x.status === '-')) {
          const [f, c] = blocksOfArea(a, bs);
          for (let b = f; b < f + c; b++) got.add(b);
        }
        expect([...got].sort((x, y) => x - y)).toEqual([...want].sort((x, y) => x - y));
        // What was written parses back to the same areas.
        expect(strip(parseMapfile(formatMapfile({ currentPos: 0, currentStatus: '+', currentPass: 1, areas }))).areas).toEqual(areas);
      }), { numRuns: 300 });
  });
});

describe('ddrescue mapfile fuzz', () => {
  const seed = Number(process.env.DMR_FUZZ_SEED ?? 6006);

  function expectCleanOutcome(text: string): void {
    try {
      const m = parseMapfile(text);
      // Whatever parses is well formed.
      for (let i = 1; i < m.areas.length; i++) expect(m.areas[i].pos).toBe(m.areas[i - 1].pos + m.areas[i - 1].size);
      for (const a of m.areas) expect(Number.isSafeInteger(a.pos + a.size) && a.size > 0).toBe(true);
    } catch (err) {
      if (!(err instanceof MapfileError)) throw new Error(`not a MapfileError for ${JSON.stringify(text.slice(0, 200))}: ${String(err)}`);
      expect(err.message).toMatch(/^(line \d+: .+|no status line: .+|mapfile is larger .+)$/);
      if (err.line > 0) expect(err.line).toBeLessThanOrEqual(text.split('\n').length);
    }
  }

  it('random bytes and random tokens: a MapfileError naming the line, or a well-formed map', () => {
    const r = new Rng(seed);
    const TOKENS = ['0', '0x0', '0x1000', '512', '-1', '+', '-', '*', '/', '?', 'F', 'G', '#', '# c', '0x', '00', '08', '1e3', '99999999999999999999', '0x1FFFFFFFFFFFFF',
      '\t', ' ', '\r', '\n', '\u0000', 'ü', '🙂', '1', '4096'];
    for (let run = 0; run < 3000; run++) {
      let text = '';
      if (r.chance(0.3)) {
        const n = r.int(200);
        for (let i = 0; i < n; i++) text += String.fromCharCode(r.int(256));
      } else {
        const n = r.int(60);
        for (let i = 0; i < n; i++) text += r.pick(TOKENS) + (r.chance(0.5) ? ' ' : '');
      }
      expectCleanOutcome(text);
    }
  });

  it('mutations of a valid mapfile: a MapfileError naming the line, or a well-formed map', () => {
    const r = new Rng(seed + 1);
    for (let run = 0; run < 2000; run++) {
      const chars = [...DDRESCUE_127];
      for (let k = 1 + r.int(4); k > 0; k--) {
        const at = r.int(chars.length);
        const op = r.int(3);
        if (op === 0) chars.splice(at, 1);
        else if (op === 1) chars.splice(at, 0, r.pick(['\n', ' ', '0', 'x', 'F', '-', '+', '#', '\t', '9']));
        else chars[at] = r.pick(['\n', ' ', '0', 'x', 'F', '-', '+', '#', '\t', '9', 'A']);
      }
      expectCleanOutcome(chars.join(''));
    }
  });
});
