/**
 * Transmission-phase request framing ("Request message") as a state machine
 * with no I/O: bytes in, whole requests (header plus WRITE payload) out.
 *
 *   header --28 bytes, not WRITE--> emit request --> header
 *   header --28 bytes, WRITE------> payload --length bytes--> emit request --> header
 *   header --bad magic / WRITE longer than the maximum--> failed (framing is lost)
 *
 * The WRITE payload is copied straight into a buffer from `allocPayload`
 * (aligned, for O_DIRECT), never concatenated first.
 *
 * Two interfaces over the same machine: `step()` takes at most one request
 * and leaves it in the parser's fields (no allocation but the payload: the
 * server's hot path), `push()` returns event objects.
 */
import { NBD_MAX_PAYLOAD, NBD_REQUEST_MAGIC, NbdCmd, REQUEST_HEADER_BYTES, type RequestHeader } from './protocol.js';

export type ParsedEvent =
  | { kind: 'request'; header: RequestHeader; payload: Uint8Array | null }
  | { kind: 'fatal'; reason: string };

export type ParserState = 'header' | 'payload' | 'failed';

/** `RequestParser.stepped` after `step()`. */
export const STEP_NONE = 0;
export const STEP_REQUEST = 1;
export const STEP_FATAL = 2;
export type StepOutcome = typeof STEP_NONE | typeof STEP_REQUEST | typeof STEP_FATAL;

const TWO_32 = 4294967296;
/** Offsets whose high word is this or more exceed Number.MAX_SAFE_INTEGER. */
const UNSAFE_HIGH_WORD = 0x200000;

function be32(b: Uint8Array, at: number): number {
  return ((b[at] << 24) | (b[at + 1] << 16) | (b[at + 2] << 8) | b[at + 3]) >>> 0;
}

function be16(b: Uint8Array, at: number): number {
  return (b[at] << 8) | b[at + 1];
}

export class RequestParser {
  private stateValue: ParserState = 'header';
  private readonly head = new Uint8Array(REQUEST_HEADER_BYTES);
  private headFill = 0;
  private payload: Uint8Array | null = null;
  private payloadFill = 0;

  // The request (or failure) the last step() completed; see `stepped`.
  /** What the last step() produced. */
  stepped: StepOutcome = STEP_NONE;
  magic = 0;
  flags = 0;
  type = 0;
  /** The 64-bit handle as two 32-bit words (echoed as is in the reply). */
  handleHi = 0;
  handleLo = 0;
  /** Offsets above 2^53 are Infinity, which every range check rejects. */
  offset = 0;
  length = 0;
  /** WRITE payload (from `allocPayload`), else null. */
  requestPayload: Uint8Array | null = null;
  fatalReason = '';

  constructor(
    private readonly allocPayload: (length: number) => Uint8Array,
    private readonly maxPayload = NBD_MAX_PAYLOAD,
  ) {}

  get state(): ParserState {
    return this.stateValue;
  }

  /** Bytes of a request that has started but not completed (for the log at EOF). */
  get partialBytes(): number {
    return this.stateValue === 'header' ? this.headFill : REQUEST_HEADER_BYTES + this.payloadFill;
  }

  /** Bytes of the last push() that were used (less than the chunk when `maxEvents` stopped it). */
  consumed = 0;

  /** The last completed request's header as an object (handle as a bigint). */
  header(): RequestHeader {
    return {
      magic: this.magic,
      flags: this.flags,
      type: this.type,
      handle: (BigInt(this.handleHi) << 32n) | BigInt(this.handleLo),
      offset: this.offset,
      length: this.length,
    };
  }

  /**
   * Parse from `chunk[at]` until one request is complete, framing is lost, or
   * the chunk ends; returns the position after the bytes used. `stepped`
   * tells which (STEP_NONE: the chunk is used up, or the parser has failed).
   */
  step(chunk: Uint8Array, at: number): number {
    this.stepped = STEP_NONE;
    const end = chunk.length;
    while (at < end && this.stateValue !== 'failed') {
      if (this.stateValue === 'header') {
        let src: Uint8Array;
        let base: number;
        if (this.headFill === 0 && end - at >= REQUEST_HEADER_BYTES) {
          src = chunk;
          base = at;
          at += REQUEST_HEADER_BYTES;
        } else {
          const n = Math.min(REQUEST_HEADER_BYTES - this.headFill, end - at);
          for (let i = 0; i < n; i++) this.head[this.headFill + i] = chunk[at + i];
          this.headFill += n;
          at += n;
          if (this.headFill < REQUEST_HEADER_BYTES) return at;
          this.headFill = 0;
          src = this.head;
          base = 0;
        }
        this.magic = be32(src, base);
        this.flags = be16(src, base + 4);
        this.type = be16(src, base + 6);
        this.handleHi = be32(src, base + 8);
        this.handleLo = be32(src, base + 12);
        const offHi = be32(src, base + 16);
        this.offset = offHi >= UNSAFE_HIGH_WORD ? Number.POSITIVE_INFINITY : offHi * TWO_32 + be32(src, base + 20);
        this.length = be32(src, base + 24);
        if (this.magic !== NBD_REQUEST_MAGIC) {
          this.stateValue = 'failed';
          this.fatalReason = `bad request magic 0x${this.magic.toString(16)}`;
          this.stepped = STEP_FATAL;
          return at;
        }
        if (this.type !== NbdCmd.WRITE || this.length === 0) {
          this.requestPayload = null;
          this.stepped = STEP_REQUEST;
          return at;
        }
        if (this.length > this.maxPayload) {
          // A payload this long would have to be read and thrown away; a
          // client that sends it has broken the contract, so drop framing.
          this.stateValue = 'failed';
          this.fatalReason = `WRITE of ${this.length} bytes exceeds the ${this.maxPayload}-byte maximum`;
          this.stepped = STEP_FATAL;
          return at;
        }
        this.payload = this.allocPayload(this.length);
        this.payloadFill = 0;
        this.stateValue = 'payload';
      } else {
        const p = this.payload as Uint8Array;
        const n = Math.min(this.length - this.payloadFill, end - at);
        p.set(n === end - at && at === 0 ? chunk : chunk.subarray(at, at + n), this.payloadFill);
        this.payloadFill += n;
        at += n;
        if (this.payloadFill < this.length) return at;
        this.requestPayload = p;
        this.payload = null;
        this.stateValue = 'header';
        this.stepped = STEP_REQUEST;
        return at;
      }
    }
    return at;
  }

  /**
   * Parse bytes; stops after `maxEvents` events (the caller keeps the rest of
   * the chunk, see `consumed`), so a caller can stop taking requests mid-chunk.
   */
  push(chunk: Uint8Array, maxEvents = Number.POSITIVE_INFINITY): ParsedEvent[] {
    const events: ParsedEvent[] = [];
    let at = 0;
    while (events.length < maxEvents) {
      at = this.step(chunk, at);
      if (this.stepped === STEP_REQUEST) {
        events.push({ kind: 'request', header: this.header(), payload: this.requestPayload });
      } else {
        if (this.stepped === STEP_FATAL) events.push({ kind: 'fatal', reason: this.fatalReason });
        break;
      }
    }
    this.consumed = at;
    return events;
  }
}
