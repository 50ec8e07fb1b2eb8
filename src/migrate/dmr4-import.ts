/**
 * The I/O side of migrating from the kernel dm-remap target (docs/DMR4.md):
 * reading and decoding an old spare, and filling a freshly added engine from
 * it. The decoding itself is pure (dmr4.ts).
 */
import { constants as fsc } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import type { BlockEngine } from '../engine/engine.js';
import { ERRNO, RemapError, errnoName, errnoOf } from '../errors.js';
import { allocAligned } from '../native/backing.js';
import { blockDeviceSize } from '../native/sys.js';
import { DMR4, Dmr4Error, decodeDmr4, planDmr4Import, type Dmr4Image, type Dmr4ImportPlan, type Dmr4Problem } from './dmr4.js';

/** Reads and decodes an old spare. Throws RemapError (path problems) or Dmr4Error (metadata). */
export async function readDmr4Spare(path: string): Promise<Dmr4Image> {
  const fh = await openOrThrow(path, 'old spare');
  try {
    const size = blockDeviceSize(path);
    const want = Math.min(size, DMR4.META_AREA_BYTES);
    const head = Buffer.alloc(want);
    let got = 0;
    while (got < want) {
      const { bytesRead } = await fh.read(head, got, want - got, got);
      if (bytesRead === 0) break;
      got += bytesRead;
    }
    return decodeDmr4(head.subarray(0, got), size);
  } catch (err) {
    if (err instanceof Dmr4Error || err instanceof RemapError) throw err;
    throw new RemapError(errnoOf(err), `reading the old spare ${path} failed`, { device: path, op: 'import-dmr4' });
  } finally {
    await fh.close();
  }
}

async function openOrThrow(path: string, role: string, flags = fsc.O_RDONLY): Promise<FileHandle> {
  try {
    return await open(path, flags);
  } catch (err) {
    const errno = errnoOf(err);
    throw new RemapError(errno, errno === ERRNO.ENOENT ? `${role} ${path} does not exist` : `cannot open ${role} ${path}`, { device: path, op: 'import-dmr4' });
  }
}

/** Reads exactly `len` bytes at `pos`; returns an errno (> 0) on failure or a short read. */
async function readAt(fh: FileHandle, buf: Buffer, len: number, pos: number): Promise<number> {
  try {
    const { bytesRead } = await fh.read(buf, 0, len, pos);
    return bytesRead === len ? 0 : ERRNO.EIO;
  } catch (err) {
    return errnoOf(err);
  }
}

export interface Dmr4PendingBlock {
  block: number;
  entries: number[];
  /** The overlaps found by the decoder, or why the data could not be read. */
  problems: Array<Dmr4Problem | 'main-unreadable' | 'old-spare-unreadable'>;
  detail?: string;
}

export interface Dmr4ImportReport {
  from: string;
  chosenCopy: number;
  seq: bigint;
  entries: number;
  blockSize: number;
  /** Blocks remapped with data (main overlaid with the old spare's sectors). */
  dataBlocks: number[];
  sectorsImported: number;
  /** Blocks imported as lost: unreadable until rewritten. */
  pendingBlocks: Dmr4PendingBlock[];
  /** Entries whose main sector lies outside the new device: not imported. */
  outsideEntries: number[];
}

/** How many blocks are built and imported per engine call (one sync + one commit each). */
const IMPORT_GROUP = 256;

/**
 * Fills `engine` (freshly added: no remaps, no pending blocks) from a decoded
 * old spare. For each block that holds remapped sectors, the block is read
 * from the main (sector by sector if the whole block fails) and overlaid with
 * those sectors read from the old spare, then remapped with that data. Blocks
 * with an overlapping entry, or whose data cannot all be read, are marked lost
 * (unreadable until rewritten): their data is never invented.
 */
export async function importDmr4Into(engine: BlockEngine, img: Dmr4Image, from: string, mainPath: string): Promise<Dmr4ImportReport> {
  const st = engine.status();
  if (st.remappedBlocks > 0 || st.pendingBlocks > 0) {
    throw new RemapError(ERRNO.EEXIST, `the new spare already holds ${st.remappedBlocks} remapped and ${st.pendingBlocks} pending block(s); `
      + 'import-dmr4 needs a freshly formatted spare', { device: engine.name, op: 'import-dmr4' });
  }
  const bs = engine.blockSize;
  const plan: Dmr4ImportPlan = planDmr4Import(img.table, bs, engine.sizeBytes);
  const need = plan.data.length + plan.pending.length;
  const free = st.spareBlocksTotal - st.spareBlocksUsed;
  if (need > free) {
    throw new RemapError(ERRNO.ENOSPC, `importing needs ${need} spare block(s) (${plan.data.length} with data, ${plan.pending.length} lost), `
      + `the new spare has ${free} free`, { device: engine.name, op: 'import-dmr4' });
  }
  const report: Dmr4ImportReport = {
    from, chosenCopy: img.chosen, seq: img.seq, entries: img.table.length, blockSize: bs,
    dataBlocks: [], sectorsImported: 0, pendingBlocks: plan.pending.map((p) => ({ ...p, problems: [...p.problems] })), outsideEntries: plan.outside,
  };
  const old = await openOrThrow(from, 'old spare');
  let main: FileHandle | null = null;
  try {
    // O_DIRECT: a failing main must be read without the page cache, which
    // would turn one bad sector into a failed read of its whole page.
    main = await openOrThrow(mainPath, 'main', fsc.O_RDONLY | fsc.O_DIRECT).catch(() => openOrThrow(mainPath, 'main'));
    const sector = DMR4.SECTOR_BYTES;
    const sbuf = allocAligned(sector);
    for (let i = 0; i < plan.data.length; i += IMPORT_GROUP) {
      const items: Array<{ block: number; data: Buffer; sectors: number }> = [];
      for (const d of plan.data.slice(i, i + IMPORT_GROUP)) {
        const data = allocAligned(bs);
        const covered = new Set(d.sectors.map((s) => s.offsetInBlock));
        let lost: string | null = null;
        if ((await readAt(main, data, bs, d.block * bs)) !== 0) {
          // The remapped sectors are the bad ones: read the others one by one.
          for (let off = 0; off < bs && lost === null; off += sector) {
            if (covered.has(off)) continue;
            const e = await readAt(main, sbuf, sector, d.block * bs + off);
            if (e !== 0) lost = `main sector ${(d.block * bs + off) / sector} is unreadable (${errnoName(e)})`;
            else sbuf.copy(data, off);
          }
          if (lost !== null) {
            report.pendingBlocks.push({ block: d.block, entries: d.sectors.map((s) => s.entry), problems: ['main-unreadable'], detail: lost });
            continue;
          }
        }
        for (const s of d.sectors) {
          const e = await readAt(old, sbuf, sector, s.spareByte);
          if (e !== 0) {
            lost = `old spare sector ${s.spareByte / sector} (entry ${s.entry}) is unreadable (${errnoName(e)})`;
            break;
          }
          sbuf.copy(data, s.offsetInBlock);
        }
        if (lost !== null) {
          report.pendingBlocks.push({ block: d.block, entries: d.sectors.map((s) => s.entry), problems: ['old-spare-unreadable'], detail: lost });
          continue;
        }
        items.push({ block: d.block, data, sectors: d.sectors.length });
      }
      if (items.length > 0) {
        const results = await engine.remapBlocksWithData(items.map(({ block, data }) => ({ block, data, seen: -1 })));
        const bad = results.find((r) => r.result !== 'remapped');
        if (bad !== undefined) {
          const errno = bad.result === 'failed' ? bad.errno : ERRNO.EIO;
          throw new RemapError(errno, `importing block ${bad.block} failed (${bad.result}${'reason' in bad ? `: ${bad.reason}` : ''}); `
            + `${report.dataBlocks.length} block(s) were imported before it`, { device: engine.name, op: 'import-dmr4', block: bad.block });
        }
      }
      for (const it of items) {
        report.dataBlocks.push(it.block);
        report.sectorsImported += it.sectors;
      }
    }
    report.pendingBlocks.sort((a, b) => a.block - b.block);
    if (report.pendingBlocks.length > 0) await engine.markLost(report.pendingBlocks.map((p) => p.block));
  } finally {
    await old.close();
    await main?.close();
  }
  return report;
}
