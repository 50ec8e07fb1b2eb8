/**
 * Metadata corruption matrix (issue 5), through the real CLI and a real
 * reopen: a spare with a checkpoint plus journal commits and live remaps is
 * damaged one copy at a time (random superblock, zeroed superblock, random
 * checkpoint slots, random journal, file truncated so copy 1 is gone, copy
 * replaced by an older image of itself). Each time `remapctl inspect` must
 * exit 0 and name the bad copy, and openEngine must bring back every remap
 * with its data. Damage to every copy must be refused by inspect and by the
 * daemon's add with exit 7 (metadata refused) and a clear message.
 * Prints the matrix.
 */
import { copyFileSync, readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openEngine } from '../../src/engine/open.js';
import type { BlockEngine } from '../../src/engine/engine.js';
import type { InspectReport } from '../../src/cli/inspect.js';
import { BS, pattern, readBack, sparseFile, tempDir } from '../engine/fixtures.js';
import { ctl, startDaemon, requireBuild, type Daemon } from '../daemon/helpers.js';

const td = tempDir('corrupt');
const MAIN_BYTES = 16 << 20;
const SPARE_BYTES = 4 << 20;
const FIRST = [3, 5, 7];
const LATER = Array.from({ length: 20 }, (_, i) => 10 + 2 * i);
const ALL = [...FIRST, ...LATER];
const mainPath = join(td.dir, 'main.img');
const finalImg = join(td.dir, 'final.img');
const olderImg = join(td.dir, 'older.img');
let d: Daemon | undefined;
let layout: { copies: Array<{ superblock: number; checkpointSlots: [number, number]; journal: number; start: number; end: number }>; journalBlocks: number; checkpointBlocks: number };
/** logical -> spare block in the final image. */
const expectedMap = new Map<number, number>();
const matrix: Array<{ kase: string; inspect: string; reopen: string }> = [];
let caseNo = 0;

async function open(spare: string, format = false): Promise<BlockEngine> {
  return openEngine({ name: 'cm', mainPath, sparePath: spare, format, journalBytes: 64 * 1024, metadataTimeoutMs: 3000 });
}

async function inspectJson(path: string): Promise<{ code: number | null; r: InspectReport; stdout: string; stderr: string }> {
  const j = await ctl(null, '--json', 'inspect', path);
  return { code: j.code, r: JSON.parse(j.stdout) as InspectReport, stdout: j.stdout, stderr: j.stderr };
}

function patch(path: string, offset: number, data: Uint8Array): void {
  const buf = readFileSync(path);
  buf.set(data, offset);
  writeFileSync(path, buf);
}

function freshCopy(): string {
  const p = join(td.dir, `case-${caseNo++}.img`);
  copyFileSync(finalImg, p);
  return p;
}

/** Damages one copy of a fresh image of the final spare; returns the path. */
function damage(kind: string, c: 0 | 1): string {
  const p = freshCopy();
  const L = layout.copies[c];
  switch (kind) {
    case 'superblock random':
      patch(p, L.superblock, randomBytes(4096));
      break;
    case 'superblock zeroed':
      patch(p, L.superblock, new Uint8Array(4096));
      break;
    case 'checkpoints random':
      patch(p, L.checkpointSlots[0], randomBytes(layout.checkpointBlocks * 4096));
      patch(p, L.checkpointSlots[1], randomBytes(layout.checkpointBlocks * 4096));
      break;
    case 'journal random':
      patch(p, L.journal, randomBytes(layout.journalBlocks * 4096));
      break;
    case 'truncated':
      truncateSync(p, L.start);
      break;
    case 'older sequence': {
      const old = readFileSync(olderImg);
      patch(p, L.start, old.subarray(L.start, L.end));
      break;
    }
    default:
      throw new Error(kind);
  }
  return p;
}

beforeAll(async () => {
  requireBuild();
  sparseFile(mainPath, MAIN_BYTES);
  const spare = sparseFile(join(td.dir, 'spare.img'), SPARE_BYTES);
  let e = await open(spare, true);
  await e.submit({ op: 'write', offset: 0, length: 64 * BS, buffer: pattern(64, 1) });
  for (const b of FIRST) expect((await e.remapBlocks([b]))[0].result).toBe('remapped');
  await e.close();
  copyFileSync(spare, olderImg);
  e = await open(spare);
  for (const b of LATER) expect((await e.remapBlocks([b]))[0].result).toBe('remapped');
  // New data after the remap lives only on the spare: a lost remap reads the old main data.
  for (const b of ALL) await e.submit({ op: 'write', offset: b * BS, length: BS, buffer: pattern(1, 1000 + b) });
  for (const b of ALL) expectedMap.set(b, e.lookup(b));
  await e.close();
  copyFileSync(spare, finalImg);
  const base = await inspectJson(finalImg);
  expect(base.code).toBe(0);
  expect(base.r.counts?.remapped).toBe(ALL.length);
  // The baseline must exercise both a checkpoint and journal replay.
  expect(base.r.checkpoint?.seq ?? 0).toBeGreaterThan(0);
  expect(base.r.journal?.replayedCommits ?? 0).toBeGreaterThan(0);
  expect(base.r.problems).toEqual([]);
  layout = base.r.layout as unknown as typeof layout;
  console.log(`corruption matrix baseline: ${ALL.length} remaps, seq ${base.r.seq}, checkpoint seq ${base.r.checkpoint?.seq} (slot ${base.r.checkpoint?.slot}), ${base.r.journal?.replayedCommits} journal commits replayed`);
});

afterAll(async () => {
  if (d !== undefined) await d.stop();
  console.log(`\nmetadata corruption matrix (${matrix.length} cases):\n${matrix.map((m) => `  ${m.kase.padEnd(34)} inspect: ${m.inspect.padEnd(48)} reopen: ${m.reopen}`).join('\n')}\n`);
  td.cleanup();
});

async function verifyReopen(spare: string): Promise<string> {
  const e = await open(spare);
  try {
    expect(e.status().remappedBlocks).toBe(ALL.length);
    for (const b of ALL) expect(e.lookup(b), `block ${b}`).toBe(expectedMap.get(b));
    for (const b of ALL) expect((await readBack(e, b * BS, BS)).equals(pattern(1, 1000 + b)), `data of block ${b}`).toBe(true);
  } finally {
    await e.close();
  }
  // The reopened (and now written) spare still inspects clean enough to load.
  const again = await inspectJson(spare);
  expect(again.code).toBe(0);
  return `ok, ${ALL.length}/${ALL.length} remaps + data`;
}

describe('one copy damaged: recovered', () => {
  const kinds = ['superblock random', 'superblock zeroed', 'checkpoints random', 'journal random', 'older sequence', 'truncated'];
  for (const c of [0, 1] as const) {
    for (const kind of kinds) {
      if (kind === 'truncated' && c === 0) continue; // truncation can only lose the copy at the end
      it(`copy ${c}: ${kind}`, async () => {
        const p = damage(kind, c);
        const { code, r, stderr } = await inspectJson(p);
        expect(code, stderr).toBe(0);
        expect(r.ok).toBe(true);
        expect(r.counts?.remapped).toBe(ALL.length);
        expect(r.copies[c].valid).toBe(false);
        expect(r.copies[1 - c].valid).toBe(true);
        expect(r.problems.length).toBeGreaterThan(0);
        expect(r.problems.every((s) => s.startsWith(`copy ${c}:`) || s.startsWith(`copy ${c} `))).toBe(true);
        const text = await ctl(null, 'inspect', p);
        expect(text.code).toBe(0);
        expect(text.stdout).toMatch(new RegExp(`copy ${c}: +BAD`));
        expect(text.stdout).toMatch(new RegExp(`copy ${1 - c}: +valid`));
        expect(text.stdout).toMatch(/recovered from the good copy/);
        const bad = r.copies[c].structures.filter((s) => (!s.valid || s.reason !== undefined) && !(s.reason ?? '').startsWith('superseded')).map((s) => s.structure);
        const reopen = await verifyReopen(p);
        matrix.push({ kase: `copy ${c}: ${kind}`, inspect: `exit 0, copy ${c} BAD (${[...new Set(bad)].join(', ') || 'stale'})`, reopen });
      });
    }
  }
});

describe('every copy damaged: refused with exit 7', () => {
  const cases: Array<{ name: string; make: () => string; msg: RegExp }> = [
    {
      name: 'both superblocks random',
      make: () => { const p = freshCopy(); patch(p, layout.copies[0].superblock, randomBytes(4096)); patch(p, layout.copies[1].superblock, randomBytes(4096)); return p; },
      msg: /corrupt in every copy/,
    },
    {
      name: 'both superblocks zeroed',
      make: () => { const p = freshCopy(); patch(p, layout.copies[0].superblock, new Uint8Array(4096)); patch(p, layout.copies[1].superblock, new Uint8Array(4096)); return p; },
      msg: /corrupt in every copy/,
    },
    {
      name: 'all checkpoint slots random',
      make: () => {
        const p = freshCopy();
        for (const c of [0, 1]) for (const s of [0, 1]) patch(p, layout.copies[c].checkpointSlots[s], randomBytes(layout.checkpointBlocks * 4096));
        return p;
      },
      msg: /no valid checkpoint in any copy/,
    },
    {
      name: 'copy 0 superblock zeroed + truncated',
      make: () => { const p = freshCopy(); patch(p, layout.copies[0].superblock, new Uint8Array(4096)); truncateSync(p, layout.copies[1].start); return p; },
      msg: /corrupt in every copy/,
    },
  ];
  beforeAll(async () => {
    d = await startDaemon(join(td.dir));
  });
  for (const k of cases) {
    it(k.name, async () => {
      const p = k.make();
      const { code, r, stderr } = await inspectJson(p);
      expect(code).toBe(7);
      expect(r.ok).toBe(false);
      expect(r.error?.errnoName).toBe('EBADMSG');
      expect(stderr).toMatch(k.msg);
      const text = await ctl(null, 'inspect', p);
      expect(text.code).toBe(7);
      expect(text.stdout).toMatch(/metadata: +NOT USABLE: /);
      await expect(open(p)).rejects.toThrow(k.msg);
      const add = await ctl((d as Daemon).sock, '--json', 'add', `x${caseNo}`, '--main', mainPath, '--spare', p);
      expect(add.code, add.stdout + add.stderr).toBe(7);
      const body = JSON.parse(add.stdout) as { ok: boolean; error: { code: string; message: string } };
      expect(body.error.code).toBe('CORRUPT_METADATA');
      expect(body.error.message).toMatch(k.msg);
      // Never silently formatted: --format does not overwrite damaged metadata either.
      const fmt = await ctl((d as Daemon).sock, 'add', `y${caseNo}`, '--main', mainPath, '--spare', p, '--format');
      expect(fmt.code).toBe(7);
      matrix.push({ kase: `ALL: ${k.name}`, inspect: `exit 7 (${r.error?.errnoName})`, reopen: `add exit 7 CORRUPT_METADATA: ${body.error.message.slice(0, 90)}` });
    });
  }

  it('a one-copy-damaged spare is reopened by the daemon too', async () => {
    const p = damage('superblock random', 0);
    const add = await ctl((d as Daemon).sock, '--json', 'add', 'ok0', '--main', mainPath, '--spare', p);
    expect(add.code, add.stdout + add.stderr).toBe(0);
    expect(JSON.parse(add.stdout)).toMatchObject({ remappedBlocks: ALL.length, state: 'running' });
    const rm = await ctl((d as Daemon).sock, 'remove', 'ok0');
    expect(rm.code).toBe(0);
    matrix.push({ kase: 'daemon add, copy 0 superblock random', inspect: '-', reopen: `add exit 0, ${ALL.length} remaps` });
  });
});
