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
 */
import { NBD_MAX_PAYLOAD, NBD_REQUEST_MAGIC, NbdCmd, REQUEST_HEADER_BYTES, decodeRequestHeader, type RequestHeader } from './protocol.js';

export type ParsedEvent =
  | { kind: 'request'; header: RequestHeader; payload: Uint8Array | null }
  | { kind: 'fatal'; reason: string };

export type ParserState = 'header' | 'payload' | 'failed';

export class RequestParser {
  private stateValue: ParserState = 'header';
  private readonly head = Buffer.alloc(REQUEST_HEADER_BYTES);
  private headFill = 0;
  private current: RequestHeader | null = null;
  private payload: Uint8Array | null = null;
  private payloadFill = 0;

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

  /**
   * Parse bytes; stops after `maxEvents` events (the caller keeps the rest of
   * the chunk, see `consumed`), so a caller can stop taking requests mid-chunk.
   */
  push(chunk: Uint8Array, maxEvents = Number.POSITIVE_INFINITY): ParsedEvent[] {
    const events: ParsedEvent[] = [];
    let at = 0;
    while (at < chunk.length && this.stateValue !== 'failed' && events.length < maxEvents) {
      if (this.stateValue === 'header') {
        const n = Math.min(REQUEST_HEADER_BYTES - this.headFill, chunk.length - at);
        this.head.set(chunk.subarray(at, at + n), this.headFill);
        this.headFill += n;
        at += n;
        if (this.headFill < REQUEST_HEADER_BYTES) break;
        this.headFill = 0;
        const h = decodeRequestHeader(this.head);
        if (h.magic !== NBD_REQUEST_MAGIC) {
          this.stateValue = 'failed';
          events.push({ kind: 'fatal', reason: `bad request magic 0x${h.magic.toString(16)}` });
          break;
        }
        if (h.type !== NbdCmd.WRITE || h.length === 0) {
          events.push({ kind: 'request', header: h, payload: null });
          continue;
        }
        if (h.length > this.maxPayload) {
          // A payload this long would have to be read and thrown away; a
          // client that sends it has broken the contract, so drop framing.
          this.stateValue = 'failed';
          events.push({ kind: 'fatal', reason: `WRITE of ${h.length} bytes exceeds the ${this.maxPayload}-byte maximum` });
          break;
        }
        this.current = h;
        this.payload = this.allocPayload(h.length);
        this.payloadFill = 0;
        this.stateValue = 'payload';
      } else {
        const h = this.current as RequestHeader;
        const p = this.payload as Uint8Array;
        const n = Math.min(h.length - this.payloadFill, chunk.length - at);
        p.set(chunk.subarray(at, at + n), this.payloadFill);
        this.payloadFill += n;
        at += n;
        if (this.payloadFill < h.length) break;
        events.push({ kind: 'request', header: h, payload: p });
        this.current = null;
        this.payload = null;
        this.stateValue = 'header';
      }
    }
    this.consumed = at;
    return events;
  }
}
