/**
 * Control command `importDmr4` (docs/DMR4.md): creates a device from an old
 * spare of the kernel dm-remap target. The old spare is decoded first (a
 * missing or unusable one fails before anything is created); then the device
 * is added as by `add`, and filled before its exports start.
 */
import { stat } from 'node:fs/promises';
import { isAbsolute } from 'node:path';
import type { CommandHandler } from './control.js';
import type { DeviceManager, DeviceSpec, DeviceStatus } from './devices.js';
import { ControlError, argString, codeForErrno } from './protocol.js';
import { Dmr4Error, jsonSafe } from '../migrate/dmr4.js';
import { importDmr4Into, readDmr4Spare, type Dmr4ImportReport } from '../migrate/dmr4-import.js';

export interface ImportDmr4Result {
  device: DeviceStatus;
  import: Dmr4ImportReport;
}

/** The old spare's decode failure as a protocol error (exit code 7 in remapctl). */
function asControlError(err: unknown, from: string): unknown {
  if (err instanceof Dmr4Error) return new ControlError(codeForErrno(err.errno), `old spare ${from}: ${err.message}`, err.errno);
  return err;
}

/** The same file or block device (through any path)? A path that cannot be stat'ed is left to the open that follows. */
async function sameDevice(a: string, b: string): Promise<boolean> {
  try {
    const [x, y] = await Promise.all([stat(a), stat(b)]);
    if (x.isBlockDevice() || y.isBlockDevice()) return x.isBlockDevice() && y.isBlockDevice() && x.rdev === y.rdev;
    return x.dev === y.dev && x.ino === y.ino;
  } catch {
    return false;
  }
}

/**
 * `specFromArgs` is the daemon's own parser of add's arguments (main.ts),
 * so that import-dmr4 takes exactly the same device and export arguments.
 */
export function dmr4Handlers(mgr: DeviceManager, specFromArgs: (args: Record<string, unknown>) => { spec: DeviceSpec; format: boolean }): Record<string, CommandHandler> {
  return {
    importDmr4: async (args) => {
      const from = argString('importDmr4', args, 'from');
      if (!isAbsolute(from)) throw new ControlError('BAD_REQUEST', `importDmr4: argument "from" must be an absolute path, got "${from}"`);
      const rest = { ...args };
      delete rest.from;
      const { spec, format } = specFromArgs(rest);
      const img = await readDmr4Spare(from).catch((err: unknown) => { throw asControlError(err, from); });
      // Formatting the new spare (or a tail of main) over the old spare would
      // destroy the very sectors being imported.
      for (const [role, p] of [['spare', spec.spare], ['main', spec.spareTailBytes !== undefined ? spec.main : undefined]] as const) {
        if (p !== undefined && await sameDevice(p, from)) {
          throw new ControlError('INVALID_ARGUMENT', `importDmr4 ${spec.name}: the new ${role === 'spare' ? 'spare' : 'spare tail (on main)'} ${p} is the old spare ${from}; `
            + 'formatting it would overwrite the data being imported: give a separate new spare');
        }
      }
      let report: Dmr4ImportReport | null = null;
      const log = mgr.logger.child({ device: spec.name });
      // The engine also logs each imported block (event remap) and the lost
      // ones (event mark-lost); the daemon logs the add.
      const device = await mgr.add(spec, {
        format,
        beforeExport: async (engine) => {
          const r = await importDmr4Into(engine, img, from, spec.main);
          report = r;
          log.warn({
            event: 'import-dmr4', from, copy: r.chosenCopy, seq: String(r.seq), entries: r.entries, dataBlocks: r.dataBlocks.length,
            sectors: r.sectorsImported, pendingBlocks: r.pendingBlocks.map((p) => p.block), outsideEntries: r.outsideEntries,
          }, `imported ${r.sectorsImported} sector(s) of ${from} into ${r.dataBlocks.length} block(s); `
            + `${r.pendingBlocks.length} block(s) lost (unreadable until rewritten)${r.outsideEntries.length > 0 ? `; ${r.outsideEntries.length} entries outside the device` : ''}`);
        },
      });
      if (report === null) throw new ControlError('INTERNAL', `importDmr4 ${spec.name}: the device was added without running the import`);
      return { device, import: jsonSafe(report) };
    },
  };
}
