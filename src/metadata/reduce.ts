import { RecordType, type MetaRecord } from './records.js';

export interface RemapEntry {
  spare: number;
  dataCrc: number;
}

/** The state a record stream describes. Reference model for the engine and the tests. */
export interface MetaState {
  remaps: Map<number, RemapEntry>;
  pending: Set<number>;
  badSpare: Set<number>;
  quarantined: Set<number>;
  /** Extra spares of the pool by ordinal (1, 2, ...): block count and label CRC32C. */
  spares: Map<number, { blocks: number; labelCrc: number }>;
}

export function emptyState(): MetaState {
  return { remaps: new Map(), pending: new Set(), badSpare: new Set(), quarantined: new Set(), spares: new Map() };
}

/** Applies one record. Every record overwrites keys, so replaying a suffix of the stream over a state that already contains part of it is harmless. */
export function applyRecord(s: MetaState, r: MetaRecord): void {
  switch (r.type) {
    case RecordType.REMAP:
      s.remaps.set(r.logical, { spare: r.spare, dataCrc: r.dataCrc });
      s.pending.delete(r.logical);
      break;
    case RecordType.PENDING_ADD:
      s.pending.add(r.logical);
      break;
    case RecordType.PENDING_CLEAR:
      s.pending.delete(r.logical);
      break;
    case RecordType.SPARE_BAD:
      s.badSpare.add(r.spare);
      break;
    case RecordType.QUARANTINE:
      s.quarantined.add(r.spare);
      break;
    case RecordType.UNMAP:
      s.remaps.delete(r.logical);
      break;
    case RecordType.SPARE_ADD:
      s.spares.set(r.logical, { blocks: r.spare, labelCrc: r.dataCrc });
      break;
  }
}

export function reduce(records: Iterable<MetaRecord>, into: MetaState = emptyState()): MetaState {
  for (const r of records) applyRecord(into, r);
  return into;
}

/**
 * The state as a record stream (what a checkpoint stores): extra spares,
 * remaps, then pending, bad and quarantined spare blocks, each in ascending
 * order. Built
 * eagerly, so it is a point-in-time view that later changes to `s` do not
 * touch (the writer consumes a snapshot over several macrotasks).
 */
export function stateToRecords(s: MetaState): MetaRecord[] {
  const out: MetaRecord[] = [];
  for (const k of [...s.spares.keys()].sort((a, b) => a - b)) {
    const sp = s.spares.get(k) as { blocks: number; labelCrc: number };
    out.push({ type: RecordType.SPARE_ADD, logical: k, spare: sp.blocks, dataCrc: sp.labelCrc });
  }
  for (const k of [...s.remaps.keys()].sort((a, b) => a - b)) {
    const e = s.remaps.get(k) as RemapEntry;
    out.push({ type: RecordType.REMAP, logical: k, spare: e.spare, dataCrc: e.dataCrc });
  }
  for (const k of [...s.pending].sort((a, b) => a - b)) out.push({ type: RecordType.PENDING_ADD, logical: k, spare: 0, dataCrc: 0 });
  for (const k of [...s.badSpare].sort((a, b) => a - b)) out.push({ type: RecordType.SPARE_BAD, logical: 0, spare: k, dataCrc: 0 });
  for (const k of [...s.quarantined].sort((a, b) => a - b)) out.push({ type: RecordType.QUARANTINE, logical: 0, spare: k, dataCrc: 0 });
  return out;
}

/** Spare blocks that more than one logical block maps to (must be empty for a sane table). */
export function doubleMappedSpares(s: MetaState): number[] {
  const seen = new Set<number>();
  const dup = new Set<number>();
  for (const e of s.remaps.values()) {
    if (seen.has(e.spare)) dup.add(e.spare);
    seen.add(e.spare);
  }
  return [...dup].sort((a, b) => a - b);
}

export function statesEqual(a: MetaState, b: MetaState): boolean {
  const setEq = (x: Set<number>, y: Set<number>): boolean => x.size === y.size && [...x].every((k) => y.has(k));
  if (a.remaps.size !== b.remaps.size) return false;
  for (const [k, e] of a.remaps) {
    const f = b.remaps.get(k);
    if (!f || f.spare !== e.spare || f.dataCrc !== e.dataCrc) return false;
  }
  if (a.spares.size !== b.spares.size) return false;
  for (const [k, sp] of a.spares) {
    const o = b.spares.get(k);
    if (!o || o.blocks !== sp.blocks || o.labelCrc !== sp.labelCrc) return false;
  }
  return setEq(a.pending, b.pending) && setEq(a.badSpare, b.badSpare) && setEq(a.quarantined, b.quarantined);
}
