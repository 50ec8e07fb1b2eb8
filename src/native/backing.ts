/**
 * Backing I/O over io_uring: one ring per backing file or block device.
 *
 * Every op queued in one JS tick goes down in one native call (flushed from a
 * microtask); completions come up in batches through one callback per reap.
 * I/O errors are results (negative errno), never exceptions. See docs/NATIVE.md.
 */
import { ERRNO, RemapError } from '../errors.js';
import { loadBinding, type NativeBackingHandle, type NativeBackingInfo } from './binding.js';

export const BackingOp = { READ: 0, WRITE: 1, FDATASYNC: 2, DISCARD: 3, WRITE_ZEROES: 4 } as const;
export type BackingOpCode = (typeof BackingOp)[keyof typeof BackingOp];
/** WRITE flag: force unit access (the write carries RWF_DSYNC). */
export const IO_FUA = 1;

/** Test hook op: the ioctl worker sleeps `length` ms (a hung BLKDISCARD). Needs enableTestHooks(). */
export const TEST_HANG_OP = 100;

export interface OpenOptions {
  /** Default true: O_DIRECT. Buffered I/O hides write errors until fsync; ask for it explicitly. */
  direct?: boolean;
  readOnly?: boolean;
  /** O_EXCL: exclusive open of a block device (fails with EBUSY if mounted or claimed). */
  exclusive?: boolean;
  /** Ring entries, default 256. Also the most ops in flight at once; more are queued in JS. */
  queueDepth?: number;
}

/** What an open backing device is (the addon's own description of it). */
export type BackingInfo = NativeBackingInfo;

export interface BackingStats {
  /** Native submit calls (one per flushed batch). */
  submitCalls: number;
  /** Native-to-JS completion callbacks (one per reap, each carrying many completions). */
  completionCallbacks: number;
  /** Ops submitted to the kernel, continuations of short transfers included. */
  ops: number;
}

export interface CloseResult {
  /** Ops that ended with -ECANCELED during close (cancelled in the kernel or never submitted). */
  cancelled: number;
  /** Ops still unfinished at the deadline; their callbacks got -ECANCELED. */
  abandoned: number;
}

type Callback = (res: number) => void;

const noop: Callback = () => {};

interface OpRecord {
  op: number;
  buf: Uint8Array | null;
  offset: number;
  length: number;
  flags: number;
  cb: Callback;
  /** Bytes already transferred (short reads/writes are continued). */
  done: number;
}

const STRIDE = 5;
const EBADF = ERRNO.EBADF as number;
const ECANCELED = ERRNO.ECANCELED as number;
const EINVAL = ERRNO.EINVAL as number;
const EIO = ERRNO.EIO as number;

/**
 * Buffers of reads/writes abandoned at close on a hung device. The kernel may
 * still DMA into them later, so they are never released to be reused.
 */
const quarantined: Uint8Array[] = [];

/** Bytes held back from reuse because a hung device may still write into them. */
export function quarantinedBytes(): number {
  let n = 0;
  for (const b of quarantined) n += b.byteLength;
  return n;
}

function deliver(cb: Callback, res: number): void {
  try {
    cb(res);
  } catch (err) {
    // A throwing callback must not break the batch; surface it as uncaught.
    process.nextTick(() => {
      throw err;
    });
  }
}

export class BackingDevice {
  readonly info: BackingInfo;

  #native: NativeBackingHandle;
  /**
   * Ops in the kernel, by slot: an op's id is `seq * maxInFlight + slot + 1`
   * (never 0, which is the close-time cancel), so a completion finds its
   * record by index, and a stale id (its slot reused) is recognised. No Map:
   * the hot path allocates nothing per op (records are pooled too).
   */
  #slots: (OpRecord | null)[];
  #slotIds: Float64Array;
  #freeSlots: Int32Array;
  #freeCount: number;
  #seq = 0;
  #freeRecs: OpRecord[] = [];
  #queue: OpRecord[] = [];
  #maxInFlight: number;
  #desc: Float64Array;
  #bufs: (Uint8Array | null)[];
  #completions: Float64Array;
  #flushScheduled = false;
  #closed = false;
  #nativeClosed = false;
  #closePromise: Promise<CloseResult> | null = null;
  #drained: (() => void) | null = null;
  #cancelledInClose = 0;
  #stats: BackingStats = { submitCalls: 0, completionCallbacks: 0, ops: 0 };
  readonly #flush = (): void => this.#doFlush();

  private constructor(native: NativeBackingHandle, completions: Float64Array, queueDepth: number) {
    this.#native = native;
    this.#completions = completions;
    this.#maxInFlight = queueDepth;
    this.#slots = new Array<OpRecord | null>(queueDepth).fill(null);
    this.#slotIds = new Float64Array(queueDepth);
    this.#freeSlots = new Int32Array(queueDepth);
    for (let i = 0; i < queueDepth; i++) this.#freeSlots[i] = queueDepth - 1 - i;
    this.#freeCount = queueDepth;
    this.#desc = new Float64Array(queueDepth * STRIDE);
    this.#bufs = new Array<Uint8Array | null>(queueDepth).fill(null);
    const i = native.info();
    this.info = Object.freeze({
      path: i.path,
      sizeBytes: i.sizeBytes,
      logicalBlockSize: i.logicalBlockSize,
      physicalBlockSize: i.physicalBlockSize,
      isBlockDevice: i.isBlockDevice,
      openMode: i.openMode,
      readOnly: i.readOnly,
      dev: i.dev,
      ino: i.ino,
      rdev: i.rdev,
      ringSetup: i.ringSetup,
      dioMemAlign: i.dioMemAlign,
    });
  }

  static open(path: string, opts: OpenOptions = {}): BackingDevice {
    const queueDepth = opts.queueDepth ?? 256;
    if (!Number.isInteger(queueDepth) || queueDepth < 1 || queueDepth > 32768) {
      throw new RemapError(EINVAL, `invalid queueDepth ${queueDepth}`, { device: path, op: 'open' });
    }
    const binding = loadBinding();
    // A CQ holds 2 x queueDepth entries; one callback can carry all of them.
    const completions = new Float64Array(2 * Math.max(64, 2 * queueDepth));
    let dev: BackingDevice | undefined;
    const native = new binding.NativeBacking((count) => {
      if (dev !== undefined) dev.#onComplete(count);
    }, completions);
    const rc = native.open(path, opts.direct ?? true, opts.readOnly ?? false, opts.exclusive ?? false, queueDepth);
    if (rc < 0) {
      throw new RemapError(-rc, `cannot open backing ${path} (${native.errorStage()} failed)`, {
        device: path,
        op: 'open',
      });
    }
    dev = new BackingDevice(native, completions, queueDepth);
    return dev;
  }

  /** Ops accepted and not yet answered (in the kernel, in the worker, or queued in JS). */
  get inFlight(): number {
    return this.#kernelOps() + this.#queue.length;
  }

  get closed(): boolean {
    return this.#closed;
  }

  stats(): BackingStats {
    return { ...this.#stats };
  }

  /** @internal Allow TEST_HANG_OP on this device. */
  enableTestHooks(): void {
    if (!this.#nativeClosed) this.#native.enableTestHooks();
  }

  submit(op: BackingOpCode, buf: Uint8Array | null, offset: number, length: number, flags: number, cb: Callback): void {
    if (this.#closed) {
      queueMicrotask(() => deliver(cb, -EBADF));
      return;
    }
    const rec = this.#freeRecs.pop();
    if (rec === undefined) {
      this.#queue.push({ op, buf, offset, length, flags, cb, done: 0 });
    } else {
      rec.op = op;
      rec.buf = buf;
      rec.offset = offset;
      rec.length = length;
      rec.flags = flags;
      rec.cb = cb;
      rec.done = 0;
      this.#queue.push(rec);
    }
    this.#schedule();
  }

  /** Hands `res` to the op's callback; the record goes back to the pool first (the callback may submit). */
  #deliverAndFree(rec: OpRecord, res: number): void {
    const cb = rec.cb;
    rec.buf = null;
    rec.cb = noop;
    if (this.#freeRecs.length < this.#maxInFlight) this.#freeRecs.push(rec);
    deliver(cb, res);
  }

  /** Ops in the kernel (slots taken). */
  #kernelOps(): number {
    return this.#maxInFlight - this.#freeCount;
  }

  /** Takes the op of slot `slot` out of the kernel table. */
  #release(slot: number): void {
    this.#slots[slot] = null;
    this.#freeSlots[this.#freeCount++] = slot;
  }

  io(op: BackingOpCode, buf: Uint8Array | null, offset: number, length: number, flags = 0): Promise<number> {
    return new Promise<number>((resolve) => this.submit(op, buf, offset, length, flags, resolve));
  }

  read(buf: Uint8Array, offset: number): Promise<number> {
    return this.io(BackingOp.READ, buf, offset, buf.byteLength);
  }

  write(buf: Uint8Array, offset: number, fua = false): Promise<number> {
    return this.io(BackingOp.WRITE, buf, offset, buf.byteLength, fua ? IO_FUA : 0);
  }

  fdatasync(): Promise<number> {
    return this.io(BackingOp.FDATASYNC, null, 0, 0);
  }

  discard(offset: number, length: number): Promise<number> {
    return this.io(BackingOp.DISCARD, null, offset, length);
  }

  writeZeroes(offset: number, length: number): Promise<number> {
    return this.io(BackingOp.WRITE_ZEROES, null, offset, length);
  }

  /**
   * A new descriptor of the open device, owned by the caller (the ublk fast
   * path does its own I/O on it, docs/UBLK.md). Throws when closed.
   */
  dupFd(): number {
    const fd = this.#closed ? -EBADF : this.#native.dupFd();
    if (fd < 0) throw new RemapError(-fd, `cannot duplicate the descriptor of ${this.info.path}`, { op: 'dup' });
    return fd;
  }

  close(timeoutMs = 5000): Promise<CloseResult> {
    if (this.#closePromise === null) this.#closePromise = this.#close(timeoutMs);
    return this.#closePromise;
  }

  async #close(timeoutMs: number): Promise<CloseResult> {
    this.#closed = true;
    // Ops never handed to the kernel are cancelled outright.
    const queued = this.#queue;
    this.#queue = [];
    for (const rec of queued) {
      this.#cancelledInClose++;
      deliver(rec.cb, -ECANCELED);
    }
    if (this.#kernelOps() > 0) {
      this.#native.cancel();
      await new Promise<void>((resolve) => {
        const timer = setTimeout(() => {
          this.#drained = null;
          resolve();
        }, Math.max(0, timeoutMs));
        this.#drained = () => {
          clearTimeout(timer);
          this.#drained = null;
          resolve();
        };
      });
    }
    this.#nativeClosed = true;
    // The JS side already waited for the deadline; a worker still inside an
    // ioctl then is hung and gets detached almost at once.
    this.#native.close(this.#kernelOps() > 0 ? 10 : 1000);
    const left: OpRecord[] = [];
    for (let slot = 0; slot < this.#slots.length; slot++) {
      const rec = this.#slots[slot];
      if (rec !== null) {
        left.push(rec);
        this.#release(slot);
      }
    }
    for (const rec of left) {
      if (rec.buf !== null && (rec.op === BackingOp.READ || rec.op === BackingOp.WRITE)) quarantined.push(rec.buf);
      deliver(rec.cb, -ECANCELED);
    }
    return { cancelled: this.#cancelledInClose, abandoned: left.length };
  }

  #schedule(): void {
    if (!this.#flushScheduled) {
      this.#flushScheduled = true;
      queueMicrotask(this.#flush);
    }
  }

  #doFlush(): void {
    this.#flushScheduled = false;
    if (this.#nativeClosed || this.#queue.length === 0) return;
    const n = Math.min(this.#freeCount, this.#queue.length);
    if (n <= 0) return; // resumed from #onComplete when slots free up
    const batch = this.#queue.length === n ? this.#queue : this.#queue.slice(0, n);
    this.#queue = batch === this.#queue ? [] : this.#queue.slice(n);
    const desc = this.#desc;
    const bufs = this.#bufs;
    for (let i = 0; i < n; i++) {
      const rec = batch[i];
      const slot = this.#freeSlots[--this.#freeCount];
      const id = this.#seq++ * this.#maxInFlight + slot + 1;
      this.#slots[slot] = rec;
      this.#slotIds[slot] = id;
      const o = i * STRIDE;
      desc[o] = rec.op;
      desc[o + 1] = id;
      desc[o + 2] = rec.offset + rec.done;
      desc[o + 3] = rec.length - rec.done;
      desc[o + 4] = rec.flags;
      bufs[i] = rec.done > 0 && rec.buf !== null ? rec.buf.subarray(rec.done) : rec.buf;
    }
    this.#native.submit(desc, bufs, n);
    for (let i = 0; i < n; i++) bufs[i] = null;
    this.#stats.submitCalls++;
    this.#stats.ops += n;
  }

  #onComplete(count: number): void {
    this.#stats.completionCallbacks++;
    const c = this.#completions;
    for (let i = 0; i < count; i++) {
      const id = c[2 * i];
      const res = c[2 * i + 1];
      if (id === 0) continue; // the close-time ASYNC_CANCEL itself
      const slot = (id - 1) % this.#maxInFlight;
      const rec = this.#slots[slot];
      if (rec === null || this.#slotIds[slot] !== id) continue;
      this.#release(slot);
      this.#finish(rec, res);
    }
    if (this.#queue.length > 0 && !this.#closed) this.#schedule();
    if (this.#drained !== null && this.#kernelOps() === 0) this.#drained();
  }

  #finish(rec: OpRecord, res: number): void {
    const rw = rec.op === BackingOp.READ || rec.op === BackingOp.WRITE;
    if (!rw) {
      if (this.#closed && res === -ECANCELED) this.#cancelledInClose++;
      this.#deliverAndFree(rec, res);
      return;
    }
    if (res < 0) {
      if (this.#closed && res === -ECANCELED) this.#cancelledInClose++;
      this.#deliverAndFree(rec, res);
      return;
    }
    rec.done += res;
    if (rec.done >= rec.length) {
      this.#deliverAndFree(rec, rec.done);
      return;
    }
    if (rec.op === BackingOp.READ) {
      // res 0 is EOF. With O_DIRECT a short read off a block boundary is EOF
      // too: the remainder would start unaligned and only fail with EINVAL.
      const eof = res === 0 || (this.info.openMode === 'direct' && rec.done % this.info.logicalBlockSize !== 0);
      if (eof) {
        this.#deliverAndFree(rec, rec.done);
        return;
      }
    } else if (res === 0) {
      this.#deliverAndFree(rec, -EIO); // a write that makes no progress
      return;
    }
    if (this.#closed) {
      this.#deliverAndFree(rec, -ECANCELED);
      this.#cancelledInClose++;
      return;
    }
    this.#queue.push(rec); // continue the remainder
    this.#schedule();
  }
}

/**
 * A zeroed Buffer whose memory is aligned (posix_memalign), freed by its
 * finalizer. `hugePages`: a long-lived I/O buffer; from 1 MiB up it sits on
 * 2 MiB transparent huge pages, so an O_DIRECT request over it is physically
 * contiguous (docs/NATIVE.md; DM_REMAPD_THP=0 turns it off).
 */
export function allocAligned(size: number, alignment = 4096, hugePages = false): Buffer {
  if (!Number.isInteger(size) || size < 0 || !Number.isInteger(alignment) || alignment < 8) {
    throw new RemapError(EINVAL, `allocAligned(${size}, ${alignment}): bad arguments`, { op: 'alloc' });
  }
  const r = loadBinding().allocAligned(size, alignment, hugePages);
  if (typeof r === 'number') {
    throw new RemapError(-r, `allocAligned(${size}, ${alignment}) failed`, { op: 'alloc' });
  }
  return r;
}
