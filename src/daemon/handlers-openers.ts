/**
 * Openers of a device's kernel block devices (/dev/ublkbN, /dev/nbdN):
 *
 *   openers {name} -> OpenersAnswer
 *
 * The same list `remove` checks before it detaches a kernel device: a device
 * that is mounted (in any mount namespace), open by a process, held by a
 * stacked device (device-mapper) or used as swap is refused with BUSY naming
 * them, unless `force` (src/daemon/openers.ts, docs/OPERATION.md "Openers").
 */
import type { CommandHandler } from './control.js';
import type { DeviceManager } from './devices.js';
import { ControlError, argString } from './protocol.js';
import { describeOpeners, findOpeners, kernelDevices, type Opener } from './openers.js';

export interface OpenersAnswer {
  name: string;
  /** The kernel block devices checked. */
  devices: string[];
  openers: Opener[];
}

export async function openersOf(mgr: DeviceManager, name: string): Promise<OpenersAnswer> {
  const devices = kernelDevices(mgr.status(name).exports);
  return { name, devices, openers: devices.length === 0 ? [] : await findOpeners(devices) };
}

/** remove's check (without force): BUSY naming every opener. */
export async function refuseRemoveIfOpen(mgr: DeviceManager, name: string): Promise<void> {
  const r = await openersOf(mgr, name);
  if (r.openers.length === 0) return;
  throw new ControlError('BUSY', `device "${name}" is in use: ${describeOpeners(r.openers)}; `
    + 'remove refused: unmount or close it first, or remove --force (its users then get I/O errors)');
}

export function openersHandlers(mgr: DeviceManager): Record<string, CommandHandler> {
  return {
    openers: async (args) => {
      const name = argString('openers', args, 'name');
      return openersOf(mgr, name);
    },
  };
}
