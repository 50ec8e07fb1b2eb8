/**
 * The transmission phase over any duplex stream: after our own handshake, or
 * on a socket handed over already in transmission (the kernel NBD client).
 *
 * Requests run concurrently. Each reply is put whole into the output batch
 * as soon as its request completes; the batch (every reply completed in one
 * event-loop turn) goes to the socket in one write from a setImmediate, so
 * replies go out in completion order, the bytes of two replies never
 * interleave, and a burst of completions costs one syscall.
 *
 * Session states:
 *   serving --NBD_CMD_DISC / EOF / framing lost--> draining --no requests left--> closed
 *   serving --shutdown()--> closing (new requests: ESHUTDOWN) --drained or deadline--> closed
 */
import type { Duplex } from 'node:stream';
import type { Logger } from 'pino';
import type { EngineRequest } from '../../engine/engine.js';
import { errnoName, type RemapError } from '../../errors.js';
import { allocAligned } from '../../native/backing.js';
import type { NbdBackend } from './backend.js';
import {
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_MAX_PAYLOAD,
  NBD_REPLY_FLAG_DONE,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  NbdCmd,
  NbdErr,
  NbdReplyType,
  SIMPLE_REPLY_BYTES,
  STRUCTURED_HEADER_BYTES,
  encodeErrorChunk,
  toNbdError,
} from './protocol.js';
import { RequestParser, STEP_FATAL, STEP_NONE } from './request-parser.js';

/** Counters shared by every connection of one export. */
export interface NbdStats {
  connections: number;
  requests: number;
  errors: number;
  bytesRead: number;
  bytesWritten: number;
}

export function newStats(): NbdStats {
  return { connections: 0, requests: 0, errors: 0, bytesRead: 0, bytesWritten: 0 };
}

export interface TransmissionOptions {
  /** Transmission flags as negotiated (or as the kernel was told). */
  flags: number;
  /** Structured replies negotiated (never for the kernel client). */
  structuredReplies: boolean;
  logger: Logger;
  /** Bytes already read from the stream that belong to the transmission phase. */
  initialData?: Uint8Array;
  /** Shared counters to add to (a fresh set otherwise). */
  stats?: NbdStats;
  /** Pause reading when this many request/reply bytes are pending (64 MiB default). */
  maxBytesInFlight?: number;
  /** ...or this many requests (1024 default). */
  maxRequestsInFlight?: number;
}

export type SessionState = 'serving' | 'draining' | 'closing' | 'closed';

const DEFAULT_MAX_BYTES_IN_FLIGHT = 64 * 1024 * 1024;
const DEFAULT_MAX_REQUESTS_IN_FLIGHT = 1024;
/** After the deadline, how long a closing socket gets to flush its last replies. */
const END_GRACE_MS = 100;

const CMD_NAMES: Record<number, string> = {
  [NbdCmd.READ]: 'read', [NbdCmd.WRITE]: 'write', [NbdCmd.DISC]: 'disc', [NbdCmd.FLUSH]: 'flush',
  [NbdCmd.TRIM]: 'trim', [NbdCmd.CACHE]: 'cache', [NbdCmd.WRITE_ZEROES]: 'write-zeroes', [NbdCmd.BLOCK_STATUS]: 'block-status',
};

/**
 * A few aligned buffers per size class, so steady I/O does not allocate:
 * enough 4 KiB buffers for a deep queue, fewer of the larger classes.
 */
class AlignedPool {
  private readonly free = new Map<number, Buffer[]>();
  private pooledBytes = 0;

  constructor(
    private readonly maxPooledBytes = 16 * 1024 * 1024,
    private readonly minPerClass = 8,
    private readonly bytesPerClass = 2 * 1024 * 1024,
  ) {}

  static classOf(length: number): number {
    let c = 4096;
    while (c < length) c *= 2;
    return c;
  }

  get(length: number): Buffer {
    const c = AlignedPool.classOf(length);
    const list = this.free.get(c);
    const b = list?.pop();
    if (b !== undefined) {
      this.pooledBytes -= c;
      return b;
    }
    return allocAligned(c, 4096, true);
  }

  put(b: Buffer): void {
    const c = b.byteLength;
    if (this.pooledBytes + c > this.maxPooledBytes) return;
    let list = this.free.get(c);
    if (list === undefined) this.free.set(c, (list = []));
    if (list.length >= Math.max(this.minPerClass, this.bytesPerClass / c)) return;
    list.push(b);
    this.pooledBytes += c;
  }
}

/**
 * One request from dispatch until its reply is written. Objects are reused
 * once the engine has called back and the reply is out; `done` is bound once
 * per object, so submitting allocates no closure.
 */
class Req {
  type = 0;
  flags = 0;
  handleHi = 0;
  handleLo = 0;
  offset = 0;
  length = 0;
  /** Pool buffer (READ destination or WRITE payload), or null. */
  buf: Buffer | null = null;
  /** Bytes counted against the in-flight bound. */
  bytes = 0;
  answered = false;
  /** The buffer may go back to the pool once the reply is written. */
  reusable = true;
  /** The engine holds `done` and has not called it yet. */
  engineBusy = false;
  /** TRIM with FUA: flush before answering. */
  flushAfter = false;
  readonly done: (err: RemapError | null) => void;

  constructor(onDone: (r: Req, err: RemapError | null) => void) {
    this.done = (err) => onDone(this, err);
  }
}

/** The 64-bit handle (only for error chunks and logs: the hot path copies its two words). */
function handleOf(r: Req): bigint {
  return (BigInt(r.handleHi) << 32n) | BigInt(r.handleLo);
}

function put32(b: Buffer, at: number, v: number): void {
  b[at] = v >>> 24;
  b[at + 1] = v >>> 16;
  b[at + 2] = v >>> 8;
  b[at + 3] = v;
}

class ReplyError {
  constructor(readonly errno: number, readonly message: string) {}
}

/** Reply data up to this size is copied into the batch buffer; larger data is written from its own buffer. */
const COPY_MAX = 64 * 1024;
/** Batch buffers: reply headers and small data of one event-loop turn, written at once. */
const BATCH_BYTES = 256 * 1024;
const BATCH_BUFFERS_POOLED = 2;
const REQS_POOLED = 1024;
const OFFSET_DATA_HEADER_BYTES = STRUCTURED_HEADER_BYTES + 8;

export class TransmissionSession {
  readonly stats: NbdStats;
  /** Resolves when the stream is closed; never rejects. */
  readonly closed: Promise<void>;

  private stateValue: SessionState = 'serving';
  private readonly parser: RequestParser;
  private readonly pool = new AlignedPool();
  private readonly inflight = new Set<Req>();
  private readonly freeReqs: Req[] = [];
  private bytesInFlight = 0;
  private paused = false;
  private readonly maxBytes: number;
  private readonly maxRequests: number;
  private readonly log: Logger;
  private readonly minBlock: number;
  private readonly structured: boolean;
  private requests = 0;
  private closeReason = 'client closed the connection';
  private resolveClosed!: () => void;
  private drainWaiters: Array<() => void> = [];

  // Output batch: replies of one event-loop turn, written in one go.
  /** Batch buffer being filled (null: take one when needed). */
  private out: Buffer | null = null;
  /** Start of the bytes of `out` not yet cut into `segs`. */
  private outStart = 0;
  private outLen = 0;
  /** Pieces of the batch in wire order: slices of batch buffers and large READ data. */
  private segs: Buffer[] = [];
  /** Requests whose replies are in the batch (released when it is written). */
  private batchReqs: Req[] = [];
  /** Batch buffers the batch uses (pooled again when it is written). */
  private batchBufs: Buffer[] = [];
  private readonly freeBatchBufs: Buffer[] = [];
  private flushScheduled = false;
  private readonly flushOutNow = (): void => this.flushOut();
  private readonly onEngineDone = (r: Req, err: RemapError | null): void => this.engineDone(r, err);

  constructor(private readonly socket: Duplex, private readonly backend: NbdBackend, private readonly opts: TransmissionOptions) {
    this.stats = opts.stats ?? newStats();
    this.log = opts.logger;
    this.minBlock = backend.blockSize;
    this.structured = opts.structuredReplies;
    this.maxBytes = opts.maxBytesInFlight ?? DEFAULT_MAX_BYTES_IN_FLIGHT;
    this.maxRequests = opts.maxRequestsInFlight ?? DEFAULT_MAX_REQUESTS_IN_FLIGHT;
    this.parser = new RequestParser((len) => this.pool.get(len), NBD_MAX_PAYLOAD);
    this.closed = new Promise((resolve) => { this.resolveClosed = resolve; });

    socket.on('data', (chunk: Buffer) => {
      if (this.backlog !== null) this.backlog = Buffer.concat([this.backlog, chunk]);
      else this.onData(chunk);
    });
    socket.on('end', () => {
      // The stream can emit 'end' while requests held back by backpressure
      // still wait in `backlog`: they are parsed first (see resumeInput).
      if (this.backlog !== null) this.inputEnded = true;
      else this.onInputEnd();
    });
    socket.on('error', (err: Error) => {
      this.log.debug({ err: err.message }, 'socket error');
      this.closeReason = `socket error: ${err.message}`;
      socket.destroy();
    });
    socket.on('close', () => this.onClose());
    if (opts.initialData !== undefined && opts.initialData.length > 0) this.onData(opts.initialData);
    socket.resume();
  }

  get state(): SessionState {
    return this.stateValue;
  }

  get requestsInFlight(): number {
    return this.inflight.size;
  }

  /**
   * Stop serving: new requests are answered ESHUTDOWN, in-flight ones may
   * finish until the deadline; those still running then are answered
   * ESHUTDOWN (their late results are dropped) and the stream is ended.
   */
  async shutdown(deadlineMs: number): Promise<void> {
    if (this.stateValue === 'closed') return;
    if (this.stateValue === 'serving') this.stateValue = 'closing';
    this.closeReason = 'server shutdown';
    const until = Date.now() + Math.max(0, deadlineMs);
    if (this.inflight.size > 0) {
      await new Promise<void>((resolve) => {
        const t = setTimeout(done, Math.max(0, until - Date.now()));
        function done(): void { clearTimeout(t); resolve(); }
        this.drainWaiters.push(done);
      });
    }
    for (const r of [...this.inflight]) {
      if (!r.answered) this.reply(r, new ReplyError(NbdErr.ESHUTDOWN, 'server is shutting down'), false, false);
    }
    await this.endStream(END_GRACE_MS);
  }

  // ------------------------------------------------------------ input

  private onData(chunk: Uint8Array): void {
    if (this.stateValue !== 'serving' && this.stateValue !== 'closing') return;
    // Every request of the chunk is dispatched in this turn (so the backing
    // device gets them in one submit), but one at a time, so that
    // backpressure can stop us mid-chunk: the rest then waits in `backlog`
    // until requests complete.
    const p = this.parser;
    const end = chunk.length;
    let at = 0;
    while (at < end) {
      if (this.paused) {
        this.backlog = chunk.subarray(at);
        return;
      }
      at = p.step(chunk, at);
      const got = p.stepped;
      if (got === STEP_NONE) return;
      if (got === STEP_FATAL) {
        this.log.warn({ reason: p.fatalReason }, 'protocol violation, disconnecting');
        this.beginDrain(`protocol violation: ${p.fatalReason}`);
        return;
      }
      if (p.type === NbdCmd.DISC) {
        if (p.requestPayload !== null) this.pool.put(p.requestPayload as Buffer);
        this.beginDrain('client sent NBD_CMD_DISC');
        return;
      }
      this.dispatch(p);
      if (this.stateValue !== 'serving' && this.stateValue !== 'closing') return;
    }
  }

  /** Bytes received while paused; parsed before the socket is read again. */
  private backlog: Uint8Array | null = null;
  /** The client ended its side while a backlog was still unparsed. */
  private inputEnded = false;

  private onInputEnd(): void {
    if (this.parser.partialBytes > 0) this.log.warn({ partialBytes: this.parser.partialBytes }, 'connection ended inside a request');
    this.beginDrain('client closed the connection');
  }

  private resumeInput(): void {
    // Deferred: release() may run deep inside a completion callback.
    setImmediate(() => {
      if (this.paused || (this.stateValue !== 'serving' && this.stateValue !== 'closing')) return;
      const b = this.backlog;
      this.backlog = null;
      if (b !== null) this.onData(b);
      if (this.inputEnded && this.backlog === null) {
        this.inputEnded = false;
        this.onInputEnd();
        return;
      }
      if (!this.paused && this.backlog === null && (this.stateValue === 'serving' || this.stateValue === 'closing')) this.socket.resume();
    });
  }

  private beginDrain(reason: string): void {
    if (this.stateValue === 'closed' || this.stateValue === 'draining') return;
    this.closeReason = reason;
    this.stateValue = 'draining';
    this.socket.pause();
    if (this.inflight.size === 0) void this.endStream(END_GRACE_MS);
  }

  private updateBackpressure(): void {
    const over = this.bytesInFlight >= this.maxBytes || this.inflight.size >= this.maxRequests;
    if (over && !this.paused) {
      this.paused = true;
      this.socket.pause();
    } else if (!over && this.paused) {
      this.paused = false;
      this.resumeInput();
    }
  }

  // --------------------------------------------------------- dispatch

  /** Take the request the parser just completed. */
  private dispatch(p: RequestParser): void {
    this.requests++;
    this.stats.requests++;
    const r = this.freeReqs.pop() ?? new Req(this.onEngineDone);
    r.type = p.type;
    r.flags = p.flags;
    r.handleHi = p.handleHi;
    r.handleLo = p.handleLo;
    r.offset = p.offset;
    r.length = p.length;
    r.buf = p.requestPayload as Buffer | null;
    r.answered = false;
    r.reusable = true;
    r.engineBusy = false;
    r.flushAfter = false;
    // A READ will hold `length` bytes of reply; a WRITE already holds its payload.
    r.bytes = r.type === NbdCmd.READ ? Math.min(r.length, NBD_MAX_PAYLOAD) : r.buf?.byteLength ?? 0;
    this.inflight.add(r);
    this.bytesInFlight += r.bytes;
    this.updateBackpressure();

    if (this.stateValue === 'closing') {
      this.reply(r, new ReplyError(NbdErr.ESHUTDOWN, 'server is shutting down'), false, false);
      return;
    }
    const bad = this.validate(r);
    if (bad !== null) {
      this.reply(r, bad, false, true);
      return;
    }
    const fua = (r.flags & NBD_CMD_FLAG_FUA) !== 0;
    switch (r.type) {
      case NbdCmd.READ: {
        const buf = this.pool.get(r.length);
        r.buf = buf;
        this.submit(r, { op: 'read', offset: r.offset, length: r.length, buffer: buf });
        return;
      }
      case NbdCmd.WRITE:
        this.submit(r, { op: 'write', offset: r.offset, length: r.length, buffer: r.buf as Buffer, fua });
        return;
      case NbdCmd.FLUSH:
        this.submit(r, { op: 'flush', offset: 0, length: 0 });
        return;
      case NbdCmd.TRIM:
        // FUA on TRIM: make the discard durable before answering.
        r.flushAfter = fua;
        this.submit(r, { op: 'discard', offset: r.offset, length: r.length });
        return;
      case NbdCmd.WRITE_ZEROES:
        if ((r.flags & NBD_CMD_FLAG_FAST_ZERO) !== 0) {
          // See canFastZero(): we never promise that zeroing is fast.
          this.reply(r, new ReplyError(NbdErr.ENOTSUP, 'fast zeroing is not available'), false, false);
          return;
        }
        // NO_HOLE needs nothing: the engine zeroes with ZERO_RANGE/BLKZEROOUT
        // or real writes, none of which deallocates.
        this.submit(r, { op: 'writeZeroes', offset: r.offset, length: r.length, fua });
        return;
      case NbdCmd.CACHE:
        // Validated above; O_DIRECT I/O has no cache to warm.
        this.reply(r, null, false, false);
        return;
      default:
        this.reply(r, new ReplyError(NbdErr.EINVAL, `unknown command ${r.type}`), false, true);
    }
  }

  /** Flags, command support, read-only and range checks, in that order; null when fine. */
  private validate(h: Req): ReplyError | null {
    const f = this.opts.flags;
    let allowed = (f & NBD_FLAG_SEND_FUA) !== 0 ? NBD_CMD_FLAG_FUA : 0;
    let supported = true;
    let writes = false;
    let ranged = true;
    switch (h.type) {
      case NbdCmd.READ:
        if ((f & NBD_FLAG_SEND_DF) !== 0 && this.structured) allowed |= NBD_CMD_FLAG_DF;
        break;
      case NbdCmd.WRITE:
        writes = true;
        break;
      case NbdCmd.FLUSH:
        supported = (f & NBD_FLAG_SEND_FLUSH) !== 0;
        ranged = false;
        break;
      case NbdCmd.TRIM:
        supported = (f & NBD_FLAG_SEND_TRIM) !== 0;
        writes = true;
        break;
      case NbdCmd.WRITE_ZEROES:
        supported = (f & NBD_FLAG_SEND_WRITE_ZEROES) !== 0;
        writes = true;
        allowed |= NBD_CMD_FLAG_NO_HOLE;
        if ((f & NBD_FLAG_SEND_FAST_ZERO) !== 0) allowed |= NBD_CMD_FLAG_FAST_ZERO;
        break;
      case NbdCmd.CACHE:
        supported = (f & NBD_FLAG_SEND_CACHE) !== 0;
        break;
      default:
        return new ReplyError(NbdErr.EINVAL, `unknown command ${h.type}`);
    }
    const cmd = (): string => CMD_NAMES[h.type] ?? `command ${h.type}`;
    if (!supported) return new ReplyError(NbdErr.EINVAL, `${cmd()} was not advertised`);
    if ((h.flags & ~allowed) !== 0) return new ReplyError(NbdErr.EINVAL, `${cmd()} with unsupported flags 0x${h.flags.toString(16)}`);
    if (writes && (f & NBD_FLAG_READ_ONLY) !== 0) return new ReplyError(NbdErr.EPERM, `${cmd()} on a read-only export`);
    if (!ranged) {
      // "For a flush request, length and offset are reserved, and MUST be set to all-zero."
      if (h.offset !== 0 || h.length !== 0) return new ReplyError(NbdErr.EINVAL, 'flush with a nonzero offset or length');
      return null;
    }
    if (h.length === 0) return new ReplyError(NbdErr.EINVAL, `${cmd()} of zero length`);
    if ((h.type === NbdCmd.READ || h.type === NbdCmd.WRITE) && h.length > NBD_MAX_PAYLOAD) {
      return new ReplyError(NbdErr.EINVAL, `${cmd()} of ${h.length} bytes exceeds the ${NBD_MAX_PAYLOAD}-byte maximum`);
    }
    if (h.offset === Number.POSITIVE_INFINITY) {
      // An offset of 2^53 or more (the parser's Infinity): past the end of any export.
      return new ReplyError(writes ? NbdErr.ENOSPC : NbdErr.EINVAL, `${cmd()} at an offset of 2^53 or more ends past the export size ${this.backend.sizeBytes}`);
    }
    if (h.offset % this.minBlock !== 0 || h.length % this.minBlock !== 0) {
      return new ReplyError(NbdErr.EINVAL, `${cmd()} at ${h.offset}+${h.length} is not aligned to the ${this.minBlock}-byte block`);
    }
    if (h.offset + h.length > this.backend.sizeBytes) {
      return new ReplyError(writes ? NbdErr.ENOSPC : NbdErr.EINVAL, `${cmd()} at ${h.offset}+${h.length} ends past the export size ${this.backend.sizeBytes}`);
    }
    return null;
  }

  private submit(r: Req, req: EngineRequest): void {
    r.engineBusy = true;
    this.backend.submitCb(req, r.done);
  }

  private engineDone(r: Req, err: RemapError | null): void {
    r.engineBusy = false;
    if (r.answered) return; // answered ESHUTDOWN at a deadline (or the connection closed); the result is dropped
    if (err === null && r.flushAfter) {
      r.flushAfter = false;
      r.engineBusy = true;
      this.backend.submitCb({ op: 'flush', offset: 0, length: 0 }, r.done);
      return;
    }
    if (err !== null) {
      this.reply(r, new ReplyError(toNbdError(err.errno), err.message), false, true, err.errno);
      return;
    }
    if (r.type === NbdCmd.READ) {
      this.stats.bytesRead += r.length;
      this.reply(r, null, true, true);
      return;
    }
    if (r.type === NbdCmd.WRITE) this.stats.bytesWritten += r.length;
    this.reply(r, null, false, true);
  }

  // ----------------------------------------------------------- output

  /**
   * Add the whole reply for one request to the output batch, which is
   * written in one go at the end of this event-loop turn (see flushOut), so
   * replies go out in completion order, whole. `withData`: a successful READ
   * (its data is `r.buf`). `reusable`: the buffer may go back to the pool
   * once written (false when the engine may still touch it).
   */
  private reply(r: Req, err: ReplyError | null, withData: boolean, reusable: boolean, hostErrno?: number): void {
    r.answered = true;
    if (err !== null) {
      this.stats.errors++;
      this.log.warn({
        handle: `0x${handleOf(r).toString(16)}`, cmd: CMD_NAMES[r.type] ?? r.type, offset: r.offset, length: r.length,
        errno: errnoName(err.errno), ...(hostErrno !== undefined && hostErrno !== err.errno ? { hostErrno: errnoName(hostErrno) } : {}),
        err: err.message,
      }, 'request failed');
    }
    if (this.socket.destroyed || !this.socket.writable) {
      this.release(r, reusable);
      return;
    }
    r.reusable = reusable;
    if (err !== null) {
      // Structured: an error chunk with a message (and READ MUST NOT get a
      // simple reply). Simple: the error field, and no payload even for READ.
      if (this.structured) {
        const chunk = encodeErrorChunk(handleOf(r), err.errno, err.message);
        const b = this.room(chunk.length);
        b.set(chunk, this.outLen);
        this.outLen += chunk.length;
      } else {
        this.putSimpleReply(r, err.errno);
      }
    } else if (withData) {
      const data = r.buf as Buffer;
      const n = r.length;
      if (n <= COPY_MAX) {
        this.room((this.structured ? OFFSET_DATA_HEADER_BYTES : SIMPLE_REPLY_BYTES) + n); // header and data in one piece
        if (this.structured) this.putOffsetDataHeader(r, n);
        else this.putSimpleReply(r, 0);
        const b = this.room(n);
        data.copy(b, this.outLen, 0, n);
        this.outLen += n;
        // Copied: the buffer is free now (a successful READ is always reusable).
        if (reusable) this.pool.put(data);
        r.buf = null;
      } else {
        if (this.structured) this.putOffsetDataHeader(r, n);
        else this.putSimpleReply(r, 0);
        this.cutSegment();
        this.segs.push(n === data.length ? data : data.subarray(0, n));
      }
    } else {
      // A simple reply is allowed for anything but READ even when structured.
      this.putSimpleReply(r, 0);
    }
    this.batchReqs.push(r);
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      setImmediate(this.flushOutNow);
    }
  }

  private putSimpleReply(r: Req, error: number): void {
    const b = this.room(SIMPLE_REPLY_BYTES);
    const at = this.outLen;
    put32(b, at, NBD_SIMPLE_REPLY_MAGIC);
    put32(b, at + 4, error);
    put32(b, at + 8, r.handleHi);
    put32(b, at + 12, r.handleLo);
    this.outLen = at + SIMPLE_REPLY_BYTES;
  }

  /** NBD_REPLY_TYPE_OFFSET_DATA with DONE: chunk header and offset; `n` data bytes follow. */
  private putOffsetDataHeader(r: Req, n: number): void {
    const b = this.room(OFFSET_DATA_HEADER_BYTES);
    const at = this.outLen;
    put32(b, at, NBD_STRUCTURED_REPLY_MAGIC);
    b[at + 4] = NBD_REPLY_FLAG_DONE >>> 8;
    b[at + 5] = NBD_REPLY_FLAG_DONE;
    b[at + 6] = NbdReplyType.OFFSET_DATA >>> 8;
    b[at + 7] = NbdReplyType.OFFSET_DATA;
    put32(b, at + 8, r.handleHi);
    put32(b, at + 12, r.handleLo);
    put32(b, at + 16, 8 + n);
    put32(b, at + 20, Math.floor(r.offset / 4294967296));
    put32(b, at + 24, r.offset >>> 0);
    this.outLen = at + OFFSET_DATA_HEADER_BYTES;
  }

  /** The batch buffer, with at least `n` bytes free at `outLen`. */
  private room(n: number): Buffer {
    const o = this.out;
    if (o !== null && o.length - this.outLen >= n) return o;
    this.cutSegment();
    // Every piece (a header, an error chunk, data up to COPY_MAX) fits a batch buffer.
    const b = this.freeBatchBufs.pop() ?? Buffer.allocUnsafeSlow(Math.max(BATCH_BYTES, n));
    this.out = b;
    this.outStart = 0;
    this.outLen = 0;
    this.batchBufs.push(b);
    return b;
  }

  /** Close the piece of the batch buffer filled so far (before a large READ's data, and at flush). */
  private cutSegment(): void {
    if (this.out !== null && this.outLen > this.outStart) {
      this.segs.push(this.out.subarray(this.outStart, this.outLen));
      this.outStart = this.outLen;
    }
  }

  /**
   * Write the batch: one socket write (a corked series when large READ data
   * rides along, which the stream hands to the socket as one writev). Its
   * requests are released when it has been written.
   */
  private flushOut(): void {
    this.flushScheduled = false;
    this.cutSegment();
    this.out = null;
    const segs = this.segs;
    const reqs = this.batchReqs;
    const bufs = this.batchBufs;
    if (segs.length === 0 && reqs.length === 0 && bufs.length === 0) return;
    this.segs = [];
    this.batchReqs = [];
    this.batchBufs = [];
    const done = (): void => this.written(reqs, bufs);
    const s = this.socket;
    if (segs.length === 0 || s.destroyed || !s.writable) {
      done();
      return;
    }
    if (segs.length === 1) {
      s.write(segs[0], done);
      return;
    }
    s.cork();
    const last = segs.length - 1;
    for (let i = 0; i < last; i++) s.write(segs[i]);
    s.write(segs[last], done);
    s.uncork();
  }

  private written(reqs: Req[], bufs: Buffer[]): void {
    for (const b of bufs) {
      if (b.length === BATCH_BYTES && this.freeBatchBufs.length < BATCH_BUFFERS_POOLED) this.freeBatchBufs.push(b);
    }
    for (const r of reqs) this.release(r, r.reusable);
  }

  private release(r: Req, reusable: boolean): void {
    if (!this.inflight.delete(r)) return;
    this.bytesInFlight -= r.bytes;
    if (r.buf !== null && reusable) this.pool.put(r.buf);
    r.buf = null;
    // Reused only once the engine has let go of it (not after an ESHUTDOWN at the deadline).
    if (!r.engineBusy && this.freeReqs.length < REQS_POOLED) this.freeReqs.push(r);
    this.updateBackpressure();
    if (this.inflight.size === 0) {
      const w = this.drainWaiters;
      this.drainWaiters = [];
      for (const f of w) f();
      if (this.stateValue === 'draining') void this.endStream(END_GRACE_MS);
    }
  }

  private endStream(graceMs: number): Promise<void> {
    if (this.stateValue !== 'closed' && !this.socket.destroyed) {
      // Replies still in the batch go out before the end.
      if (this.flushScheduled) this.flushOut();
      this.socket.end();
      const t = setTimeout(() => this.socket.destroy(), graceMs);
      t.unref();
      void this.closed.then(() => clearTimeout(t));
    }
    return this.closed;
  }

  private onClose(): void {
    if (this.stateValue === 'closed') return;
    this.stateValue = 'closed';
    // Requests still running have nobody to answer; their buffers stay with
    // the engine callbacks and are dropped with them.
    for (const r of this.inflight) r.answered = true;
    this.inflight.clear();
    this.bytesInFlight = 0;
    const w = this.drainWaiters;
    this.drainWaiters = [];
    for (const f of w) f();
    this.log.info({ requests: this.requests, reason: this.closeReason }, 'connection closed');
    this.resolveClosed();
  }
}

/**
 * Serve the transmission phase on a stream (a socket after our handshake, or
 * one handed over already in transmission, e.g. for the kernel NBD client).
 */
export function serveTransmission(socket: Duplex, backend: NbdBackend, opts: TransmissionOptions): TransmissionSession {
  return new TransmissionSession(socket, backend, opts);
}
