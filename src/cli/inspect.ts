/**
 * `remapctl inspect`: decode the metadata of a spare offline (no daemon):
 * identity, layout, seq, counts, and which copy or structure is bad.
 */
import { ERRNO, RemapError, errnoOf } from '../errors.js';
import { FileMetaIO } from '../metadata/io.js';
import { reduce } from '../metadata/reduce.js';
import { inspectSpare, type CopyReport } from '../metadata/store.js';
import { blockDeviceSize } from '../native/sys.js';
import { describeIdentity } from '../engine/identity.js';
import type { MainIdentity } from '../metadata/format.js';

export interface InspectReport {
  path: string;
  areaOffset: number;
  areaBytes: number;
  ok: boolean;
  error: { message: string; errno: number; errnoName: string } | null;
  identity: {
    deviceUuid: string;
    name: string | null;
    blockSize: number;
    main: MainIdentity;
    mainDescription: string;
    createdAt: string;
  } | null;
  layout: Record<string, unknown> | null;
  seq: number | null;
  checkpoint: { seq: number; slot: number; records: number } | null;
  journal: { head: number; replayedCommits: number; tornCommits: number[] } | null;
  counts: { remapped: number; pending: number; badSpare: number; quarantined: number } | null;
  /** Spare pool: the extra spares the metadata records (their paths are in devices.json, not here). */
  extraSpares: Array<{ ordinal: number; blocks: number; labelCrc: number }>;
  copies: CopyReport[];
  /** Human lines naming each copy/structure that is not valid. */
  problems: string[];
  warnings: string[];
}

function problemsOf(copies: CopyReport[]): string[] {
  const out: string[] = [];
  for (const c of copies) {
    for (const s of c.structures) {
      // An unused checkpoint slot is "empty", an older one "superseded": normal, not a problem.
      if (!s.valid && !(s.structure.startsWith('checkpoint slot') && /^(empty|superseded)/.test(s.reason ?? ''))) out.push(`copy ${c.copy}: ${s.structure} at offset ${s.offset} is bad${s.reason ? `: ${s.reason}` : ''}`);
    }
    if (!c.valid && !out.some((l) => l.startsWith(`copy ${c.copy}:`))) {
      // No structure is unreadable, yet this copy misses part of the state: stale (an older image) or damaged journal blocks.
      const j = c.structures.find((s) => s.structure === 'journal');
      out.push(`copy ${c.copy}: does not hold the whole loaded state${j ? ` (journal reaches seq ${j.seq ?? 0}${j.reason ? `; ${j.reason}` : ''})` : ''}`);
    }
  }
  return out;
}

/** Throws RemapError when the path cannot be opened; otherwise reports (ok or not). */
export async function inspectPath(path: string, spareTailBytes?: number): Promise<InspectReport> {
  const size = blockDeviceSize(path);
  let areaOffset = 0;
  let areaBytes = size;
  if (spareTailBytes !== undefined) {
    if (spareTailBytes % 4096 !== 0 || spareTailBytes >= size) {
      throw new RemapError(ERRNO.EINVAL, `spare tail of ${spareTailBytes} bytes must be a multiple of 4096 below the size of ${path} (${size} bytes)`, { device: path, op: 'inspect' });
    }
    areaOffset = size - spareTailBytes;
    areaBytes = spareTailBytes;
  }
  let io: FileMetaIO;
  try {
    io = await FileMetaIO.open(path, { readOnly: true, sizeBytes: size });
  } catch (e) {
    throw e instanceof RemapError ? e : new RemapError(errnoOf(e), `cannot open ${path}`, { device: path, op: 'inspect' });
  }
  try {
    const r = await inspectSpare(io, { areaOffset, areaBytes });
    const base: InspectReport = {
      path, areaOffset, areaBytes, ok: r.ok, error: null, identity: null, layout: null, seq: null, checkpoint: null, journal: null,
      counts: null, extraSpares: [], copies: [], problems: [], warnings: [],
    };
    if (!r.ok) {
      return { ...base, error: { message: r.error.message, errno: r.error.errno, errnoName: r.error.code }, copies: r.copies, problems: problemsOf(r.copies), warnings: r.warnings };
    }
    const m = r.metadata;
    const st = reduce(m.records);
    const { copies: layoutCopies, ...layout } = m.layout;
    return {
      ...base,
      identity: {
        deviceUuid: m.identity.deviceUuid,
        name: m.identity.name ?? null,
        blockSize: m.identity.blockSize,
        main: m.identity.main,
        mainDescription: describeIdentity(m.identity.main),
        createdAt: new Date(m.identity.createdAtMs).toISOString(),
      },
      layout: { ...layout, copies: layoutCopies },
      seq: m.seq,
      checkpoint: m.checkpoint,
      journal: { head: m.journal.head, replayedCommits: m.journal.replayedCommits, tornCommits: m.journal.tornCommits },
      counts: { remapped: st.remaps.size, pending: st.pending.size, badSpare: st.badSpare.size, quarantined: st.quarantined.size },
      extraSpares: [...st.spares.entries()].sort((a, b) => a[0] - b[0]).map(([ordinal, x]) => ({ ordinal, blocks: x.blocks, labelCrc: x.labelCrc })),
      copies: m.copies,
      problems: problemsOf(m.copies),
      warnings: m.warnings,
    };
  } finally {
    await io.close();
  }
}

export function formatInspect(r: InspectReport): string {
  const lines: string[] = [];
  lines.push(`spare:        ${r.path}${r.areaOffset > 0 ? ` (tail area at offset ${r.areaOffset}, ${r.areaBytes} bytes)` : ` (${r.areaBytes} bytes)`}`);
  if (r.identity !== null) {
    const i = r.identity;
    lines.push(`metadata:     valid${r.problems.length > 0 ? ' (recovered from the good copy)' : ''}`);
    lines.push(`device:       ${i.name ?? '-'} (uuid ${i.deviceUuid}), created ${i.createdAt}`);
    lines.push(`main:         ${i.mainDescription}`);
    lines.push(`block size:   ${i.blockSize}`);
  } else {
    lines.push(`metadata:     NOT USABLE: ${r.error?.message ?? 'unknown error'}`);
  }
  if (r.layout !== null) {
    const l = r.layout as { journalBlocks: number; checkpointBlocks: number; checkpointCapacity: number; dataOffset: number; dataBlocks: number; copyBytes: number };
    lines.push(`layout:       ${l.dataBlocks} spare data blocks at offset ${l.dataOffset}; per copy ${l.copyBytes} bytes (checkpoint ${l.checkpointBlocks} blocks x2, journal ${l.journalBlocks} blocks)`);
  }
  if (r.seq !== null) lines.push(`seq:          ${r.seq} (checkpoint seq ${r.checkpoint?.seq} in slot ${r.checkpoint?.slot}, ${r.journal?.replayedCommits} journal commits replayed)`);
  if (r.counts !== null) {
    const c = r.counts;
    lines.push(`remapped:     ${c.remapped}`);
    lines.push(`pending:      ${c.pending}`);
    lines.push(`bad spare:    ${c.badSpare}`);
    lines.push(`quarantined:  ${c.quarantined}`);
  }
  for (const x of r.extraSpares ?? []) lines.push(`spare ${x.ordinal}:      extra spare of ${x.blocks} blocks (label CRC32C 0x${x.labelCrc.toString(16).padStart(8, '0')})`);
  for (const c of r.copies) lines.push(`copy ${c.copy}:       ${c.valid ? 'valid' : 'BAD'}${c.offset !== undefined ? ` (offset ${c.offset})` : ''}`);
  for (const p of r.problems) lines.push(`problem:      ${p}`);
  for (const w of r.warnings) lines.push(`warning:      ${w}`);
  return lines.join('\n');
}
