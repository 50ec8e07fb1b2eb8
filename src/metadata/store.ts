/**
 * Format, load, inspect and repair the metadata of a spare area.
 * On-disk format: docs/FORMAT.md.
 */
import { randomUUID } from 'node:crypto';
import { ERRNO, RemapError, errnoOf } from '../errors.js';
import {
  CHECKPOINT_MAGIC,
  FORMAT_VERSION,
  JOURNAL_MAGIC,
  SB_MAGIC,
  decodeBlock,
  decodeFormatMarker,
  decodeSuperblock,
  encodeBlocks,
  encodeFormatMarker,
  encodeSuperblock,
  formatIdOf,
  markerOffset,
  type DecodedBlock,
  type FormatMarker,
  type Identity,
  type MainIdentity,
  type Superblock,
  type SuperblockResult,
} from './format.js';
import { META_BLOCK, type MetaIO } from './io.js';
import { computeLayout, type Layout } from './layout.js';
import type { MetaRecord } from './records.js';
import { reduce, stateToRecords } from './reduce.js';

export interface StructureReport {
  /** 'superblock', 'checkpoint slot 0', 'checkpoint slot 1', 'journal' */
  structure: string;
  offset: number;
  valid: boolean;
  seq?: number;
  records?: number;
  reason?: string;
}

export interface CopyReport {
  copy: 0 | 1;
  /** First byte of the copy (undefined when the layout is unknown). */
  offset?: number;
  /** True when this copy alone holds the loaded state (superblock, chosen checkpoint, every replayed commit). */
  valid: boolean;
  structures: StructureReport[];
}

export interface LoadedMetadata {
  device: string;
  identity: Identity;
  layout: Layout;
  /** Checkpoint records, then the records of every replayed journal commit, in seq order. */
  records: MetaRecord[];
  /** Highest valid sequence number found anywhere; the next commit uses seq + 1. */
  seq: number;
  checkpoint: { seq: number; slot: 0 | 1; records: number };
  journal: {
    /** Per journal slot: highest valid block seq found there in either copy (0: none). */
    slotSeqs: number[];
    /** Slot after the newest block: where the writer appends next. */
    head: number;
    replayedCommits: number;
    /** Seqs of commits ignored because a block was missing in both copies (torn). */
    tornCommits: number[];
  };
  copies: CopyReport[];
  warnings: string[];
}

export interface LoadOptions {
  /** Start of the spare area (default 0). */
  areaOffset?: number;
  /** Size of the spare area (default: up to the end of the device). Copy 1's superblock is looked for in its last 4 KiB. */
  areaBytes?: number;
}

export type IdentityInput = Omit<Identity, 'deviceUuid' | 'createdAtMs' | 'blockSize'> & {
  deviceUuid?: string;
  createdAtMs?: number;
};

export interface FormatOptions {
  areaOffset: number;
  areaBytes: number;
  blockSize: number;
  identity: IdentityInput;
  journalBytes?: number;
  maxPending?: number;
  force?: boolean;
  /**
   * Called (before anything is written) when the area holds only what an
   * interrupted format left (format-in-progress markers and that format's
   * structures) and this format redoes it without force.
   */
  onRedo?: (note: string, interrupted: FormatMarker) => void;
}

/**
 * Load of an area whose superblock slots hold format-in-progress markers
 * and no superblock: a format started and never finished. ENODATA (there
 * is no metadata), with a message that says so and what to run.
 * `redoable`: an unforced format may redo it (docs/FORMAT.md section 8).
 */
export class FormatInterruptedError extends RemapError {
  constructor(
    readonly marker: FormatMarker,
    readonly redoable: boolean,
    message: string,
    device: string,
  ) {
    super(ERRNO.ENODATA, message, { device, op: 'metadata-load' });
    this.name = 'FormatInterruptedError';
  }
}

export type InspectResult =
  | { ok: true; metadata: LoadedMetadata }
  | { ok: false; error: RemapError; copies: CopyReport[]; warnings: string[] };

const CHUNK = 4 * 1024 * 1024;

async function readRange(io: MetaIO, offset: number, length: number): Promise<Uint8Array> {
  if (length <= CHUNK) return io.read(offset, length);
  const out = new Uint8Array(length);
  for (let done = 0; done < length; done += CHUNK) out.set(await io.read(offset + done, Math.min(CHUNK, length - done)), done);
  return out;
}

function floor4k(n: number): number {
  return Math.floor(n / META_BLOCK) * META_BLOCK;
}

function hasMagic(buf: Uint8Array, magic: Uint8Array): boolean {
  for (let i = 0; i < magic.length; i++) if (buf[i] !== magic[i]) return false;
  return true;
}

function reasonOf(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

type SbRead =
  | SuperblockResult
  | { status: 'absent'; reason: string; marker: FormatMarker }
  | { status: 'unreadable'; reason: string; errno: number }
  | { status: 'outside'; reason: string };

function describeMarker(m: FormatMarker): string {
  return `format-in-progress marker: a format started at ${new Date(m.startedAtMs).toISOString()} (device uuid ${m.deviceUuid}) never finished`;
}

/**
 * A superblock slot: a superblock, or else a format-in-progress marker
 * (a corrupt or misplaced marker counts as corrupt: magic present).
 */
function decodeSlot(buf: Uint8Array, offset: number): SbRead {
  const r = decodeSuperblock(buf);
  if (r.status !== 'absent') return r;
  const m = decodeFormatMarker(buf);
  if (m.status === 'absent') return r;
  if (m.status === 'corrupt') return { status: 'corrupt', reason: m.reason };
  if (markerOffset(m.marker) !== offset)
    return { status: 'corrupt', reason: `format-in-progress marker of copy ${m.marker.copyIndex} of an area at ${m.marker.areaOffset}+${m.marker.areaBytes} found at offset ${offset}` };
  return { status: 'absent', reason: describeMarker(m.marker), marker: m.marker };
}

async function readSuperblock(io: MetaIO, offset: number, lowest: number): Promise<SbRead> {
  if (offset < lowest || offset + META_BLOCK > io.sizeBytes) return { status: 'outside', reason: `offset ${offset} is outside the device (size ${io.sizeBytes})` };
  try {
    return decodeSlot(await io.read(offset, META_BLOCK), offset);
  } catch (e) {
    return { status: 'unreadable', reason: `read failed: ${reasonOf(e)}`, errno: errnoOf(e) };
  }
}

/**
 * Whether the area left by interrupted formats (their valid markers; no
 * superblock, no corrupt superblock) may be formatted again without force.
 * Not when one of them was a forced format over existing metadata, nor
 * when the first checkpoint block (areaOffset + 4096) holds a checkpoint
 * block that is not a valid one of one of these formats.
 */
function interruptedVerdict(markers: FormatMarker[], ckptBlock: Uint8Array | undefined, ckptAt: number): { redoable: true } | { redoable: false; why: string } {
  const forced = markers.find((m) => m.replacing);
  if (forced) return { redoable: false, why: `that format (device uuid ${forced.deviceUuid}) was forced over existing dm-remapd metadata` };
  if (ckptBlock !== undefined && hasMagic(ckptBlock, CHECKPOINT_MAGIC) && !markers.some((m) => decodeBlock(ckptBlock, CHECKPOINT_MAGIC, formatIdOf(m.deviceUuid)).ok))
    return { redoable: false, why: `the checkpoint block at ${ckptAt} is not one that format wrote` };
  return { redoable: true };
}

function newestMarker(markers: FormatMarker[]): FormatMarker {
  return markers.reduce((a, b) => (b.startedAtMs > a.startedAtMs ? b : a));
}

function sameFormat(a: Superblock, b: Superblock): boolean {
  return a.identity.deviceUuid === b.identity.deviceUuid && JSON.stringify(a.layout) === JSON.stringify(b.layout);
}

class LoadFailure extends Error {
  constructor(
    readonly error: RemapError,
    readonly copies: CopyReport[],
    readonly warnings: string[],
  ) {
    super(error.message);
  }
}

interface SlotBlocks {
  /** decoded blocks by index for this copy, for the seq under consideration */
  blocks: (DecodedBlock | undefined)[];
  reasons: string[];
}

/** Does the heavy lifting for loadSpare / inspectSpare. Throws LoadFailure. */
async function scan(io: MetaIO, opts: LoadOptions): Promise<LoadedMetadata> {
  const dev = io.describe();
  const warnings: string[] = [];
  const areaOffset = opts.areaOffset ?? 0;
  const areaEnd = opts.areaBytes !== undefined ? areaOffset + floor4k(opts.areaBytes) : floor4k(io.sizeBytes);
  const copies: CopyReport[] = [
    { copy: 0, valid: false, structures: [] },
    { copy: 1, valid: false, structures: [] },
  ];

  // ---- superblocks
  const sbAt: [number, number] = [areaOffset, areaEnd - META_BLOCK];
  const sbr: [SbRead, SbRead] = [await readSuperblock(io, sbAt[0], areaOffset), await readSuperblock(io, sbAt[1], areaOffset + META_BLOCK)];
  const placed = (i: 0 | 1): Superblock | undefined => {
    const r = sbr[i];
    if (r.status !== 'valid') return undefined;
    const l = r.sb.layout;
    if (r.sb.copyIndex !== i || l.copies[i].superblock !== sbAt[i]) {
      sbr[i] = { status: 'corrupt', reason: `superblock of copy ${r.sb.copyIndex} of an area at ${l.areaOffset}+${l.areaBytes} found at offset ${sbAt[i]}` };
      return undefined;
    }
    return r.sb;
  };
  let sb0 = placed(0);
  let sb1 = placed(1);
  if (sb0 && sb1 && !sameFormat(sb0, sb1)) {
    sbr[1] = { status: 'corrupt', reason: `superblock belongs to another format (device ${sb1.identity.deviceUuid}, copy 0 says ${sb0.identity.deviceUuid})` };
    sb1 = undefined;
  }
  // Copy 1 may be elsewhere when the caller did not give the area size: use copy 0's layout.
  if (sb0 && !sb1 && sb0.layout.copies[1].superblock !== sbAt[1]) {
    sbAt[1] = sb0.layout.copies[1].superblock;
    sbr[1] = await readSuperblock(io, sbAt[1], areaOffset + META_BLOCK);
    sb1 = placed(1);
    if (sb1 && !sameFormat(sb0, sb1)) {
      sbr[1] = { status: 'corrupt', reason: `superblock belongs to another format (device ${sb1.identity.deviceUuid})` };
      sb1 = undefined;
    }
  }
  for (const i of [0, 1] as const) {
    const r = sbr[i];
    copies[i].structures.push({ structure: 'superblock', offset: sbAt[i], valid: r.status === 'valid', ...(r.status === 'valid' ? {} : { reason: `${r.status}: ${r.reason}` }) });
  }
  const sb = sb0 ?? sb1;
  if (!sb) {
    let ckptMagic = false;
    let ckptBlock: Uint8Array | undefined;
    if (areaOffset + 2 * META_BLOCK <= io.sizeBytes) {
      try {
        ckptBlock = await io.read(areaOffset + META_BLOCK, META_BLOCK);
        ckptMagic = hasMagic(ckptBlock, CHECKPOINT_MAGIC);
      } catch {
        /* reported through the superblock reads */
      }
    }
    const unreadable = sbr.find((r): r is Extract<SbRead, { status: 'unreadable' }> => r.status === 'unreadable');
    const corruptSb = sbr.some((r) => r.status === 'corrupt');
    const markers = sbr.flatMap((r) => ('marker' in r ? [r.marker] : []));
    if (markers.length > 0 && !corruptSb && !unreadable) {
      // Only what an interrupted format leaves: say so, and what to do.
      const m = newestMarker(markers);
      const v = interruptedVerdict(markers, ckptBlock, areaOffset + META_BLOCK);
      const started = `spare ${dev}: a format started at ${new Date(m.startedAtMs).toISOString()} (device uuid ${m.deviceUuid}) never finished, so it holds no usable dm-remapd metadata`;
      const msg = v.redoable
        ? `${started}; run \`remapctl add ... --format\` again to redo it`
        : `${started}; ${v.why}, so only a forced format may redo it (an unforced format refuses, as it refused before)`;
      throw new LoadFailure(new FormatInterruptedError(m, v.redoable, msg, dev), copies, warnings);
    }
    const magic = corruptSb || ckptMagic;
    const what = sbr.map((r, i) => `copy ${i} superblock at ${sbAt[i]}: ${r.status === 'valid' ? 'valid' : `${r.status} (${r.reason})`}`).join('; ');
    if (magic)
      throw new LoadFailure(
        new RemapError(
          ERRNO.EBADMSG,
          `dm-remapd metadata on ${dev} is corrupt in every copy (${what}${ckptMagic ? '; a checkpoint block is present at ' + (areaOffset + META_BLOCK) : ''}); refusing to start rather than use an empty table`,
          { device: dev, op: 'metadata-load' },
        ),
        copies,
        warnings,
      );
    if (unreadable)
      throw new LoadFailure(new RemapError(unreadable.errno, `cannot read dm-remapd metadata on ${dev} (${what})`, { device: dev, op: 'metadata-load' }), copies, warnings);
    throw new LoadFailure(new RemapError(ERRNO.ENODATA, `no dm-remapd metadata on ${dev}; format it explicitly`, { device: dev, op: 'metadata-load' }), copies, warnings);
  }
  const layout = sb.layout;
  const identity = sb.identity;
  const formatId = formatIdOf(identity.deviceUuid);
  for (const i of [0, 1] as const) copies[i].offset = layout.copies[i].start;
  const available = [0, 1].map((i) => layout.copies[i].end <= io.sizeBytes);
  for (const i of [0, 1] as const)
    if (!available[i]) warnings.push(`metadata copy ${i} (${layout.copies[i].start}..${layout.copies[i].end}) lies beyond the end of ${dev} (size ${io.sizeBytes}): device truncated?`);

  // ---- checkpoints
  let maxSeq = 0;
  const CK = layout.checkpointBlocks;
  // headers: [copy][slot]
  const heads: (DecodedBlock | undefined)[][] = [[], []];
  const slotReports: StructureReport[][] = [[], []];
  for (const c of [0, 1] as const) {
    for (const k of [0, 1] as const) {
      const off = layout.copies[c].checkpointSlots[k];
      const rep: StructureReport = { structure: `checkpoint slot ${k}`, offset: off, valid: false };
      slotReports[c][k] = rep;
      if (!available[c]) {
        rep.reason = 'beyond the end of the device';
        continue;
      }
      try {
        const r = decodeBlock(await io.read(off, META_BLOCK), CHECKPOINT_MAGIC, formatId);
        if (r.ok && r.block.blockIndex === 0 && r.block.blockCount <= CK) {
          heads[c][k] = r.block;
          rep.seq = r.block.seq;
          rep.records = r.block.totalRecords;
          maxSeq = Math.max(maxSeq, r.block.seq);
        } else rep.reason = r.ok ? 'first block has a bad index or count' : r.reason;
      } catch (e) {
        rep.reason = `read failed: ${reasonOf(e)}`;
      }
    }
  }
  // Candidates: (slot, seq, count), highest seq first.
  const cands = new Map<string, { slot: 0 | 1; seq: number; count: number }>();
  for (const c of [0, 1] as const)
    for (const k of [0, 1] as const) {
      const h = heads[c][k];
      if (h) cands.set(`${k}/${h.seq}/${h.blockCount}`, { slot: k, seq: h.seq, count: h.blockCount });
    }
  const ordered = [...cands.values()].sort((a, b) => b.seq - a.seq);
  const slotCache = new Map<string, SlotBlocks>();
  const slotBlocks = async (c: 0 | 1, k: 0 | 1, seq: number, count: number): Promise<SlotBlocks> => {
    const key = `${c}/${k}/${seq}/${count}`;
    const hit = slotCache.get(key);
    if (hit) return hit;
    const res: SlotBlocks = { blocks: new Array<DecodedBlock | undefined>(count), reasons: [] };
    if (available[c]) {
      try {
        const buf = await readRange(io, layout.copies[c].checkpointSlots[k], count * META_BLOCK);
        for (let i = 0; i < count; i++) {
          const r = decodeBlock(buf.subarray(i * META_BLOCK), CHECKPOINT_MAGIC, formatId);
          if (r.ok && r.block.seq === seq && r.block.blockIndex === i && r.block.blockCount === count) res.blocks[i] = r.block;
          else res.reasons.push(`block ${i}: ${r.ok ? `belongs to checkpoint seq ${r.block.seq}` : r.reason}`);
        }
      } catch (e) {
        res.reasons.push(`read failed: ${reasonOf(e)}`);
      }
    } else res.reasons.push('beyond the end of the device');
    slotCache.set(key, res);
    return res;
  };
  let chosen: { slot: 0 | 1; seq: number; records: MetaRecord[] } | undefined;
  const ckptCompleteIn: [boolean, boolean] = [false, false];
  for (const cand of ordered) {
    const per = [await slotBlocks(0, cand.slot, cand.seq, cand.count), await slotBlocks(1, cand.slot, cand.seq, cand.count)];
    for (const c of [0, 1] as const) {
      const complete = per[c].reasons.length === 0;
      const rep = slotReports[c][cand.slot];
      if (rep.seq === cand.seq) {
        rep.valid = complete;
        if (!complete) rep.reason = per[c].reasons.slice(0, 3).join('; ');
      }
    }
    const records: MetaRecord[] = [];
    let ok = true;
    for (let i = 0; i < cand.count && ok; i++) {
      const b = per[0].blocks[i] ?? per[1].blocks[i];
      if (!b) ok = false;
      else for (const r of b.records) records.push(r);
    }
    if (ok && records.length === (per[0].blocks[0] ?? per[1].blocks[0])?.totalRecords) {
      chosen = { slot: cand.slot, seq: cand.seq, records };
      for (const c of [0, 1] as const) ckptCompleteIn[c] = per[c].reasons.length === 0;
      break;
    }
    warnings.push(`checkpoint seq ${cand.seq} in slot ${cand.slot} is damaged in both copies; trying an older one`);
  }
  for (const c of [0, 1] as const) {
    for (const rep of slotReports[c]) {
      // An older checkpoint that was not needed is not damage: say so instead of leaving it "invalid" without a reason.
      if (chosen && !rep.valid && rep.reason === undefined && rep.seq !== undefined && rep.seq < chosen.seq) {
        rep.reason = `superseded: older checkpoint seq ${rep.seq}, not needed (checkpoint seq ${chosen.seq} is used)`;
      }
    }
    copies[c].structures.push(...slotReports[c]);
  }
  if (!chosen) {
    for (const c of [0, 1] as const) copies[c].structures.push({ structure: 'journal', offset: layout.copies[c].journal, valid: false, reason: 'not read' });
    throw new LoadFailure(
      new RemapError(
        ERRNO.EBADMSG,
        `dm-remapd metadata on ${dev} (device ${identity.deviceUuid}) has no valid checkpoint in any copy (` +
          [0, 1].flatMap((c) => slotReports[c].map((r) => `copy ${c} ${r.structure}: ${r.valid ? 'ok' : r.reason ?? 'invalid'}`)).join('; ') +
          '); refusing to start rather than use an incomplete table',
        { device: dev, op: 'metadata-load' },
      ),
      copies,
      warnings,
    );
  }

  // ---- journal
  const J = layout.journalBlocks;
  const slotSeqs = new Array<number>(J).fill(0);
  interface Commit {
    count: number;
    total: number;
    blocks: (DecodedBlock | undefined)[];
    inCopy: [number, number];
    conflict: boolean;
  }
  const commits = new Map<number, Commit>();
  const jReports: StructureReport[] = [];
  for (const c of [0, 1] as const) {
    const rep: StructureReport = { structure: 'journal', offset: layout.copies[c].journal, valid: available[c] };
    jReports.push(rep);
    if (!available[c]) {
      rep.reason = 'beyond the end of the device';
      continue;
    }
    let buf: Uint8Array;
    try {
      buf = await readRange(io, layout.copies[c].journal, J * META_BLOCK);
    } catch (e) {
      rep.valid = false;
      rep.reason = `read failed: ${reasonOf(e)}`;
      continue;
    }
    let corrupt = 0;
    let newest = 0;
    let validBlocks = 0;
    for (let s = 0; s < J; s++) {
      const r = decodeBlock(buf.subarray(s * META_BLOCK), JOURNAL_MAGIC, formatId);
      if (!r.ok) {
        if (!r.empty && !r.foreign) corrupt++;
        continue;
      }
      const b = r.block;
      validBlocks++;
      newest = Math.max(newest, b.seq);
      slotSeqs[s] = Math.max(slotSeqs[s], b.seq);
      let cm = commits.get(b.seq);
      if (!cm) {
        cm = { count: b.blockCount, total: b.totalRecords, blocks: new Array<DecodedBlock | undefined>(b.blockCount), inCopy: [0, 0], conflict: false };
        commits.set(b.seq, cm);
      }
      if (cm.count !== b.blockCount || cm.total !== b.totalRecords) {
        cm.conflict = true;
        continue;
      }
      if (!cm.blocks[b.blockIndex]) cm.blocks[b.blockIndex] = b;
      cm.inCopy[c]++;
    }
    rep.seq = newest;
    rep.records = validBlocks;
    if (corrupt > 0) rep.reason = `${corrupt} corrupt block(s) (torn writes or damage; harmless when covered by the checkpoint)`;
  }
  for (const c of [0, 1] as const) copies[c].structures.push(jReports[c]);
  for (const s of commits.keys()) maxSeq = Math.max(maxSeq, s);

  // ---- replay
  const records = chosen.records.slice();
  const tornCommits: number[] = [];
  let replayed = 0;
  const copyHasAll: [boolean, boolean] = [ckptCompleteIn[0] && sbr[0].status === 'valid', ckptCompleteIn[1] && sbr[1].status === 'valid'];
  const seqs = [...commits.keys()].filter((s) => s > chosen.seq).sort((a, b) => a - b);
  for (const s of seqs) {
    const cm = commits.get(s) as Commit;
    const have = cm.blocks.filter((b) => b !== undefined).length;
    if (cm.conflict || have !== cm.count) {
      tornCommits.push(s);
      warnings.push(
        cm.conflict
          ? `journal commit seq ${s} has blocks that disagree on its size: ignored`
          : `journal commit seq ${s} is incomplete (${have} of ${cm.count} blocks valid in either copy): ignored as a torn or abandoned commit`,
      );
      continue;
    }
    for (const b of cm.blocks) for (const r of (b as DecodedBlock).records) records.push(r);
    replayed++;
    for (const c of [0, 1] as const) if (cm.inCopy[c] !== cm.count) copyHasAll[c] = false;
  }
  for (const c of [0, 1] as const) {
    copies[c].valid = copyHasAll[c];
    if (!copyHasAll[c]) warnings.push(`metadata copy ${c} is damaged or behind (see its structures); the state was recovered from the other copy; repair rewrites it`);
  }

  // ---- writer position
  let head = 0;
  let best = 0;
  for (let s = 0; s < J; s++)
    if (slotSeqs[s] >= best && slotSeqs[s] > 0) {
      best = slotSeqs[s];
      head = (s + 1) % J;
    }

  return {
    device: dev,
    identity,
    layout,
    records,
    seq: maxSeq,
    checkpoint: { seq: chosen.seq, slot: chosen.slot, records: chosen.records.length },
    journal: { slotSeqs, head, replayedCommits: replayed, tornCommits },
    copies,
    warnings,
  };
}

/**
 * Loads the metadata of a spare area. Throws RemapError ENODATA when there
 * is no metadata at all, EBADMSG ("metadata corrupt"; Node has no EUCLEAN) when metadata is present but no copy is
 * usable (never an empty table), or the read errno.
 */
export async function loadSpare(io: MetaIO, opts: LoadOptions = {}): Promise<LoadedMetadata> {
  try {
    return await scan(io, opts);
  } catch (e) {
    if (e instanceof LoadFailure) throw e.error;
    throw e;
  }
}

/** Like loadSpare but never throws: for `remapctl inspect`. */
export async function inspectSpare(io: MetaIO, opts: LoadOptions = {}): Promise<InspectResult> {
  try {
    return { ok: true, metadata: await scan(io, opts) };
  } catch (e) {
    if (e instanceof LoadFailure) return { ok: false, error: e.error, copies: e.copies, warnings: e.warnings };
    const err = e instanceof RemapError ? e : new RemapError(errnoOf(e), `inspect of ${io.describe()} failed: ${reasonOf(e)}`, { device: io.describe() });
    return { ok: false, error: err, copies: [], warnings: [] };
  }
}

function superblocksFor(identity: Identity, layout: Layout): [Uint8Array, Uint8Array] {
  return [0, 1].map((c) => encodeSuperblock({ version: FORMAT_VERSION, copyIndex: c as 0 | 1, identity, layout })) as [Uint8Array, Uint8Array];
}

async function writeZeros(io: MetaIO, offset: number, length: number): Promise<void> {
  const zero = new Uint8Array(Math.min(length, CHUNK));
  for (let done = 0; done < length; done += zero.length) await io.write(offset + done, zero.subarray(0, Math.min(zero.length, length - done)));
}

/**
 * What an unforced format would find in the way: superblocks (valid or
 * corrupt) and corrupt markers at the superblock positions, a checkpoint
 * block at copy 0's slot 0 that no interrupted format there wrote, markers
 * of a forced format. `markers`: the valid format-in-progress markers.
 */
async function probeArea(io: MetaIO, layout: Layout): Promise<{ found: string[]; markers: FormatMarker[] }> {
  const found: string[] = [];
  const markers: FormatMarker[] = [];
  const seen = new Set<number>();
  for (const off of [layout.copies[0].superblock, layout.copies[1].superblock, floor4k(io.sizeBytes) - META_BLOCK]) {
    if (off < 0 || off + META_BLOCK > io.sizeBytes || seen.has(off)) continue;
    seen.add(off);
    const buf = await io.read(off, META_BLOCK);
    const r = decodeSlot(buf, off);
    if (r.status === 'valid') found.push(`superblock at ${off} (valid, device ${r.sb.identity.deviceUuid})`);
    else if (r.status === 'corrupt') found.push(`${hasMagic(buf, SB_MAGIC) ? 'superblock' : 'format-in-progress marker'} at ${off} (corrupt: ${r.reason})`);
    else if ('marker' in r) markers.push(r.marker);
  }
  const ckAt = layout.copies[0].checkpointSlots[0];
  if (ckAt + META_BLOCK <= io.sizeBytes) {
    const ck = await io.read(ckAt, META_BLOCK);
    if (hasMagic(ck, CHECKPOINT_MAGIC)) {
      const v = markers.length > 0 ? interruptedVerdict(markers, ck, ckAt) : undefined;
      if (v === undefined) found.push(`checkpoint block at ${ckAt}`);
      else if (!v.redoable) found.push(`checkpoint block at ${ckAt}; interrupted format: ${v.why}`);
    }
  }
  if (found.length === 0 && markers.length > 0) {
    const v = interruptedVerdict(markers, undefined, ckAt);
    if (!v.redoable) found.push(`${describeMarker(newestMarker(markers))}; ${v.why}`);
  }
  return { found, markers };
}

/**
 * Formats a spare area: both superblocks, an empty checkpoint (seq 0) in
 * slot 0 of both copies, zeroed slot 1 header and journals. Refuses with
 * EEXIST when metadata (valid or magic-bearing) is already there, unless
 * `force`. An area holding only what an interrupted unforced format left
 * (format-in-progress markers and its own structures) is formatted again
 * without force (`onRedo` is told).
 */
export async function formatSpare(io: MetaIO, opts: FormatOptions): Promise<Layout> {
  const dev = io.describe();
  const layout = computeLayout(opts.areaOffset, opts.areaBytes, opts.blockSize, { journalBytes: opts.journalBytes, maxPending: opts.maxPending });
  const areaEnd = layout.areaOffset + layout.areaBytes;
  if (areaEnd > io.sizeBytes)
    throw new RemapError(ERRNO.EINVAL, `spare area ${layout.areaOffset}..${areaEnd} extends beyond the end of ${dev} (size ${io.sizeBytes})`, { device: dev, op: 'metadata-format' });
  const main: MainIdentity = { ...opts.identity.main };
  const identity: Identity = {
    deviceUuid: opts.identity.deviceUuid ?? randomUUID(),
    blockSize: opts.blockSize,
    main,
    createdAtMs: opts.identity.createdAtMs ?? Date.now(),
  };
  if (opts.identity.name !== undefined) identity.name = opts.identity.name;
  const sbs = superblocksFor(identity, layout); // validates identity before anything is written

  // A forced format over existing metadata says so in its markers: if it is
  // interrupted, only a forced format may redo it (the old metadata is gone,
  // but an unforced format must not be the one that finishes replacing it).
  let replacing = false;
  let redo = false;
  if (!opts.force) {
    const { found, markers } = await probeArea(io, layout);
    if (found.length > 0)
      throw new RemapError(ERRNO.EEXIST, `${dev} already holds dm-remapd metadata (${[...new Set(found)].join('; ')}); refusing to format it without force`, {
        device: dev,
        op: 'metadata-format',
      });
    if (markers.length > 0) {
      redo = true;
      const m = newestMarker(markers);
      opts.onRedo?.(`${dev}: redoing an interrupted format (started at ${new Date(m.startedAtMs).toISOString()}, device uuid ${m.deviceUuid}) as device uuid ${identity.deviceUuid}`, m);
    }
  } else {
    try {
      const { found, markers } = await probeArea(io, layout);
      replacing = found.length > 0;
      redo = !replacing && markers.length > 0;
    } catch {
      replacing = true; // unreadable: assume there was something
    }
  }

  // 0. A redo first removes the interrupted format's checkpoint block: once
  // the new markers replace the old ones, nothing would tie it to a format
  // that may be redone (and a crash right then would need force).
  const zeroBlock = new Uint8Array(META_BLOCK);
  if (redo) {
    await io.write(layout.copies[0].checkpointSlots[0], zeroBlock);
    await io.sync();
  }

  // 1. Format-in-progress markers over both superblocks: a crash mid-format
  // never leaves a valid superblock over new structures, and the next load
  // (or unforced format) tells an interrupted format from a wiped area.
  const startedAtMs = Date.now();
  for (const c of [0, 1] as const)
    await io.write(
      layout.copies[c].superblock,
      encodeFormatMarker({
        copyIndex: c,
        deviceUuid: identity.deviceUuid,
        startedAtMs,
        formatVersion: FORMAT_VERSION,
        replacing,
        areaOffset: layout.areaOffset,
        areaBytes: layout.areaBytes,
      }),
    );
  await io.sync();
  // 2. Structures.
  const formatId = formatIdOf(identity.deviceUuid);
  const ckpt = encodeBlocks(CHECKPOINT_MAGIC, formatId, 0, []);
  for (const c of [0, 1] as const) {
    await io.write(layout.copies[c].checkpointSlots[0], ckpt);
    await io.write(layout.copies[c].checkpointSlots[1], zeroBlock);
    await writeZeros(io, layout.copies[c].journal, layout.journalBlocks * META_BLOCK);
  }
  await io.sync();
  // 3. Superblocks last.
  for (const c of [0, 1] as const) await io.write(layout.copies[c].superblock, sbs[c]);
  await io.sync();
  return layout;
}

/**
 * Rewrites damaged copies from the loaded state: a fresh checkpoint of the
 * reduced state (seq = highest seq found, so it covers every torn commit) in
 * the older slot of both copies, then both superblocks. Returns the reloaded
 * metadata. Does nothing when both copies are whole and `force` is not set.
 */
export async function repairSpare(io: MetaIO, opts: LoadOptions & { force?: boolean } = {}): Promise<LoadedMetadata> {
  const m = await loadSpare(io, opts);
  if (!opts.force && m.copies.every((c) => c.valid)) return m;
  const recs = [...stateToRecords(reduce(m.records))];
  if (recs.length > m.layout.checkpointCapacity)
    throw new RemapError(ERRNO.ENOSPC, `state of ${recs.length} records exceeds the checkpoint capacity ${m.layout.checkpointCapacity}`, { device: m.device, op: 'metadata-repair' });
  const slot = (1 - m.checkpoint.slot) as 0 | 1;
  const blocks = encodeBlocks(CHECKPOINT_MAGIC, formatIdOf(m.identity.deviceUuid), m.seq, recs);
  for (const c of [0, 1] as const) await io.write(m.layout.copies[c].checkpointSlots[slot], blocks);
  await io.sync();
  const sbs = superblocksFor(m.identity, m.layout);
  for (const c of [0, 1] as const) await io.write(m.layout.copies[c].superblock, sbs[c]);
  await io.sync();
  return loadSpare(io, { areaOffset: m.layout.areaOffset, areaBytes: m.layout.areaBytes });
}
