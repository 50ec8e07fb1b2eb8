/**
 * ublk frontend: serves a BlockEngine as /dev/ublkbN (docs/UBLK.md).
 *
 * Control commands run on the native control thread; every queue has its
 * own native thread and ring. Fetched requests reach JS in batches (one
 * call per wake-up); each goes through engine.submitCb, the same path as
 * NBD (remaps, error policy, durability), and the results go back to the
 * queue threads in one native call per microtask.
 */
import type { Logger } from 'pino';
import type { BlockEngine, EngineOp, EngineRequest } from '../../engine/engine.js';
import { ERRNO, RemapError } from '../../errors.js';
import { allocAligned } from '../../native/backing.js';
import {
  UBLK_ATTR, UBLK_BATCH_STRIDE, UBLK_F, UBLK_IO_FLAG_FUA, UBLK_IO_OP, UblkCtrlOp, UblkNative,
} from '../../native/ublk.js';

export interface UblkOptions {
  logger: Logger;
  readOnly?: boolean;
  /** Hardware queues (1). */
  queues?: number;
  /** Tags per queue (128). */
  depth?: number;
  /** Largest request in bytes, also the per-tag buffer size (512 KiB). */
  maxIoBytes?: number;
  /** Timeout of each control command in ms (10000). */
  ctrlTimeoutMs?: number;
  /** 'auto' (USER_COPY when offered) or 'buffers' (per-tag buffers). */
  copy?: 'auto' | 'buffers';
  /** Ask for USER_RECOVERY(_REISSUE) when offered (true). */
  recovery?: boolean;
}

export interface UblkAttachment {
  /** '/dev/ublkbN'. */
  readonly device: string;
  readonly devId: number;
  readonly features: number;
  readonly flags: number;
  readonly userCopy: boolean;
  /** Requests handed to the engine and not answered yet. */
  inFlight(): number;
  stats(): { fetched: number; committed: number; ioFlusher: number };
  /** STOP_DEV, join the queue threads, DEL_DEV, within deadlineMs (plus the control timeouts' floor). */
  detach(deadlineMs: number): Promise<{ requestsFailed: number; elapsedMs: number }>;
}

const DISCARD_MAX_BYTES = 64 * 1024 * 1024;

function log2(n: number): number {
  return Math.round(Math.log2(n));
}

/** Serves `engine` as a new /dev/ublkbN; resolves once START_DEV returned. */
export async function attachUblkDevice(engine: BlockEngine, o: UblkOptions): Promise<UblkAttachment> {
  const log = o.logger.child({ component: 'ublk' });
  const name = engine.name;
  const bs = engine.blockSize;
  if (bs < 512 || bs > 4096 || (bs & (bs - 1)) !== 0) {
    throw new RemapError(ERRNO.EINVAL, `ublk needs a block size of 512..4096, the engine has ${bs}`, { device: name, op: 'ublk-attach' });
  }
  const t = o.ctrlTimeoutMs ?? 10_000;
  const envCopy = process.env.DM_REMAPD_UBLK_COPY;
  const copy = o.copy ?? (envCopy === 'buffers' ? 'buffers' : 'auto');
  const recovery = o.recovery ?? process.env.DM_REMAPD_UBLK_RECOVERY !== '0';

  // Filled after startQueues; onIo is only called after that.
  let bufs: Buffer[] = [];
  let batch = new Float64Array(0);
  let maxIo = 0;
  let depth = 0;
  const inflight = new Map<number, boolean>(); // key q << 16 | tag -> answered early
  let out = new Float64Array(0);
  let outCount = 0;
  let flushQueued = false;
  let closed = false;

  const flush = (): void => {
    flushQueued = false;
    if (outCount === 0 || closed) return;
    const n = outCount;
    outCount = 0;
    native.complete(out, n);
  };
  const answer = (q: number, tag: number, res: number): void => {
    const i = outCount++;
    out[i * 3] = q;
    out[i * 3 + 1] = tag;
    out[i * 3 + 2] = res;
    if (!flushQueued) {
      flushQueued = true;
      queueMicrotask(flush);
    }
  };

  const onIo = (count: number): void => {
    for (let i = 0; i < count; i++) {
      const b = i * UBLK_BATCH_STRIDE;
      const q = batch[b];
      const tag = batch[b + 1];
      const op = batch[b + 2];
      const flags = batch[b + 3];
      const offset = batch[b + 4] * 512;
      const length = batch[b + 5] * 512;
      let eop: EngineOp;
      switch (op) {
        case UBLK_IO_OP.READ: eop = 'read'; break;
        case UBLK_IO_OP.WRITE: eop = 'write'; break;
        case UBLK_IO_OP.FLUSH: eop = 'flush'; break;
        case UBLK_IO_OP.DISCARD: eop = 'discard'; break;
        case UBLK_IO_OP.WRITE_ZEROES: eop = 'writeZeroes'; break;
        default:
          answer(q, tag, -ERRNO.EOPNOTSUPP);
          continue;
      }
      const req: EngineRequest = { op: eop, offset, length };
      if (eop === 'read' || eop === 'write') req.buffer = bufs[q].subarray(tag * maxIo, tag * maxIo + length);
      if (eop === 'write' && (flags & UBLK_IO_FLAG_FUA) !== 0) req.fua = true;
      const key = (q << 16) | tag;
      inflight.set(key, false);
      engine.submitCb(req, (err) => {
        const early = inflight.get(key);
        inflight.delete(key);
        if (early !== false) return; // answered at detach already
        answer(q, tag, err === null ? (eop === 'read' || eop === 'write' ? length : 0) : -err.errno);
      });
    }
  };

  const native = new UblkNative(onIo);
  native.open();
  let devId = -1;
  let started = false;
  let queuesStarted = false;
  const cleanup = async (): Promise<void> => {
    if (devId >= 0 && started) await native.ctrlRaw(UblkCtrlOp.STOP, devId, t);
    if (queuesStarted) await native.ctrlRaw(UblkCtrlOp.JOIN_QUEUES, devId, 3000);
    if (devId >= 0) await native.ctrlRaw(UblkCtrlOp.DEL, devId, t);
    closed = true;
    native.close(1000);
  };
  try {
    // GET_FEATURES exists from 6.5; without it: legacy opcodes, no extras.
    const f = await native.ctrlRaw(UblkCtrlOp.FEATURES, -1, t);
    const features = f.res === 0 ? f.out[0] : 0;
    const useIoctl = f.res === 0 && f.out[1] === 1;
    let flags = 0;
    if (copy === 'auto' && (features & UBLK_F.USER_COPY) !== 0) flags |= UBLK_F.USER_COPY;
    if (recovery && (features & UBLK_F.USER_RECOVERY) !== 0) flags |= UBLK_F.USER_RECOVERY;
    if (recovery && (features & UBLK_F.USER_RECOVERY_REISSUE) !== 0) flags |= UBLK_F.USER_RECOVERY_REISSUE;
    const added = await native.ctrl(UblkCtrlOp.ADD, -1, t, [o.queues ?? 1, o.depth ?? 128, o.maxIoBytes ?? 512 * 1024, flags], name);
    devId = added[0];
    const nq = added[1];
    depth = added[2];
    maxIo = Math.floor(added[3] / bs) * bs;
    const gotFlags = added[4];
    const userCopy = (gotFlags & UBLK_F.USER_COPY) !== 0;
    const attrs = UBLK_ATTR.VOLATILE_CACHE | UBLK_ATTR.FUA | (o.readOnly === true || engine.capabilities().readOnly ? UBLK_ATTR.READ_ONLY : 0);
    const readOnly = o.readOnly === true || engine.capabilities().readOnly;
    const discardSectors = readOnly ? 0 : DISCARD_MAX_BYTES / 512;
    await native.ctrl(UblkCtrlOp.SET_PARAMS, devId, t, [
      attrs, log2(bs), log2(bs), maxIo / 512, Math.floor(engine.sizeBytes / 512), discardSectors, discardSectors, bs,
    ], name);
    bufs = [];
    for (let q = 0; q < nq; q++) bufs.push(allocAligned(depth * maxIo, 4096));
    batch = new Float64Array(nq * depth * UBLK_BATCH_STRIDE);
    out = new Float64Array(nq * depth * 3);
    const r = native.startQueues(devId, depth, maxIo, userCopy, useIoctl, batch, bufs);
    queuesStarted = true;
    if (r < 0) throw new RemapError(-r, `cannot start the queue threads of /dev/ublkc${devId}`, { device: name, op: 'ublk-queues' });
    const t0 = Date.now();
    started = true;
    await native.ctrl(UblkCtrlOp.START, devId, t, [], name);
    const device = `/dev/ublkb${devId}`;
    log.info({ event: 'ublk-attached', ublkDevice: device, features, flags: gotFlags, userCopy, useIoctl, queues: nq, depth, maxIo,
      ioFlusher: native.stats().ioFlusher, startMs: Date.now() - t0 }, `${name} attached as ${device}`);

    let detaching: Promise<{ requestsFailed: number; elapsedMs: number }> | null = null;
    const detach = (deadlineMs: number): Promise<{ requestsFailed: number; elapsedMs: number }> => {
      detaching ??= (async () => {
        const t1 = Date.now();
        let requestsFailed = 0;
        // STOP_DEV waits for the requests in flight (del_gendisk): if the
        // engine has not answered them by half the deadline, answer them EIO.
        const timer = setTimeout(() => {
          for (const [key, early] of inflight) {
            if (early) continue;
            inflight.set(key, true);
            requestsFailed++;
            answer(key >>> 16, key & 0xffff, -ERRNO.EIO);
          }
        }, Math.max(0, deadlineMs / 2));
        const stop = await native.ctrlRaw(UblkCtrlOp.STOP, devId, Math.max(1000, deadlineMs));
        clearTimeout(timer);
        if (stop.res < 0) log.warn({ event: 'ublk-stop-failed', errno: -stop.res }, `STOP_DEV of ${device} failed (${-stop.res})`);
        const join = await native.ctrlRaw(UblkCtrlOp.JOIN_QUEUES, devId, 3000);
        if (join.res < 0) log.warn({ event: 'ublk-join-failed', errno: -join.res }, `queue threads of ${device} did not exit (${-join.res})`);
        const del = await native.ctrlRaw(UblkCtrlOp.DEL, devId, Math.max(1000, deadlineMs - (Date.now() - t1)));
        if (del.res < 0) log.warn({ event: 'ublk-del-failed', errno: -del.res }, `DEL_DEV of ${device} failed (${-del.res})`);
        closed = true;
        native.close(1000);
        const elapsedMs = Date.now() - t1;
        log.info({ event: 'ublk-detached', ublkDevice: device, elapsedMs, requestsFailed, ...native.stats() }, `${device} deleted`);
        if (del.res < 0) {
          throw new RemapError(-del.res, `cannot delete ${device}`, { device: name, op: 'ublk-detach' });
        }
        return { requestsFailed, elapsedMs };
      })();
      return detaching;
    };
    return {
      device, devId, features, flags: gotFlags, userCopy,
      inFlight: () => inflight.size,
      stats: () => native.stats(),
      detach,
    };
  } catch (err) {
    await cleanup().catch(() => undefined);
    throw err;
  }
}
