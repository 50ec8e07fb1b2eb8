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
import { ERRNO, RemapError } from '../../errors.js';
import { UBLK_DEFAULT_DEPTH, UBLK_DEFAULT_QUEUES, UBLK_MAX_DEPTH, UBLK_MAX_QUEUES, type DeviceSpec } from '../../daemon/state.js';
import type { UblkStatus } from '../../daemon/devices.js';
import { attachUblkDevice, deleteRecordedUblk, type UblkAttachment } from './attach.js';
import { UblkRecordStore } from './record.js';

export interface UblkExport {
  readonly endpoints: string[];
  readonly ublk: UblkStatus;
  readonly attachment: UblkAttachment;
  connectionCount(): number;
  close(deadlineMs: number, reason?: 'remove' | 'shutdown'): Promise<{ connectionsClosed: number }>;
}

/** At most this many tags in all (1 GiB of per-tag buffers). */
const UBLK_MAX_TAGS = 2048;

/** spec.ublkQueues / spec.ublkDepth (devices.json may have been edited by hand): the value, its default, or EINVAL naming it. */
function specInt(spec: DeviceSpec, key: 'ublkQueues' | 'ublkDepth', dflt: number, max: number): number {
  const v: unknown = spec[key];
  if (v === undefined) return dflt;
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 1 || v > max) {
    throw new RemapError(ERRNO.EINVAL, `device spec "${key}" must be an integer in 1..${max}, got ${JSON.stringify(v)}`, { device: spec.name, op: 'ublk-attach' });
  }
  return v;
}

export async function startUblkExport(engine: BlockEngine, spec: DeviceSpec, logger: Logger, ctx?: { stateDir?: string }): Promise<UblkExport> {
  const log = logger.child({ device: spec.name });
  const queues = specInt(spec, 'ublkQueues', UBLK_DEFAULT_QUEUES, UBLK_MAX_QUEUES);
  const depth = specInt(spec, 'ublkDepth', UBLK_DEFAULT_DEPTH, UBLK_MAX_DEPTH);
  // Every tag holds a buffer of the largest request (512 KiB), resident from the start.
  if (queues * depth > UBLK_MAX_TAGS) {
    throw new RemapError(ERRNO.EINVAL, `ublk queues x depth must be at most ${UBLK_MAX_TAGS} (each tag holds a 512 KiB buffer), got ${queues} x ${depth} `
      + `= ${queues * depth} tags, ${(queues * depth) / 2} MiB`, { device: spec.name, op: 'ublk-attach' });
  }
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
    queues,
    depth,
    previous,
    onRecord: store === null ? undefined : (r) => (r === null ? store.remove(spec.name) : store.save(spec.name, r)),
  });
  if (a.queues !== queues || a.depth !== depth) {
    // Recovered: the kernel keeps the device's queues. Added: it caps the queues at its CPU count.
    log.info({ event: 'ublk-queues-differ', ublkDevice: a.device, queuesAsked: queues, depthAsked: depth, queues: a.queues, depth: a.depth, recovered: a.recovered },
      `${spec.name}: ${a.device} has ${a.queues} queue(s) of depth ${a.depth}, not the ${queues} x ${depth} asked for `
      + `(${a.recovered ? 'a recovered device keeps its queues' : 'the kernel chose'})`);
  }
  return {
    endpoints: [a.device],
    ublk: { device: a.device, queues: a.queues, depth: a.depth },
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
