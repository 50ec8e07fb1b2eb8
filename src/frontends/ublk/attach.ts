/**
 * ublk frontend: serves a BlockEngine as /dev/ublkbN (docs/UBLK.md).
 *
 * Control commands run on the native control thread; every queue has its
 * own native thread and ring. Fetched requests reach JS in batches (one
 * call per wake-up); each goes through engine.submitCb, the same path as
 * NBD (remaps, error policy, durability), and the results go back to the
 * queue threads in one native call per microtask.
 *
 * Crash recovery: given the record of the device an earlier daemon served
 * (`previous`), the device is taken over with START/END_USER_RECOVERY when
 * the kernel kept it (USER_RECOVERY, quiesced), so /dev/ublkbN and whatever
 * is mounted on it survive; otherwise it is deleted (no orphan /dev/ublkcN)
 * and a new device is added, with the reason logged.
 */
import type { Logger } from 'pino';
import type { BlockEngine, EngineOp, EngineRequest, FastPathMirror } from '../../engine/engine.js';
import { ERRNO, RemapError, errnoName } from '../../errors.js';
import { allocAligned } from '../../native/backing.js';
import {
  UBLK_ATTR, UBLK_BATCH_STRIDE, UBLK_F, UBLK_IO_FLAG_FUA, UBLK_IO_OP, UBLK_STATE, UblkCtrlOp, UblkNative, devInfoOf,
  type UblkDevInfo,
} from '../../native/ublk.js';
import type { UblkRecord } from './record.js';

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
  /** Ask for USER_RECOVERY(_REISSUE) when offered, and recover a crashed daemon's device (true; DM_REMAPD_UBLK_RECOVERY=0 disables). */
  recovery?: boolean;
  /** The device an earlier daemon served for this engine: recovered when possible, else deleted. */
  previous?: UblkRecord | null;
  /** Persists the device's record (null: the device was deleted). A failure is logged, never fatal. */
  onRecord?: (r: UblkRecord | null) => Promise<void>;
  /** How long to wait for the kernel to be done with a crashed server before recovery (10000 ms). */
  recoveryWaitMs?: number;
  /**
   * Serve plain reads and writes of blocks that are neither remapped nor
   * pending on the queue threads, straight on main (true; DM_REMAPD_UBLK_FAST=0
   * disables). docs/UBLK.md "Fast path".
   */
  fastPath?: boolean;
}

export interface UblkAttachment {
  /** '/dev/ublkbN'. */
  readonly device: string;
  readonly devId: number;
  readonly features: number;
  readonly flags: number;
  readonly userCopy: boolean;
  /** Taken over from an earlier daemon (USER_RECOVERY) rather than added. */
  readonly recovered: boolean;
  /** USER_RECOVERY is on: when this daemon exits, the kernel keeps the device and holds its requests for the next one. */
  readonly recoverable: boolean;
  /** Hardware queues and tags per queue the kernel gave the device (a recovered device keeps its own). */
  readonly queues: number;
  readonly depth: number;
  /** Requests handed to the engine and not answered yet. */
  inFlight(): number;
  stats(): { fetched: number; committed: number; ioFlusher: number };
  /** STOP_DEV, join the queue threads, DEL_DEV, within deadlineMs (plus the control timeouts' floor). */
  detach(deadlineMs: number): Promise<{ requestsFailed: number; elapsedMs: number }>;
  /**
   * Daemon stop on a recoverable device: stop taking requests (new ones are
   * left unanswered, so the kernel reissues them to the next daemon), wait
   * up to deadlineMs for those in the engine, answer them, and stop the
   * queue threads. The device stays, quiesced, until the next daemon
   * recovers it. The engine is closed afterwards by the caller.
   */
  suspend(deadlineMs: number): Promise<{ requestsHeld: number; requestsUnfinished: number; elapsedMs: number }>;
}

const DISCARD_MAX_BYTES = 64 * 1024 * 1024;
/** Flags that identify a device as the one a record describes. */
const IDENT_FLAGS = UBLK_F.USER_RECOVERY | UBLK_F.USER_RECOVERY_REISSUE | UBLK_F.USER_COPY;
const EBUSY = ERRNO.EBUSY;
const ENODEV = ERRNO.ENODEV;

function log2(n: number): number {
  return Math.round(Math.log2(n));
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * The engine's view of the queue threads' fast path (FastPathMirror): marks
 * go to the native bitmap, and a drain ends the native epoch and waits until
 * the fast I/O counted in it has completed.
 */
class UblkFastMirror implements FastPathMirror {
  private chain: Promise<void> = Promise.resolve();
  private readonly scratch = new Float64Array(4096);

  constructor(private readonly native: UblkNative) {}

  mark(blocks: ArrayLike<number>): void {
    for (let i = 0; i < blocks.length; i += this.scratch.length) {
      const n = Math.min(this.scratch.length, blocks.length - i);
      for (let j = 0; j < n; j++) this.scratch[j] = blocks[i + j];
      this.native.fastMark(this.scratch, n);
    }
  }

  drain(): Promise<void> {
    const p = this.chain.then(() => this.waitEpoch(this.native.fastFlip()));
    this.chain = p;
    return p;
  }

  private waitEpoch(parity: number): Promise<void> {
    return new Promise((resolve) => {
      let polls = 0;
      const poll = (): void => {
        if (this.native.fastInflight(parity) <= 0) {
          resolve();
          return;
        }
        // Fast I/O takes microseconds unless main is slow: poll at once a
        // few times, then every millisecond.
        if (++polls < 32) setImmediate(poll);
        else setTimeout(poll, 1);
      };
      poll();
    });
  }

  enable(reads: boolean, writes: boolean): void {
    this.native.fastEnable(reads, writes);
  }

  stats(): { reads: number; writes: number; bytesRead: number; bytesWritten: number; inFlight: number } {
    const s = this.native.stats();
    return { reads: s.fastReads, writes: s.fastWrites, bytesRead: s.fastReadBytes, bytesWritten: s.fastWriteBytes, inFlight: s.fastInFlight };
  }
}

/** The native object plus the request plumbing between the queue threads and the engine. */
class Server {
  readonly native: UblkNative;
  bufs: Buffer[] = [];
  batch = new Float64Array(0);
  maxIo = 0;
  depth = 0;
  /** key q << 16 | tag -> answered early (detach) */
  readonly inflight = new Map<number, boolean>();
  private out = new Float64Array(0);
  private outCount = 0;
  private flushQueued = false;
  closed = false;
  /** suspend(): requests are no longer handed to the engine. */
  parking = false;
  parked = 0;
  queuesStarted = false;

  constructor(private readonly engine: BlockEngine) {
    this.native = new UblkNative((count) => this.onIo(count));
  }

  /** Buffers for nq queues of `depth` tags of maxIo bytes. */
  setup(nq: number, depth: number, maxIo: number): void {
    this.depth = depth;
    this.maxIo = maxIo;
    this.bufs = [];
    for (let q = 0; q < nq; q++) this.bufs.push(allocAligned(depth * maxIo, 4096, true));
    this.batch = new Float64Array(nq * depth * UBLK_BATCH_STRIDE);
    this.out = new Float64Array(nq * depth * 3);
  }

  /** Switches the fast path off and waits for its I/O (null: there is none). */
  fastOff: (() => Promise<void>) | null = null;
  private fastReady = false;

  /**
   * Prepares the fast path (before startQueues): the queue threads get their
   * own descriptor of main. A failure leaves every request to the engine.
   */
  setupFast(enabled: boolean, log: Logger): void {
    if (!enabled) return;
    let fd = -1;
    try {
      fd = this.engine.dupMainFd();
    } catch (err) {
      log.warn({ event: 'ublk-fast-path-off', error: (err as Error).message }, `${this.engine.name}: no fast path (${(err as Error).message})`);
      return;
    }
    const r = this.native.fastSetup(fd, this.engine.sizeBytes, log2(this.engine.blockSize));
    if (r < 0) {
      log.warn({ event: 'ublk-fast-path-off', errno: -r }, `${this.engine.name}: no fast path (${errnoName(-r)})`);
      return;
    }
    this.fastReady = true;
  }

  /** Hands the fast path to the engine, which marks its blocks and switches it on (once the device is live). */
  startFast(): void {
    if (!this.fastReady || this.fastOff !== null) return;
    this.fastOff = this.engine.attachFastPath(new UblkFastMirror(this.native));
  }

  /** Switches the fast path off and waits (at most ms) for its I/O in flight. */
  async stopFast(ms: number): Promise<void> {
    if (this.fastOff === null) return;
    const done = this.fastOff();
    await Promise.race([done, sleep(Math.max(0, ms))]);
  }

  startQueues(devId: number, userCopy: boolean, useIoctl: boolean): number {
    const r = this.native.startQueues(devId, this.depth, this.maxIo, userCopy, useIoctl, this.batch, this.bufs);
    this.queuesStarted = true;
    return r;
  }

  flush = (): void => {
    this.flushQueued = false;
    if (this.outCount === 0 || this.closed) return;
    const n = this.outCount;
    this.outCount = 0;
    this.native.complete(this.out, n);
  };

  answer(q: number, tag: number, res: number): void {
    const i = this.outCount++;
    this.out[i * 3] = q;
    this.out[i * 3 + 1] = tag;
    this.out[i * 3 + 2] = res;
    if (!this.flushQueued) {
      this.flushQueued = true;
      queueMicrotask(this.flush);
    }
  }

  private onIo(count: number): void {
    const batch = this.batch;
    for (let i = 0; i < count; i++) {
      const b = i * UBLK_BATCH_STRIDE;
      const q = batch[b];
      const tag = batch[b + 1];
      if (this.parking) {
        // Left unanswered: the kernel requeues it when the queue threads stop.
        this.parked++;
        continue;
      }
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
          this.answer(q, tag, -ERRNO.EOPNOTSUPP);
          continue;
      }
      const req: EngineRequest = { op: eop, offset, length };
      const maxIo = this.maxIo;
      if (eop === 'read' || eop === 'write') req.buffer = this.bufs[q].subarray(tag * maxIo, tag * maxIo + length);
      if (eop === 'write' && (flags & UBLK_IO_FLAG_FUA) !== 0) req.fua = true;
      const key = (q << 16) | tag;
      this.inflight.set(key, false);
      this.engine.submitCb(req, (err) => {
        const early = this.inflight.get(key);
        this.inflight.delete(key);
        if (early !== false) return; // answered at detach already
        this.answer(q, tag, err === null ? (eop === 'read' || eop === 'write' ? length : 0) : -err.errno);
      });
    }
  }

  close(): void {
    this.closed = true;
    this.native.close(1000);
  }
}

/** What to do with the device a record names. */
type Verdict =
  | { kind: 'recover'; info: UblkDevInfo }
  | { kind: 'delete'; stop: boolean; reason: string }
  | { kind: 'forget'; reason: string }
  | { kind: 'leave'; reason: string };

async function getInfo(native: UblkNative, devId: number, t: number): Promise<{ info: UblkDevInfo | null; res: number }> {
  const r = await native.ctrlRaw(UblkCtrlOp.GET_INFO, devId, t);
  return { info: r.res === 0 ? devInfoOf(devId, r.out) : null, res: r.res };
}

/**
 * Looks at the device of an earlier daemon: waits (bounded) for the kernel
 * to be done with its server, then decides. A device that is not the one
 * recorded (another geometry or flags, another server) is left alone.
 */
async function examine(native: UblkNative, prev: UblkRecord, want: { recovery: boolean; sizeBytes: number; blockSize: number; readOnly: boolean },
  t: number, waitMs: number): Promise<Verdict> {
  const id = prev.devId;
  const deadline = Date.now() + waitMs;
  let g = await getInfo(native, id, t);
  if (g.info === null) {
    if (g.res === -ENODEV) return { kind: 'forget', reason: `ublk ${id} no longer exists` };
    return { kind: 'leave', reason: `GET_DEV_INFO on ublk ${id} failed: ${errnoName(g.res)}` };
  }
  const same = (i: UblkDevInfo): boolean => i.queues === prev.queues && i.depth === prev.depth && i.maxIoBytes === prev.maxIoBytes
    && (i.flags & IDENT_FLAGS) === (prev.flags & IDENT_FLAGS);
  if (!same(g.info)) return { kind: 'forget', reason: `ublk ${id} is not the device recorded (queues, depth or flags differ): left alone` };
  // LIVE: the kernel has not yet processed the old server's exit (or it still runs).
  while (g.info.state === UBLK_STATE.LIVE && Date.now() < deadline) {
    if (g.info.pid !== prev.pid) return { kind: 'forget', reason: `ublk ${id} is served by process ${g.info.pid}, not by ${prev.pid}: left alone` };
    await sleep(100);
    g = await getInfo(native, id, t);
    if (g.info === null) return g.res === -ENODEV ? { kind: 'forget', reason: `ublk ${id} no longer exists` }
      : { kind: 'leave', reason: `GET_DEV_INFO on ublk ${id} failed: ${errnoName(g.res)}` };
  }
  const info = g.info;
  if (info.state === UBLK_STATE.LIVE) return { kind: 'leave', reason: `ublk ${id} is still live (server ${info.pid}) after ${waitMs} ms: left alone` };
  if (info.state === UBLK_STATE.DEAD) {
    return { kind: 'delete', stop: false, reason: (info.flags & UBLK_F.USER_RECOVERY) === 0
      ? 'the kernel stopped it when its server exited (no USER_RECOVERY)' : 'it was stopped' };
  }
  if (info.pid !== prev.pid) return { kind: 'forget', reason: `ublk ${id} was served by process ${info.pid}, not by ${prev.pid}: left alone` };
  if (!want.recovery) return { kind: 'delete', stop: true, reason: 'recovery is disabled (DM_REMAPD_UBLK_RECOVERY=0)' };
  if ((info.flags & UBLK_F.USER_RECOVERY) === 0) return { kind: 'delete', stop: true, reason: 'it has no USER_RECOVERY' };
  if (prev.sizeBytes !== want.sizeBytes || prev.blockSize !== want.blockSize || prev.readOnly !== want.readOnly) {
    return { kind: 'delete', stop: true, reason: `the engine changed (size ${prev.sizeBytes} -> ${want.sizeBytes}, block ${prev.blockSize} -> ${want.blockSize}, `
      + `read-only ${prev.readOnly} -> ${want.readOnly}); a started device keeps its parameters` };
  }
  return { kind: 'recover', info };
}

/** Serves `engine` as /dev/ublkbN: the recorded device of an earlier daemon when it can be recovered, else a new one. */
export async function attachUblkDevice(engine: BlockEngine, o: UblkOptions): Promise<UblkAttachment> {
  const log = o.logger.child({ component: 'ublk' });
  const name = engine.name;
  const bs = engine.blockSize;
  if (bs < 512 || bs > 4096 || (bs & (bs - 1)) !== 0) {
    throw new RemapError(ERRNO.EINVAL, `ublk needs a block size of 512..4096, the engine has ${bs}`, { device: name, op: 'ublk-attach' });
  }
  const t = o.ctrlTimeoutMs ?? 10_000;
  const recovery = o.recovery ?? process.env.DM_REMAPD_UBLK_RECOVERY !== '0';
  const fastPath = o.fastPath ?? process.env.DM_REMAPD_UBLK_FAST !== '0';
  const readOnly = o.readOnly === true || engine.capabilities().readOnly;
  const record = async (r: UblkRecord | null): Promise<void> => {
    if (o.onRecord === undefined) return;
    try {
      await o.onRecord(r);
    } catch (err) {
      log.warn({ event: 'ublk-record-failed', error: (err as Error).message }, `cannot ${r === null ? 'remove' : 'write'} the ublk record of ${name}`);
    }
  };

  let srv = new Server(engine);
  srv.native.open();
  // GET_FEATURES exists from 6.5; without it: legacy opcodes, no extras.
  let f = await srv.native.ctrlRaw(UblkCtrlOp.FEATURES, -1, t);
  const prev = o.previous ?? null;
  if (prev !== null) {
    const t0 = Date.now();
    const v = await examine(srv.native, prev, { recovery, sizeBytes: engine.sizeBytes, blockSize: bs, readOnly }, t, o.recoveryWaitMs ?? 10_000);
    const ctx = { ublkDevice: `/dev/ublkb${prev.devId}`, previousPid: prev.pid };
    if (v.kind === 'recover') {
      try {
        return await recover(srv, engine, v.info, prev, { log, t, features: f.res === 0 ? f.out[0] : 0, useIoctl: f.res === 0 && f.out[1] === 1,
          waitMs: o.recoveryWaitMs ?? 10_000, t0, record, fastPath });
      } catch (err) {
        const e = err as Error;
        log.warn({ event: 'ublk-recovery-failed', ...ctx, error: e.message, errno: (err as { errno?: number }).errno },
          `${name}: recovery of /dev/ublkb${prev.devId} failed (${e.message}); deleting it and adding a new device`);
        const del = await teardown(srv, prev.devId, t, true);
        logDeleted(log, name, prev.devId, del, 'its recovery failed');
        if (del === 0 || del === -ENODEV) await record(null);
        srv = new Server(engine);
        srv.native.open();
        f = await srv.native.ctrlRaw(UblkCtrlOp.FEATURES, -1, t);
      }
    } else if (v.kind === 'delete') {
      const del = await deleteStale(srv.native, prev.devId, v.stop, t);
      logDeleted(log, name, prev.devId, del, v.reason);
      await record(null);
    } else {
      log.info({ event: 'ublk-previous-ignored', ...ctx, reason: v.reason, elapsedMs: Date.now() - t0 }, `${name}: not reusing /dev/ublkb${prev.devId}: ${v.reason}`);
      if (v.kind === 'forget') await record(null);
    }
  }
  return addNew(srv, engine, o, { log, t, f, recovery, readOnly, record, fastPath });
}

/**
 * Deletes the device of a record without serving it (`remapctl remove` of a
 * device that could not be assembled, so its ublk device is not left
 * quiesced or orphaned). true when it is gone or was not the recorded device.
 */
export async function deleteRecordedUblk(prev: UblkRecord, logger: Logger, name: string, ctrlTimeoutMs = 10_000): Promise<boolean> {
  const log = logger.child({ component: 'ublk' });
  const native = new UblkNative(() => undefined);
  native.open();
  try {
    await native.ctrlRaw(UblkCtrlOp.FEATURES, -1, ctrlTimeoutMs);
    const v = await examine(native, prev, { recovery: false, sizeBytes: 0, blockSize: 0, readOnly: false }, ctrlTimeoutMs, 3000);
    if (v.kind === 'delete') {
      const del = await deleteStale(native, prev.devId, v.stop, ctrlTimeoutMs);
      const ok = del === 0 || del === -ENODEV;
      (ok ? log.info.bind(log) : log.warn.bind(log))({ event: 'ublk-stale-deleted', ublkDevice: `/dev/ublkb${prev.devId}`, reason: 'the device is removed', errno: ok ? undefined : -del },
        `${name}: ${ok ? 'deleted' : 'could not fully delete'} /dev/ublkb${prev.devId} left by an earlier daemon`);
      return ok;
    }
    const reason = v.kind === 'recover' ? 'recoverable' : v.reason; // 'recover' cannot happen with recovery off
    log.info({ event: 'ublk-previous-ignored', ublkDevice: `/dev/ublkb${prev.devId}`, reason }, `${name}: not deleting /dev/ublkb${prev.devId}: ${reason}`);
    return v.kind === 'forget';
  } finally {
    native.close(1000);
  }
}

function logDeleted(log: Logger, name: string, devId: number, res: number, reason: string): void {
  const ok = res === 0 || res === -ENODEV;
  (ok ? log.info.bind(log) : log.warn.bind(log))({ event: 'ublk-stale-deleted', ublkDevice: `/dev/ublkb${devId}`, reason, errno: ok ? undefined : -res },
    `${name}: ${ok ? 'deleted' : 'could not fully delete'} /dev/ublkb${devId} of the previous daemon, because ${reason}`
    + `${ok ? '' : ` (DEL_DEV: ${errnoName(res)}; the kernel frees it when its last user closes it)`}; adding a new device`);
}

/** STOP_DEV (when asked) and DEL_DEV of a device this process has no queues on. DEL_DEV's result. */
async function deleteStale(native: UblkNative, devId: number, stop: boolean, t: number): Promise<number> {
  if (stop) await native.ctrlRaw(UblkCtrlOp.STOP, devId, t);
  // DEL_DEV removes /dev/ublkcN at once, then waits for the last user of the
  // disk (a filesystem still mounted on the dead device): bounded.
  const d = await native.ctrlRaw(UblkCtrlOp.DEL, devId, Math.min(t, 3000));
  return d.res;
}

/** STOP_DEV, join this server's queue threads, DEL_DEV, close. DEL_DEV's result. */
async function teardown(srv: Server, devId: number, t: number, stop: boolean): Promise<number> {
  if (stop) await srv.native.ctrlRaw(UblkCtrlOp.STOP, devId, t);
  if (srv.queuesStarted) await srv.native.ctrlRaw(UblkCtrlOp.JOIN_QUEUES, devId, 3000);
  const d = await srv.native.ctrlRaw(UblkCtrlOp.DEL, devId, Math.min(t, 3000));
  srv.close();
  return d.res;
}

interface Ctx {
  log: Logger;
  t: number;
  fastPath: boolean;
  record: (r: UblkRecord | null) => Promise<void>;
}

async function recover(srv: Server, engine: BlockEngine, info: UblkDevInfo, prev: UblkRecord,
  c: Ctx & { features: number; useIoctl: boolean; waitMs: number; t0: number }): Promise<UblkAttachment> {
  const { log, t } = c;
  const devId = info.devId;
  const name = engine.name;
  // -EBUSY until the old server's /dev/ublkcN is released (its io_uring
  // contexts are torn down asynchronously after the process exits).
  const deadline = Date.now() + c.waitMs;
  let st = await srv.native.ctrlRaw(UblkCtrlOp.START_RECOVERY, devId, t);
  let tries = 1;
  while (st.res === -EBUSY && Date.now() < deadline) {
    await sleep(50);
    st = await srv.native.ctrlRaw(UblkCtrlOp.START_RECOVERY, devId, t);
    tries++;
  }
  if (st.res < 0) {
    throw new RemapError(-st.res, `ublk START_USER_RECOVERY on ublk ${devId} failed after ${tries} tries`, { device: name, op: 'ublk-recover' });
  }
  const tStarted = Date.now();
  const userCopy = (info.flags & UBLK_F.USER_COPY) !== 0;
  const bs = engine.blockSize;
  srv.setup(info.queues, info.depth, Math.floor(info.maxIoBytes / bs) * bs);
  srv.setupFast(c.fastPath, log);
  const r = srv.startQueues(devId, userCopy, c.useIoctl);
  if (r < 0) throw new RemapError(-r, `cannot start the queue threads of /dev/ublkc${devId}`, { device: name, op: 'ublk-recover' });
  const tQueues = Date.now();
  // Test hook (tests/vm/guest-ublk-recovery.sh): a recovery failing with its queues started, to exercise the cleanup.
  if (process.env.DM_REMAPD_UBLK_TEST_FAIL_RECOVERY === '1') {
    throw new RemapError(ERRNO.EIO, `ublk recovery of ublk ${devId} failed on purpose (DM_REMAPD_UBLK_TEST_FAIL_RECOVERY=1)`, { device: name, op: 'ublk-recover' });
  }
  // Returns once every tag has a FETCH_REQ; the device is live again and the
  // requests held since the crash are reissued to this process.
  await srv.native.ctrl(UblkCtrlOp.END_RECOVERY, devId, t, [], name);
  srv.startFast();
  await c.record({ ...prev, pid: process.pid });
  const device = `/dev/ublkb${devId}`;
  log.info({ event: 'ublk-attached', ublkDevice: device, recovered: true, previousPid: prev.pid, features: c.features, flags: info.flags, userCopy,
    useIoctl: c.useIoctl, queues: info.queues, depth: info.depth, maxIo: srv.maxIo, ioFlusher: srv.native.stats().ioFlusher, fastPath: srv.fastOff !== null,
    startRecoveryTries: tries, waitMs: tStarted - c.t0, queuesMs: tQueues - tStarted, endRecoveryMs: Date.now() - tQueues, recoveryMs: Date.now() - c.t0 },
  `${name} recovered ${device} from process ${prev.pid} in ${Date.now() - c.t0} ms`);
  return attachment(srv, engine, { device, devId, features: c.features, flags: info.flags, userCopy, recovered: true, log, t, record: c.record, fastPath: c.fastPath,
    queues: info.queues, depth: info.depth });
}

async function addNew(srv: Server, engine: BlockEngine, o: UblkOptions,
  c: Ctx & { f: { res: number; out: number[] }; recovery: boolean; readOnly: boolean }): Promise<UblkAttachment> {
  const { log, t, f } = c;
  const name = engine.name;
  const bs = engine.blockSize;
  const envCopy = process.env.DM_REMAPD_UBLK_COPY;
  const copy = o.copy ?? (envCopy === 'buffers' ? 'buffers' : 'auto');
  let devId = -1;
  let started = false;
  let recorded = false;
  const cleanup = async (): Promise<void> => {
    if (devId >= 0 && started) await srv.native.ctrlRaw(UblkCtrlOp.STOP, devId, t);
    if (srv.queuesStarted) await srv.native.ctrlRaw(UblkCtrlOp.JOIN_QUEUES, devId, 3000);
    if (devId >= 0) {
      const d = await srv.native.ctrlRaw(UblkCtrlOp.DEL, devId, t);
      if (recorded && (d.res === 0 || d.res === -ENODEV)) await c.record(null);
    }
    srv.close();
  };
  try {
    const features = f.res === 0 ? f.out[0] : 0;
    const useIoctl = f.res === 0 && f.out[1] === 1;
    let flags = 0;
    if (copy === 'auto' && (features & UBLK_F.USER_COPY) !== 0) flags |= UBLK_F.USER_COPY;
    if (c.recovery && (features & UBLK_F.USER_RECOVERY) !== 0) flags |= UBLK_F.USER_RECOVERY;
    if (c.recovery && (features & UBLK_F.USER_RECOVERY_REISSUE) !== 0) flags |= UBLK_F.USER_RECOVERY_REISSUE;
    const added = await srv.native.ctrl(UblkCtrlOp.ADD, -1, t, [o.queues ?? 1, o.depth ?? 128, o.maxIoBytes ?? 512 * 1024, flags], name);
    devId = added[0];
    const nq = added[1];
    const depth = added[2];
    const maxIo = Math.floor(added[3] / bs) * bs;
    const gotFlags = added[4];
    const userCopy = (gotFlags & UBLK_F.USER_COPY) !== 0;
    // Recorded before START_DEV, so that a crash from here on leaves a device the next daemon finds.
    await c.record({ devId, flags: gotFlags, pid: process.pid, queues: nq, depth, maxIoBytes: added[3], sizeBytes: engine.sizeBytes, blockSize: bs, readOnly: c.readOnly });
    recorded = true;
    const attrs = UBLK_ATTR.VOLATILE_CACHE | UBLK_ATTR.FUA | (c.readOnly ? UBLK_ATTR.READ_ONLY : 0);
    const discardSectors = c.readOnly ? 0 : DISCARD_MAX_BYTES / 512;
    await srv.native.ctrl(UblkCtrlOp.SET_PARAMS, devId, t, [
      attrs, log2(bs), log2(bs), maxIo / 512, Math.floor(engine.sizeBytes / 512), discardSectors, discardSectors, bs,
    ], name);
    srv.setup(nq, depth, maxIo);
    srv.setupFast(c.fastPath, log);
    const r = srv.startQueues(devId, userCopy, useIoctl);
    if (r < 0) throw new RemapError(-r, `cannot start the queue threads of /dev/ublkc${devId}`, { device: name, op: 'ublk-queues' });
    const t0 = Date.now();
    started = true;
    await srv.native.ctrl(UblkCtrlOp.START, devId, t, [], name);
    srv.startFast();
    const device = `/dev/ublkb${devId}`;
    log.info({ event: 'ublk-attached', ublkDevice: device, recovered: false, features, flags: gotFlags, userCopy, useIoctl, queues: nq, depth, maxIo,
      ioFlusher: srv.native.stats().ioFlusher, fastPath: srv.fastOff !== null, startMs: Date.now() - t0 }, `${name} attached as ${device}`);
    return attachment(srv, engine, { device, devId, features, flags: gotFlags, userCopy, recovered: false, log, t, record: c.record, fastPath: c.fastPath,
      queues: nq, depth });
  } catch (err) {
    await cleanup().catch(() => undefined);
    throw err;
  }
}

function attachment(srv: Server, engine: BlockEngine, a: Ctx & {
  device: string; devId: number; features: number; flags: number; userCopy: boolean; recovered: boolean; queues: number; depth: number;
}): UblkAttachment {
  const { log, device, devId } = a;
  const native = srv.native;
  const recoverable = (a.flags & UBLK_F.USER_RECOVERY) !== 0;
  const reissue = recoverable && (a.flags & UBLK_F.USER_RECOVERY_REISSUE) !== 0;
  let ending: Promise<unknown> | null = null;

  const detach = (deadlineMs: number): Promise<{ requestsFailed: number; elapsedMs: number }> => {
    const p = (ending ??= (async () => {
      const t1 = Date.now();
      await srv.stopFast(deadlineMs / 4);
      let requestsFailed = 0;
      // STOP_DEV waits for the requests in flight (del_gendisk): if the
      // engine has not answered them by half the deadline, answer them EIO.
      const timer = setTimeout(() => {
        for (const [key, early] of srv.inflight) {
          if (early) continue;
          srv.inflight.set(key, true);
          requestsFailed++;
          srv.answer(key >>> 16, key & 0xffff, -ERRNO.EIO);
        }
      }, Math.max(0, deadlineMs / 2));
      const stop = await native.ctrlRaw(UblkCtrlOp.STOP, devId, Math.max(1000, deadlineMs));
      clearTimeout(timer);
      if (stop.res < 0) log.warn({ event: 'ublk-stop-failed', errno: -stop.res }, `STOP_DEV of ${device} failed (${-stop.res})`);
      const join = await native.ctrlRaw(UblkCtrlOp.JOIN_QUEUES, devId, 3000);
      if (join.res < 0) log.warn({ event: 'ublk-join-failed', errno: -join.res }, `queue threads of ${device} did not exit (${-join.res})`);
      const del = await native.ctrlRaw(UblkCtrlOp.DEL, devId, Math.max(1000, deadlineMs - (Date.now() - t1)));
      if (del.res < 0) log.warn({ event: 'ublk-del-failed', errno: -del.res }, `DEL_DEV of ${device} failed (${-del.res})`);
      srv.close();
      if (del.res === 0 || del.res === -ENODEV) await a.record(null);
      const elapsedMs = Date.now() - t1;
      log.info({ event: 'ublk-detached', ublkDevice: device, elapsedMs, requestsFailed, ...native.stats() }, `${device} deleted`);
      if (del.res < 0) {
        throw new RemapError(-del.res, `cannot delete ${device}`, { device: engine.name, op: 'ublk-detach' });
      }
      return { requestsFailed, elapsedMs };
    })());
    return p as Promise<{ requestsFailed: number; elapsedMs: number }>;
  };

  const suspend = (deadlineMs: number): Promise<{ requestsHeld: number; requestsUnfinished: number; elapsedMs: number }> => {
    const p = (ending ??= (async () => {
      const t1 = Date.now();
      await srv.stopFast(deadlineMs / 2);
      // With REISSUE, a request left unanswered is requeued by the kernel
      // when the queue threads stop; without it, it would fail: keep serving.
      if (reissue) srv.parking = true;
      while (srv.inflight.size > 0 && Date.now() - t1 < deadlineMs) await sleep(5);
      srv.parking = true;
      const requestsUnfinished = srv.inflight.size;
      srv.flush();
      // Let the queue threads submit the last commits before they stop.
      await sleep(20);
      srv.close();
      const elapsedMs = Date.now() - t1;
      log.info({ event: 'ublk-suspended', ublkDevice: device, requestsHeld: srv.parked, requestsUnfinished, elapsedMs, ...native.stats() },
        `${device} left to the next daemon (USER_RECOVERY): ${srv.parked} request(s) held for it`);
      return { requestsHeld: srv.parked, requestsUnfinished, elapsedMs };
    })());
    return p as Promise<{ requestsHeld: number; requestsUnfinished: number; elapsedMs: number }>;
  };

  return {
    device, devId, features: a.features, flags: a.flags, userCopy: a.userCopy, recovered: a.recovered, recoverable, queues: a.queues, depth: a.depth,
    inFlight: () => srv.inflight.size,
    stats: () => native.stats(),
    detach,
    suspend,
  };
}
