/**
 * The transmission phase over any duplex stream: after our own handshake, or
 * on a socket handed over already in transmission (the kernel NBD client).
 *
 * Requests run concurrently; each reply is written whole, in one synchronous
 * burst, as soon as its request completes, so replies go out in completion
 * order and the bytes of two replies never interleave.
 *
 * Session states:
 *   serving --NBD_CMD_DISC / EOF / framing lost--> draining --no requests left--> closed
 *   serving --shutdown()--> closing (new requests: ESHUTDOWN) --drained or deadline--> closed
 */
import type { Duplex } from 'node:stream';
import type { Logger } from 'pino';
import type { EngineOp, EngineRequest } from '../../engine/engine.js';
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
  NbdCmd,
  NbdErr,
  encodeErrorChunk,
  encodeOffsetDataHeader,
  encodeSimpleReply,
  toNbdError,
  type RequestHeader,
} from './protocol.js';
import { RequestParser } from './request-parser.js';

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

/** A few aligned buffers per size class, so steady I/O does not allocate. */
class AlignedPool {
  private readonly free = new Map<number, Buffer[]>();
  private pooledBytes = 0;

  constructor(private readonly maxPooledBytes = 16 * 1024 * 1024, private readonly perClass = 8) {}

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
    return allocAligned(c);
  }

  put(b: Buffer): void {
    const c = b.byteLength;
    if (this.pooledBytes + c > this.maxPooledBytes) return;
    let list = this.free.get(c);
    if (list === undefined) this.free.set(c, (list = []));
    if (list.length >= this.perClass) return;
    list.push(b);
    this.pooledBytes += c;
  }
}

interface InFlight {
  h: RequestHeader;
  /** Pool buffer (READ destination or WRITE payload), or null. */
  buf: Buffer | null;
  /** Bytes counted against the in-flight bound. */
  bytes: number;
  answered: boolean;
}

class ReplyError {
  constructor(readonly errno: number, readonly message: string) {}
}

export class TransmissionSession {
  readonly stats: NbdStats;
  /** Resolves when the stream is closed; never rejects. */
  readonly closed: Promise<void>;

  private stateValue: SessionState = 'serving';
  private readonly parser: RequestParser;
  private readonly pool = new AlignedPool();
  private readonly inflight = new Set<InFlight>();
  private bytesInFlight = 0;
  private paused = false;
  private readonly maxBytes: number;
  private readonly maxRequests: number;
  private readonly log: Logger;
  private readonly minBlock: number;
  private requests = 0;
  private closeReason = 'client closed the connection';
  private resolveClosed!: () => void;
  private drainWaiters: Array<() => void> = [];

  constructor(private readonly socket: Duplex, private readonly backend: NbdBackend, private readonly opts: TransmissionOptions) {
    this.stats = opts.stats ?? newStats();
    this.log = opts.logger;
    this.minBlock = backend.blockSize;
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
      if (!r.answered) this.reply(r, new ReplyError(NbdErr.ESHUTDOWN, 'server is shutting down'), null, false);
    }
    await this.endStream(END_GRACE_MS);
  }

  // ------------------------------------------------------------ input

  private onData(chunk: Uint8Array): void {
    if (this.stateValue !== 'serving' && this.stateValue !== 'closing') return;
    // One request at a time, so that backpressure can stop us mid-chunk: the
    // rest waits in `backlog` until requests complete.
    let at = 0;
    while (at < chunk.length) {
      if (this.paused) {
        this.backlog = chunk.subarray(at);
        return;
      }
      const events = this.parser.push(chunk.subarray(at), 1);
      at += this.parser.consumed;
      const ev = events[0];
      if (ev === undefined) return;
      if (ev.kind === 'fatal') {
        this.log.warn({ reason: ev.reason }, 'protocol violation, disconnecting');
        this.beginDrain(`protocol violation: ${ev.reason}`);
        return;
      }
      const payloadBuf = ev.payload as Buffer | null;
      if (ev.header.type === NbdCmd.DISC) {
        if (payloadBuf !== null) this.pool.put(payloadBuf);
        this.beginDrain('client sent NBD_CMD_DISC');
        return;
      }
      this.dispatch(ev.header, payloadBuf);
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

  private dispatch(h: RequestHeader, payload: Buffer | null): void {
    this.requests++;
    this.stats.requests++;
    const r: InFlight = { h, buf: payload, bytes: 0, answered: false };
    // A READ will hold `length` bytes of reply; a WRITE already holds its payload.
    r.bytes = h.type === NbdCmd.READ ? Math.min(h.length, NBD_MAX_PAYLOAD) : payload?.byteLength ?? 0;
    this.inflight.add(r);
    this.bytesInFlight += r.bytes;
    this.updateBackpressure();

    if (this.stateValue === 'closing') {
      this.reply(r, new ReplyError(NbdErr.ESHUTDOWN, 'server is shutting down'), null, false);
      return;
    }
    const bad = this.validate(h);
    if (bad !== null) {
      this.reply(r, bad, null, true);
      return;
    }
    const fua = (h.flags & NBD_CMD_FLAG_FUA) !== 0;
    switch (h.type) {
      case NbdCmd.READ: {
        r.buf = this.pool.get(h.length);
        this.submit(r, { op: 'read', offset: h.offset, length: h.length, buffer: r.buf });
        return;
      }
      case NbdCmd.WRITE:
        this.submit(r, { op: 'write', offset: h.offset, length: h.length, buffer: r.buf as Buffer, fua });
        return;
      case NbdCmd.FLUSH:
        this.submit(r, { op: 'flush', offset: 0, length: 0 });
        return;
      case NbdCmd.TRIM:
        this.submit(r, { op: 'discard', offset: h.offset, length: h.length }, fua);
        return;
      case NbdCmd.WRITE_ZEROES:
        if ((h.flags & NBD_CMD_FLAG_FAST_ZERO) !== 0) {
          // See canFastZero(): we never promise that zeroing is fast.
          this.reply(r, new ReplyError(NbdErr.ENOTSUP, 'fast zeroing is not available'), null, false);
          return;
        }
        // NO_HOLE needs nothing: the engine zeroes with ZERO_RANGE/BLKZEROOUT
        // or real writes, none of which deallocates.
        this.submit(r, { op: 'writeZeroes', offset: h.offset, length: h.length, fua });
        return;
      case NbdCmd.CACHE:
        // Validated above; O_DIRECT I/O has no cache to warm.
        this.reply(r, null, null, false);
        return;
      default:
        this.reply(r, new ReplyError(NbdErr.EINVAL, `unknown command ${h.type}`), null, true);
    }
  }

  /** Flags, command support, read-only and range checks, in that order; null when fine. */
  private validate(h: RequestHeader): ReplyError | null {
    const f = this.opts.flags;
    const cmd = CMD_NAMES[h.type] ?? `command ${h.type}`;
    let allowed = (f & NBD_FLAG_SEND_FUA) !== 0 ? NBD_CMD_FLAG_FUA : 0;
    let supported = true;
    let writes = false;
    let ranged = true;
    switch (h.type) {
      case NbdCmd.READ:
        if ((f & NBD_FLAG_SEND_DF) !== 0 && this.opts.structuredReplies) allowed |= NBD_CMD_FLAG_DF;
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
    if (!supported) return new ReplyError(NbdErr.EINVAL, `${cmd} was not advertised`);
    if ((h.flags & ~allowed) !== 0) return new ReplyError(NbdErr.EINVAL, `${cmd} with unsupported flags 0x${h.flags.toString(16)}`);
    if (writes && (f & NBD_FLAG_READ_ONLY) !== 0) return new ReplyError(NbdErr.EPERM, `${cmd} on a read-only export`);
    if (!ranged) {
      // "For a flush request, length and offset are reserved, and MUST be set to all-zero."
      if (h.offset !== 0 || h.length !== 0) return new ReplyError(NbdErr.EINVAL, 'flush with a nonzero offset or length');
      return null;
    }
    if (h.length === 0) return new ReplyError(NbdErr.EINVAL, `${cmd} of zero length`);
    if ((h.type === NbdCmd.READ || h.type === NbdCmd.WRITE) && h.length > NBD_MAX_PAYLOAD) {
      return new ReplyError(NbdErr.EINVAL, `${cmd} of ${h.length} bytes exceeds the ${NBD_MAX_PAYLOAD}-byte maximum`);
    }
    if (h.offset % this.minBlock !== 0 || h.length % this.minBlock !== 0) {
      return new ReplyError(NbdErr.EINVAL, `${cmd} at ${h.offset}+${h.length} is not aligned to the ${this.minBlock}-byte block`);
    }
    if (h.offset + h.length > this.backend.sizeBytes) {
      return new ReplyError(writes ? NbdErr.ENOSPC : NbdErr.EINVAL, `${cmd} at ${h.offset}+${h.length} ends past the export size ${this.backend.sizeBytes}`);
    }
    return null;
  }

  private submit(r: InFlight, req: EngineRequest, flushAfter = false): void {
    const op: EngineOp = req.op;
    this.backend.submitCb(req, (err: RemapError | null) => {
      if (r.answered) return; // answered ESHUTDOWN at a deadline; the result is dropped
      if (err === null && flushAfter) {
        // FUA on TRIM: make the discard durable before answering.
        this.backend.submitCb({ op: 'flush', offset: 0, length: 0 }, (e2) => this.complete(r, op, e2));
        return;
      }
      this.complete(r, op, err);
    });
  }

  private complete(r: InFlight, op: EngineOp, err: RemapError | null): void {
    if (r.answered) return;
    if (err !== null) {
      this.reply(r, new ReplyError(toNbdError(err.errno), err.message), null, true, err.errno);
      return;
    }
    if (op === 'read') {
      this.stats.bytesRead += r.h.length;
      this.reply(r, null, (r.buf as Buffer).subarray(0, r.h.length), true);
      return;
    }
    if (op === 'write') this.stats.bytesWritten += r.h.length;
    this.reply(r, null, null, true);
  }

  // ----------------------------------------------------------- output

  /**
   * Write the whole reply for one request. `reusable`: the buffer may go back
   * to the pool once written (false when the engine may still touch it).
   */
  private reply(r: InFlight, err: ReplyError | null, data: Buffer | null, reusable: boolean, hostErrno?: number): void {
    r.answered = true;
    const h = r.h;
    if (err !== null) {
      this.stats.errors++;
      this.log.warn({
        handle: `0x${h.handle.toString(16)}`, cmd: CMD_NAMES[h.type] ?? h.type, offset: h.offset, length: h.length,
        errno: errnoName(err.errno), ...(hostErrno !== undefined && hostErrno !== err.errno ? { hostErrno: errnoName(hostErrno) } : {}),
        err: err.message,
      }, 'request failed');
    }
    const finish = (): void => this.release(r, reusable);
    if (this.socket.destroyed || !this.socket.writable) {
      finish();
      return;
    }
    const structured = this.opts.structuredReplies;
    this.socket.cork();
    if (err !== null) {
      // Structured: an error chunk with a message (and READ MUST NOT get a
      // simple reply). Simple: the error field, and no payload even for READ.
      if (structured) this.socket.write(encodeErrorChunk(h.handle, err.errno, err.message), () => finish());
      else this.socket.write(encodeSimpleReply(err.errno, h.handle), () => finish());
    } else if (data !== null) {
      if (structured) this.socket.write(encodeOffsetDataHeader(NBD_REPLY_FLAG_DONE, h.handle, h.offset, data.length));
      else this.socket.write(encodeSimpleReply(0, h.handle));
      this.socket.write(data, () => finish());
    } else {
      // A simple reply is allowed for anything but READ even when structured.
      this.socket.write(encodeSimpleReply(0, h.handle), () => finish());
    }
    this.socket.uncork();
  }

  private release(r: InFlight, reusable: boolean): void {
    if (!this.inflight.delete(r)) return;
    this.bytesInFlight -= r.bytes;
    if (r.buf !== null && reusable) this.pool.put(r.buf);
    r.buf = null;
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
