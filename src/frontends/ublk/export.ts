/**
 * The daemon's ublk export of a device (DeviceManager, spec.ublk): the
 * device's record under the state folder (record.ts) lets a restarted daemon
 * recover the /dev/ublkbN of a crashed or stopped one, or delete it.
 *
 * Closing: `remove` deletes the device (STOP_DEV, DEL_DEV) and its record.
 * Daemon stop (`shutdown`) on a device with USER_RECOVERY leaves it to the
 * next daemon (suspend: the kernel holds its requests, a mounted filesystem
 * keeps its device) unless DM_REMAPD_UBLK_STOP=remove; a device without
 * USER_RECOVERY is deleted (docs/UBLK.md, "Daemon stop").
 */
import type { Logger } from 'pino';
import type { BlockEngine } from '../../engine/engine.js';
import type { DeviceSpec } from '../../daemon/state.js';
import { attachUblkDevice, deleteRecordedUblk, type UblkAttachment } from './attach.js';
import { UblkRecordStore } from './record.js';

export interface UblkExport {
  readonly endpoints: string[];
  readonly attachment: UblkAttachment;
  connectionCount(): number;
  close(deadlineMs: number, reason?: 'remove' | 'shutdown'): Promise<{ connectionsClosed: number }>;
}

export async function startUblkExport(engine: BlockEngine, spec: DeviceSpec, logger: Logger, ctx?: { stateDir?: string }): Promise<UblkExport> {
  const log = logger.child({ device: spec.name });
  const store = ctx?.stateDir === undefined ? null : new UblkRecordStore(ctx.stateDir);
  let previous = null;
  if (store !== null) {
    const l = await store.load(spec.name);
    if (l.error !== undefined) log.warn({ event: 'ublk-record-unreadable', error: l.error }, `${spec.name}: ignoring the ublk record: ${l.error}`);
    previous = l.record;
  }
  const a = await attachUblkDevice(engine, {
    readOnly: spec.readOnly,
    logger: log,
    previous,
    onRecord: store === null ? undefined : (r) => (r === null ? store.remove(spec.name) : store.save(spec.name, r)),
  });
  return {
    endpoints: [a.device],
    attachment: a,
    connectionCount: () => 1,
    close: async (ms, reason) => {
      if (reason === 'shutdown' && a.recoverable && process.env.DM_REMAPD_UBLK_STOP !== 'remove') {
        await a.suspend(ms);
      } else {
        await a.detach(ms);
      }
      return { connectionsClosed: 0 };
    },
  };
}

/**
 * `remapctl remove` of a device that was never assembled (its engine could
 * not be opened): deletes the ublk device an earlier daemon left for it
 * (quiesced, or stopped with its /dev/ublkcN), and the record.
 */
export async function dropUblkRecord(stateDir: string, name: string, logger: Logger): Promise<void> {
  const store = new UblkRecordStore(stateDir);
  const { record } = await store.load(name);
  if (record === null) return;
  if (await deleteRecordedUblk(record, logger.child({ device: name }), name)) await store.remove(name);
}
