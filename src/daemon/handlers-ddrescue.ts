/**
 * Control commands behind `remapctl export/import --ddrescue` (issue 6). The
 * mapfile itself is read and written by remapctl, as the operator: the
 * daemon only hands out and takes block ranges.
 *
 *   ddrescue-export {name} -> {name, sizeBytes, blockSize, blocks, remapped, pending}
 *     remapped/pending: sorted, merged [firstBlock, count] ranges
 *   ddrescue-import {name, ranges: [[firstBlock, count], ...]} -> ImportReport
 *     every block of the ranges is remapped by hand (its data copied while
 *     readable; an unreadable block becomes pending)
 */
import type { CommandHandler } from './control.js';
import type { DeviceManager } from './devices.js';
import { ControlError, argString } from './protocol.js';
import { RecordType } from '../metadata/records.js';
import type { ManualRemapResult } from '../engine/engine.js';

export type BlockRange = [first: number, count: number];

export interface ExportAnswer {
  name: string;
  sizeBytes: number;
  blockSize: number;
  blocks: number;
  remapped: BlockRange[];
  pending: BlockRange[];
}

export interface ImportRangeReport {
  first: number;
  count: number;
  remapped: number;
  alreadyRemapped: number;
  pending: number;
  failed: number;
  /** The blocks that were not remapped (pending or failed), with why. */
  problems: Array<Exclude<ManualRemapResult, { result: 'remapped' | 'already-remapped' }>>;
}

export interface ImportAnswer {
  name: string;
  blockSize: number;
  blocks: number;
  remapped: number;
  alreadyRemapped: number;
  pending: number;
  failed: number;
  ranges: ImportRangeReport[];
}

/** Most blocks one import may touch (as for `remap`). */
export const MAX_IMPORT_BLOCKS = 1_000_000;

function toRanges(sorted: ArrayLike<number>): BlockRange[] {
  const out: BlockRange[] = [];
  for (let i = 0; i < sorted.length; i++) {
    const b = sorted[i];
    const last = out[out.length - 1];
    if (last !== undefined && last[0] + last[1] === b) last[1]++;
    else if (last === undefined || b >= last[0] + last[1]) out.push([b, 1]);
  }
  return out;
}

function argRanges(args: Record<string, unknown>, blocks: number, name: string): BlockRange[] {
  const v = args.ranges;
  if (!Array.isArray(v) || v.length === 0) throw new ControlError('BAD_REQUEST', 'ddrescue-import: argument "ranges" must be a non-empty array of [firstBlock, count]');
  let total = 0;
  const out: BlockRange[] = [];
  for (const r of v) {
    if (!Array.isArray(r) || r.length !== 2 || !r.every((x) => typeof x === 'number' && Number.isSafeInteger(x) && x >= 0) || (r[1] as number) < 1) {
      throw new ControlError('BAD_REQUEST', `ddrescue-import: argument "ranges": ${JSON.stringify(r)} is not [firstBlock, count] with count >= 1`);
    }
    const [first, count] = r as [number, number];
    if (first + count > blocks) {
      throw new ControlError('INVALID_ARGUMENT', `ddrescue-import: blocks ${first}..${first + count - 1} are outside device "${name}" (blocks 0..${blocks - 1})`);
    }
    total += count;
    if (total > MAX_IMPORT_BLOCKS) throw new ControlError('INVALID_ARGUMENT', `ddrescue-import: more than ${MAX_IMPORT_BLOCKS} blocks in one import on device "${name}"`);
    out.push([first, count]);
  }
  return out;
}

export function ddrescueHandlers(mgr: DeviceManager): Record<string, CommandHandler> {
  return {
    'ddrescue-export': async (args) => {
      const name = argString('ddrescue-export', args, 'name');
      const engine = mgr.runningEngine(name, 'export its remapped blocks');
      const remapped: number[] = [];
      const pending: number[] = [];
      for (const r of engine.snapshotRecords()) {
        if (r.type === RecordType.REMAP) remapped.push(r.logical);
        else if (r.type === RecordType.PENDING_ADD) pending.push(r.logical);
      }
      const answer: ExportAnswer = {
        name, sizeBytes: engine.sizeBytes, blockSize: engine.blockSize, blocks: engine.blocks,
        remapped: toRanges(Float64Array.from(remapped).sort()), pending: toRanges(Float64Array.from(pending).sort()),
      };
      return answer;
    },
    'ddrescue-import': async (args) => {
      const name = argString('ddrescue-import', args, 'name');
      const engine = mgr.runningEngine(name, 'import a ddrescue mapfile');
      const ranges = argRanges(args, engine.blocks, name);
      const blocks: number[] = [];
      for (const [first, count] of ranges) for (let b = first; b < first + count; b++) blocks.push(b);
      const results = await engine.remapBlocks(blocks);
      const answer: ImportAnswer = { name, blockSize: engine.blockSize, blocks: blocks.length, remapped: 0, alreadyRemapped: 0, pending: 0, failed: 0, ranges: [] };
      let i = 0;
      for (const [first, count] of ranges) {
        const rr: ImportRangeReport = { first, count, remapped: 0, alreadyRemapped: 0, pending: 0, failed: 0, problems: [] };
        for (let k = 0; k < count; k++, i++) {
          const r = results[i];
          if (r.result === 'remapped') rr.remapped++;
          else if (r.result === 'already-remapped') rr.alreadyRemapped++;
          else {
            if (r.result === 'pending') rr.pending++;
            else rr.failed++;
            rr.problems.push(r);
          }
        }
        answer.remapped += rr.remapped;
        answer.alreadyRemapped += rr.alreadyRemapped;
        answer.pending += rr.pending;
        answer.failed += rr.failed;
        answer.ranges.push(rr);
      }
      return answer;
    },
  };
}
