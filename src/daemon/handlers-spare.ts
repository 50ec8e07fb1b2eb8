/**
 * Spare pool (issue 6):
 *
 *   spareAdd  {name, path, format?} -> SpareAddAnswer
 *   spareList {name}                -> SpareListAnswer
 *
 * spareAdd labels `path` as the device's next extra spare (a blank one only
 * with `format`), commits it to the metadata and lets the allocator use it,
 * online. Refusals: the path belongs to a device (BUSY), it carries the
 * label of another device or dm-remapd metadata (IDENTITY_MISMATCH), a
 * damaged label (CORRUPT_METADATA), no label without `format`
 * (NO_METADATA), it does not exist (NOT_FOUND), it is too small
 * (INVALID_ARGUMENT).
 */
import type { CommandHandler } from './control.js';
import type { DeviceManager } from './devices.js';
import { ControlError, argBool, argString } from './protocol.js';
import { ERRNO, RemapError } from '../errors.js';
import type { SpareInfo } from '../engine/spare-pool.js';

export interface SpareListAnswer {
  name: string;
  /** Spare 0 is the primary (it holds the metadata); extra spares follow in the order they were added. */
  spares: SpareInfo[];
  spareBlocksTotal: number;
  spareBlocksUsed: number;
  /** More extra spare blocks the metadata can describe (pool reserve at format); null: unlimited. */
  roomBlocks: number | null;
}

export interface SpareAddAnswer extends SpareListAnswer {
  /** The spare just added. */
  added: SpareInfo;
}

function listOf(mgr: DeviceManager, name: string, what: string): SpareListAnswer {
  const engine = mgr.runningEngine(name, what);
  const s = engine.status();
  return { name, spares: engine.spareInfo(), spareBlocksTotal: s.spareBlocksTotal, spareBlocksUsed: s.spareBlocksUsed, roomBlocks: engine.spareRoom() };
}

export function spareHandlers(mgr: DeviceManager): Record<string, CommandHandler> {
  return {
    spareAdd: async (args) => {
      const name = argString('spareAdd', args, 'name');
      const path = argString('spareAdd', args, 'path');
      const format = argBool('spareAdd', args, 'format') === true;
      let added: SpareInfo;
      try {
        added = await mgr.addSpare(name, path, format);
      } catch (err) {
        if (err instanceof RemapError && err.errno === ERRNO.EEXIST) throw new ControlError('IDENTITY_MISMATCH', err.message, err.errno);
        if (err instanceof RemapError && err.errno === ERRNO.ENOSPC) throw new ControlError('INVALID_ARGUMENT', err.message, err.errno);
        throw err;
      }
      const answer: SpareAddAnswer = { ...listOf(mgr, name, 'list its spares'), added };
      return answer;
    },
    spareList: async (args) => {
      const name = argString('spareList', args, 'name');
      return listOf(mgr, name, 'list its spares');
    },
  };
}
