// The fault disk's volatile write cache (volatileCache: true): what reaches
// the nbdkit plugin as FLUSH (or FUA) through nbdfuse, and what a power cut
// (powerCut()) keeps. Driven by real O_DIRECT writes from python: plain
// pwrite, then fdatasync, fsync, RWF_DSYNC and O_DSYNC, the calls the
// engine uses (fdatasync for FLUSH and remaps, RWF_DSYNC for FUA).
import { readFileSync } from 'node:fs';
import * as fs from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  cleanupAll,
  makeTempDir,
  requireTools,
  runCommand,
  startFaultDisk,
  SYSTEM_PYTHON,
  type FaultDisk,
} from '../helpers/faultdisk.js';
import { allocAligned, BackingDevice, BackingOp, IO_FUA } from '../../src/native/backing.js';
import { dsyncUnreliable, withReliableFua } from '../../src/engine/fua-emulation.js';

requireTools('nbdkit', 'nbdfuse', 'fusermount3', 'nbdkit-python', '/dev/fuse', SYSTEM_PYTHON);

const BS = 4096;
const MiB = 1024 * 1024;

// One aligned O_DIRECT write of LENGTH bytes of BYTE at OFFSET, then the
// given sync: none | fdatasync | fsync | rwf_dsync (pwritev2 flag) |
// o_dsync (opened with O_DSYNC). Prints "ok".
const WRITER = `
import mmap, os, sys
path, off, length, fill, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
buf = mmap.mmap(-1, length)
buf.write(bytes([fill]) * length)
flags = os.O_RDWR | os.O_DIRECT | (os.O_DSYNC if mode == "o_dsync" else 0)
fd = os.open(path, flags)
if mode == "rwf_dsync":
    n = os.pwritev(fd, [buf], off, os.RWF_DSYNC)
else:
    n = os.pwritev(fd, [buf], off)
assert n == length, n
if mode == "fdatasync":
    os.fdatasync(fd)
elif mode == "fsync":
    os.fsync(fd)
os.close(fd)
print("ok")
`;

type SyncMode = 'none' | 'fdatasync' | 'fsync' | 'rwf_dsync' | 'o_dsync';

async function write(file: string, offset: number, length: number, fill: number, mode: SyncMode): Promise<void> {
  const r = await runCommand(SYSTEM_PYTHON, ['-c', WRITER, file, String(offset), String(length), String(fill), mode]);
  expect(r.code, r.stderr).toBe(0);
  expect(r.stdout.trim()).toBe('ok');
}

/** Bytes as a fresh reader of the FUSE file sees them (buffered, a new open: no stale page cache may hide a cut). */
async function readExposed(file: string, offset: number, length: number): Promise<Buffer> {
  const fh = await fs.open(file, 'r');
  try {
    const b = Buffer.alloc(length);
    await fh.read(b, 0, length, offset);
    return b;
  } finally {
    await fh.close();
  }
}

function readBacking(file: string, offset: number, length: number): Buffer {
  return readFileSync(file).subarray(offset, offset + length);
}

const filled = (n: number, v: number): Buffer => Buffer.alloc(n, v);

let work: string;
let disk: FaultDisk;

beforeAll(async () => {
  work = await makeTempDir('faultdisk-volatile');
  disk = await startFaultDisk({ dir: work, name: 'vol', sizeBytes: 8 * MiB, volatileCache: true });
});

afterAll(async () => {
  await cleanupAll();
});

describe('volatile cache of the fault disk, through nbdfuse', () => {
  it('an O_DIRECT write without sync is cached: readers see it, the backing file does not, a power cut drops it', async () => {
    const before = await disk.stats();
    await write(disk.path, 10 * BS, 2 * BS, 0x41, 'none');
    const mid = await disk.stats();
    expect(mid.flushes - before.flushes, 'a plain O_DIRECT write must not reach the plugin as a flush').toBe(0);
    expect(mid.unflushedWrites).toBeGreaterThanOrEqual(1);
    expect((await readExposed(disk.path, 10 * BS, 2 * BS)).equals(filled(2 * BS, 0x41))).toBe(true);
    expect(readBacking(disk.backingFile, 10 * BS, 2 * BS).equals(filled(2 * BS, 0))).toBe(true);

    const cut = await disk.powerCut();
    expect(cut.dropped).toBeGreaterThanOrEqual(1);
    expect(cut.kept + cut.torn).toBe(0);
    const after = await disk.stats();
    expect(after.unflushedWrites).toBe(0);
    expect(after.powerCuts).toBe(before.powerCuts + 1);
    expect((await readExposed(disk.path, 10 * BS, 2 * BS)).equals(filled(2 * BS, 0))).toBe(true);
  });

  for (const mode of ['fdatasync', 'fsync', 'rwf_dsync', 'o_dsync'] as const) {
    it(`${mode} reaches the plugin as a flush (or FUA) and survives a power cut`, async () => {
      const off = { fdatasync: 20, fsync: 30, rwf_dsync: 40, o_dsync: 50 }[mode] * BS;
      const fill = { fdatasync: 0x51, fsync: 0x52, rwf_dsync: 0x53, o_dsync: 0x54 }[mode];
      // an unflushed neighbour written first: a flush persists it too
      await write(disk.path, off + 4 * BS, BS, 0x99, 'none');
      const before = await disk.stats();
      await write(disk.path, off, 2 * BS, fill, mode);
      const after = await disk.stats();
      // nbdfuse 1.14 sends no FUA; the kernel turns every one of these into
      // FUSE fsync, which nbdfuse sends as NBD FLUSH
      expect(after.flushes - before.flushes, `${mode}: flushes seen by the plugin`).toBeGreaterThanOrEqual(1);
      expect(after.unflushedWrites).toBe(0);
      expect(readBacking(disk.backingFile, off, 2 * BS).equals(filled(2 * BS, fill))).toBe(true);
      expect(readBacking(disk.backingFile, off + 4 * BS, BS).equals(filled(BS, 0x99))).toBe(true);
      await disk.powerCut();
      expect((await readExposed(disk.path, off, 2 * BS)).equals(filled(2 * BS, fill))).toBe(true);
      expect((await readExposed(disk.path, off + 4 * BS, BS)).equals(filled(BS, 0x99))).toBe(true);
    });
  }

  it('a write after the last flush is lost on a cut while the flushed one stays', async () => {
    await write(disk.path, 60 * BS, BS, 0x61, 'fdatasync');
    await write(disk.path, 60 * BS, BS, 0x62, 'none');
    expect((await readExposed(disk.path, 60 * BS, BS)).equals(filled(BS, 0x62))).toBe(true);
    await disk.powerCut();
    expect((await readExposed(disk.path, 60 * BS, BS)).equals(filled(BS, 0x61))).toBe(true);
  });

  it('powerCut({ keepRandomSubset }) persists a seeded subset: every block holds a value written to it, and the seed decides which', async () => {
    // 32 unflushed writes: 16 single blocks (each block written twice: 2
    // values), and 8 writes of 4 blocks each (may be torn)
    const outcome = async (seed: number): Promise<{ picks: number[]; cut: { dropped: number; kept: number; torn: number } }> => {
      const base = 100 * BS;
      await write(disk.path, base, 64 * BS, 0x00, 'fdatasync'); // known start
      for (let i = 0; i < 16; i++) {
        await write(disk.path, base + i * BS, BS, 0x10 + i, 'none');
        await write(disk.path, base + i * BS, BS, 0x80 + i, 'none');
      }
      for (let j = 0; j < 8; j++) await write(disk.path, base + (16 + 4 * j) * BS, 4 * BS, 0xc0 + j, 'none');
      const cut = await disk.powerCut({ keepRandomSubset: seed });
      const data = await readExposed(disk.path, base, 48 * BS);
      const picks: number[] = [];
      for (let b = 0; b < 48; b++) {
        const blk = data.subarray(b * BS, (b + 1) * BS);
        const v = blk[0];
        expect(blk.equals(filled(BS, v)), `block ${b} is mixed (a tear inside 4 KiB)`).toBe(true);
        const allowed = b < 16 ? [0, 0x10 + b, 0x80 + b] : [0, 0xc0 + Math.floor((b - 16) / 4)];
        expect(allowed, `block ${b} holds 0x${v.toString(16)}`).toContain(v);
        picks.push(v);
      }
      return { picks, cut };
    };
    const a = await outcome(7);
    const b = await outcome(7);
    const c = await outcome(8);
    expect(b.picks).toEqual(a.picks);
    expect(a.cut.dropped + a.cut.kept + a.cut.torn).toBe(40);
    // a seed mixes kept and lost writes (here, every kind of outcome)
    expect(a.picks.some((v) => v === 0)).toBe(true);
    expect(a.picks.some((v) => v !== 0)).toBe(true);
    expect(a.cut.dropped).toBeGreaterThan(0);
    expect(a.cut.kept).toBeGreaterThan(0);
    expect(c.picks).not.toEqual(a.picks);
  });

  it('an io_uring RWF_DSYNC write reaches the plugin without a flush; withReliableFua adds the fdatasync', async () => {
    // The kernel completes an asynchronous O_DIRECT FUSE write without the
    // fsync O_DSYNC asks for (a synchronous pwritev2 gets it, above). If the
    // first half starts failing, the kernel honours it now.
    const dev = BackingDevice.open(disk.path, { direct: true });
    try {
      const buf = allocAligned(BS);
      buf.fill(0x71);
      const s0 = await disk.stats();
      expect(await dev.io(BackingOp.WRITE, buf, 70 * BS, BS, IO_FUA)).toBe(BS);
      const s1 = await disk.stats();
      expect(s1.flushes - s0.flushes, 'io_uring RWF_DSYNC write: flushes').toBe(0);
      expect(s1.unflushedWrites).toBeGreaterThanOrEqual(1);
      expect(dsyncUnreliable(dev)).toBe(true);
      withReliableFua(dev);
      buf.fill(0x72);
      expect(await dev.io(BackingOp.WRITE, buf, 71 * BS, BS, IO_FUA)).toBe(BS);
      const s2 = await disk.stats();
      expect(s2.flushes - s1.flushes).toBe(1);
      expect(s2.unflushedWrites).toBe(0);
      // a plain write stays a plain write
      expect(await dev.io(BackingOp.WRITE, buf, 72 * BS, BS, 0)).toBe(BS);
      expect((await disk.stats()).flushes).toBe(s2.flushes);
      await disk.powerCut();
      expect((await readExposed(disk.path, 71 * BS, BS)).equals(filled(BS, 0x72))).toBe(true);
    } finally {
      await dev.close(1000);
    }
    // a file on a local filesystem keeps RWF_DSYNC
    const local = BackingDevice.open(disk.backingFile, { direct: true });
    try {
      expect(dsyncUnreliable(local)).toBe(false);
      expect(withReliableFua(local).submit).toBe(BackingDevice.prototype.submit);
    } finally {
      await local.close(1000);
    }
  });

  it('powerCut() needs a volatile disk', async () => {
    const plain = await startFaultDisk({ dir: work, name: 'plain', sizeBytes: MiB });
    try {
      await expect(plain.powerCut()).rejects.toThrow(/volatileCache/);
      expect((await plain.stats()).unflushedWrites).toBe(0);
    } finally {
      await plain.stop();
    }
  });
});
