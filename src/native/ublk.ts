/**
 * ublk, from native/ublk.cc: a control thread with an SQE128 ring on
 * /dev/ublk-control, one thread per queue with its own ring on /dev/ublkcN,
 * and batches in both directions (docs/UBLK.md). The raw binding returns
 * negative errnos; UblkNative turns control results into promises and
 * failures into RemapError with the command named.
 */
import { RemapError } from '../errors.js';
import { loadBinding } from './binding.js';

export const UblkCtrlOp = {
  FEATURES: 0,
  ADD: 1,
  SET_PARAMS: 2,
  START: 3,
  STOP: 4,
  DEL: 5,
  JOIN_QUEUES: 6,
  GET_INFO: 7,
  START_RECOVERY: 8,
  END_RECOVERY: 9,
} as const;
export type UblkCtrlOpCode = (typeof UblkCtrlOp)[keyof typeof UblkCtrlOp];

const OP_NAMES: Record<number, string> = {
  0: 'GET_FEATURES', 1: 'ADD_DEV', 2: 'SET_PARAMS', 3: 'START_DEV', 4: 'STOP_DEV', 5: 'DEL_DEV', 6: 'join queue threads', 7: 'GET_DEV_INFO',
  8: 'START_USER_RECOVERY', 9: 'END_USER_RECOVERY',
};

/** ublksrv_ctrl_dev_info.state. */
export const UBLK_STATE = { DEAD: 0, LIVE: 1, QUIESCED: 2 } as const;

/** What GET_DEV_INFO tells of a device. */
export interface UblkDevInfo {
  devId: number;
  /** UBLK_STATE. */
  state: number;
  /** The server that started (or recovered) it; -1 once stopped. */
  pid: number;
  flags: number;
  queues: number;
  depth: number;
  maxIoBytes: number;
}

/** GET_DEV_INFO's ctrl result as a UblkDevInfo (out as filled by native/ublk.cc). */
export function devInfoOf(devId: number, out: number[]): UblkDevInfo {
  return { devId, state: out[1], pid: out[2], flags: out[3], queues: out[4], depth: out[5], maxIoBytes: out[6] };
}

/** Feature bits (UBLK_F_*, include/uapi/linux/ublk_cmd.h). */
export const UBLK_F = {
  URING_CMD_COMP_IN_TASK: 1 << 1,
  NEED_GET_DATA: 1 << 2,
  USER_RECOVERY: 1 << 3,
  USER_RECOVERY_REISSUE: 1 << 4,
  UNPRIVILEGED_DEV: 1 << 5,
  CMD_IOCTL_ENCODE: 1 << 6,
  USER_COPY: 1 << 7,
  ZONED: 1 << 8,
} as const;

/** ublk_param_basic.attrs. */
export const UBLK_ATTR = { READ_ONLY: 1, ROTATIONAL: 2, VOLATILE_CACHE: 4, FUA: 8 } as const;

/** ublksrv_io_desc op (low 8 bits) and flags (op_flags >> 8, as the batch carries them). */
export const UBLK_IO_OP = { READ: 0, WRITE: 1, FLUSH: 2, DISCARD: 3, WRITE_SAME: 4, WRITE_ZEROES: 5 } as const;
/** UBLK_IO_F_FUA (1 << 13) after the >> 8 of op_flags. */
export const UBLK_IO_FLAG_FUA = 1 << 5;

/** Values per fetched request in the batch: q, tag, op, flags, startSector, nrSectors. */
export const UBLK_BATCH_STRIDE = 6;

interface NativeUblkHandle {
  open(): number;
  ctrl(seq: number, op: number, devId: number, timeoutMs: number, params: Float64Array): number;
  startQueues(devId: number, depth: number, maxIo: number, userCopy: boolean, useIoctl: boolean, ioBatch: Float64Array, bufs: Buffer[]): number;
  complete(desc: Float64Array, count: number): number;
  stats(): UblkNativeStats;
  fastSetup(fd: number, sizeBytes: number, blockShift: number): number;
  fastMark(blocks: Float64Array, count: number): number;
  fastEnable(reads: boolean, writes: boolean): number;
  fastFlip(): number;
  fastInflight(parity: number): number;
  close(waitMs: number): { ctrlDetached: boolean };
}

export interface UblkNativeStats {
  fetched: number;
  committed: number;
  ioFlusher: number;
  /** Fast path (docs/UBLK.md): requests answered by the queue threads without the engine. */
  fastReads: number;
  fastWrites: number;
  fastReadBytes: number;
  fastWriteBytes: number;
  /** Fast I/Os that did not transfer everything and went to the engine. */
  fastFallbacks: number;
  fastInFlight: number;
}

interface NativeUblkConstructor {
  new (onCtrl: (seq: number, res: number) => void, onIo: (count: number) => void, ctrlOut: Float64Array): NativeUblkHandle;
}

export interface CtrlResult {
  res: number;
  out: number[];
}

export class UblkNative {
  private readonly h: NativeUblkHandle;
  private readonly ctrlOut = new Float64Array(8);
  private readonly waiters = new Map<number, (r: CtrlResult) => void>();
  private seq = 0;
  /**
   * All the native callbacks reach. The native object keeps strong references
   * to its callbacks until it is itself collected, so they must not hold this
   * object nor onIo (whose closure holds the per-tag buffers and the engine):
   * close() cuts the link, and a removed device's fds and buffers become
   * garbage (before, every device added and removed kept 3 fds and 64 MiB).
   */
  private readonly link: { self: UblkNative | null; onIo: ((count: number) => void) | null };

  /** onIo(count) reads `count` requests from the batch array given to startQueues. */
  constructor(onIo: (count: number) => void) {
    const Ctor = (loadBinding() as unknown as { NativeUblk: NativeUblkConstructor }).NativeUblk;
    const link: { self: UblkNative | null; onIo: ((count: number) => void) | null } = { self: this, onIo };
    this.link = link;
    this.h = new Ctor((seq, res) => link.self?.onCtrl(seq, res), (count) => link.onIo?.(count), this.ctrlOut);
  }

  private onCtrl(seq: number, res: number): void {
    const w = this.waiters.get(seq);
    if (w === undefined) return;
    this.waiters.delete(seq);
    w({ res, out: Array.from(this.ctrlOut) });
  }

  /** Opens /dev/ublk-control and starts the control thread. */
  open(): void {
    const r = this.h.open();
    if (r < 0) throw new RemapError(-r, 'cannot open /dev/ublk-control (is ublk_drv loaded?)', { op: 'ublk-open' });
  }

  /** One control command on the control thread, bounded by timeoutMs natively. Never throws: res < 0 is -errno. */
  ctrlRaw(op: UblkCtrlOpCode, devId: number, timeoutMs: number, params: number[] = []): Promise<CtrlResult> {
    const seq = ++this.seq;
    const p = new Float64Array(10);
    p.set(params.slice(0, 10));
    return new Promise((resolve) => {
      this.waiters.set(seq, resolve);
      const r = this.h.ctrl(seq, op, devId >>> 0, Math.max(1, Math.round(timeoutMs)), p);
      if (r < 0) {
        this.waiters.delete(seq);
        resolve({ res: r, out: [] });
      }
    });
  }

  /** ctrlRaw, throwing a RemapError naming the command on failure. */
  async ctrl(op: UblkCtrlOpCode, devId: number, timeoutMs: number, params: number[] = [], device?: string): Promise<number[]> {
    const r = await this.ctrlRaw(op, devId, timeoutMs, params);
    if (r.res < 0) {
      throw new RemapError(-r.res, `ublk ${OP_NAMES[op] ?? op}${devId >= 0 && devId !== 0xffffffff ? ` on ublk ${devId}` : ''} failed`
        + (r.res === -110 ? ` (no answer within ${timeoutMs} ms)` : ''), { device, op: 'ublk-ctrl' });
    }
    return r.out;
  }

  startQueues(devId: number, depth: number, maxIo: number, userCopy: boolean, useIoctl: boolean, ioBatch: Float64Array, bufs: Buffer[]): number {
    return this.h.startQueues(devId, depth, maxIo, userCopy, useIoctl, ioBatch, bufs);
  }

  complete(desc: Float64Array, count: number): number {
    return this.h.complete(desc, count);
  }

  stats(): UblkNativeStats {
    return this.h.stats();
  }

  /** The fast path on main's descriptor `fd` (taken over, closed natively); before startQueues. */
  fastSetup(fd: number, sizeBytes: number, blockShift: number): number {
    return this.h.fastSetup(fd, sizeBytes, blockShift);
  }

  fastMark(blocks: Float64Array, count: number): void {
    this.h.fastMark(blocks, count);
  }

  fastEnable(reads: boolean, writes: boolean): void {
    this.h.fastEnable(reads, writes);
  }

  /** Ends the current epoch; returns its parity for fastInflight(). */
  fastFlip(): number {
    return this.h.fastFlip();
  }

  fastInflight(parity: number): number {
    return this.h.fastInflight(parity);
  }

  close(waitMs: number): { ctrlDetached: boolean } {
    for (const w of this.waiters.values()) w({ res: -125, out: [] }); // ECANCELED
    this.waiters.clear();
    const r = this.h.close(waitMs);
    this.link.self = null;
    this.link.onIo = null;
    return r;
  }
}
