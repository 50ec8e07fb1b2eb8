/**
 * The fixed newstyle handshake ("Fixed newstyle negotiation") as an explicit
 * state machine with no I/O: bytes go in through receive(), bytes to send and
 * the outcome come out. The connection code feeds it from a socket; tests and
 * fuzzers feed it arbitrary bytes.
 *
 *   client-flags --4 bytes--> option-header --16 bytes--> option-data
 *        ^                         ^   |                       |
 *        |                         |   +--(too long)--> option-skip
 *        |                         +----------(reply)----------+
 *   transmission <-- NBD_OPT_GO / NBD_OPT_EXPORT_NAME ; closed <-- ABORT, protocol violation
 */
import { transmissionFlags, blockSizeConstraints, type ExportView } from './backend.js';
import {
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_MAX_OPTION_LENGTH,
  NBD_MAX_OPTION_SKIP,
  NBD_MAX_STRING,
  NBD_OPTS_MAGIC,
  NbdInfo,
  NbdOpt,
  NbdRep,
  OPTION_HEADER_BYTES,
  decodeInfoRequest,
  decodeOptionHeader,
  encodeExportNameReply,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeOptionReply,
  encodeRepServer,
  encodeServerGreeting,
} from './protocol.js';

/** One export as the handshake offers it. */
export interface HandshakeExport {
  name: string;
  description?: string;
  view: ExportView;
}

export interface HandshakeConfig {
  /** Look an export up by the name the client sent ("" is the default export). */
  lookup(name: string): HandshakeExport | null;
  /** Every export, for NBD_OPT_LIST. */
  list(): HandshakeExport[];
  /** While true, options are refused with NBD_REP_ERR_SHUTDOWN. */
  shuttingDown?(): boolean;
}

export type HandshakeOutcome =
  | {
      kind: 'transmission';
      export: HandshakeExport;
      structuredReplies: boolean;
      flags: number;
      /** Bytes that arrived after the final option: the start of the transmission phase. */
      rest: Buffer;
    }
  | { kind: 'close'; reason: string };

export interface HandshakeStep {
  out: Buffer[];
  outcome?: HandshakeOutcome;
}

export type HandshakeState = 'client-flags' | 'option-header' | 'option-data' | 'option-skip' | 'transmission' | 'closed';

/** More options than this on one connection is treated as abuse. */
export const MAX_OPTIONS_PER_CONNECTION = 1024;

/** Handshake flags we send: fixed newstyle, and we can leave out the 124 zeroes. */
export const SERVER_HANDSHAKE_FLAGS = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;

export class NbdHandshake {
  private stateValue: HandshakeState = 'client-flags';
  private buffered: Buffer[] = [];
  private bufferedBytes = 0;
  private noZeroes = false;
  private structuredReplies = false;
  private option = 0;
  private optionLength = 0;
  private skipLeft = 0;
  private optionCount = 0;

  constructor(private readonly cfg: HandshakeConfig) {}

  get state(): HandshakeState {
    return this.stateValue;
  }

  /** What the server sends first ("Newstyle negotiation"). */
  greeting(): Buffer {
    return encodeServerGreeting(SERVER_HANDSHAKE_FLAGS);
  }

  /** Feed bytes from the client; returns what to send and, at the end, the outcome. */
  receive(chunk: Uint8Array): HandshakeStep {
    const out: Buffer[] = [];
    if (this.stateValue === 'transmission' || this.stateValue === 'closed') return { out };
    if (chunk.length > 0) {
      this.buffered.push(Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength));
      this.bufferedBytes += chunk.length;
    }
    for (;;) {
      const outcome = this.step(out);
      if (outcome === 'need-more') return { out };
      if (outcome !== 'continue') return { out, outcome };
    }
  }

  private take(n: number): Buffer {
    const all = this.buffered.length === 1 ? this.buffered[0] : Buffer.concat(this.buffered, this.bufferedBytes);
    const head = all.subarray(0, n);
    const rest = all.subarray(n);
    this.buffered = rest.length > 0 ? [rest] : [];
    this.bufferedBytes = rest.length;
    return head;
  }

  private close(reason: string): HandshakeOutcome {
    this.stateValue = 'closed';
    this.buffered = [];
    this.bufferedBytes = 0;
    return { kind: 'close', reason };
  }

  private step(out: Buffer[]): HandshakeOutcome | 'need-more' | 'continue' {
    switch (this.stateValue) {
      case 'client-flags': {
        if (this.bufferedBytes < 4) return 'need-more';
        const flags = this.take(4).readUInt32BE(0);
        // "Client flags": unknown bits, or bits we did not offer: MUST drop.
        if ((flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) !== 0) {
          return this.close(`client sent unknown flags 0x${flags.toString(16)}`);
        }
        this.noZeroes = (flags & NBD_FLAG_C_NO_ZEROES) !== 0;
        this.stateValue = 'option-header';
        return 'continue';
      }
      case 'option-header': {
        if (this.bufferedBytes < OPTION_HEADER_BYTES) return 'need-more';
        const h = decodeOptionHeader(this.take(OPTION_HEADER_BYTES));
        if (h.magic !== NBD_OPTS_MAGIC) return this.close('bad option magic');
        if (++this.optionCount > MAX_OPTIONS_PER_CONNECTION) return this.close(`more than ${MAX_OPTIONS_PER_CONNECTION} options`);
        this.option = h.option;
        this.optionLength = h.length;
        if (h.length > NBD_MAX_OPTION_LENGTH) {
          // EXPORT_NAME cannot be answered with an error; anything absurd is not worth reading.
          if (h.option === NbdOpt.EXPORT_NAME || h.length > NBD_MAX_OPTION_SKIP) {
            return this.close(`option ${h.option} with ${h.length} bytes of data`);
          }
          this.skipLeft = h.length;
          this.stateValue = 'option-skip';
          return 'continue';
        }
        this.stateValue = 'option-data';
        return 'continue';
      }
      case 'option-skip': {
        const n = Math.min(this.skipLeft, this.bufferedBytes);
        if (n > 0) {
          this.take(n);
          this.skipLeft -= n;
        }
        if (this.skipLeft > 0) return 'need-more';
        out.push(encodeOptionReply(this.option, NbdRep.ERR_TOO_BIG, msg(`option data of ${this.optionLength} bytes is too long`)));
        this.stateValue = 'option-header';
        return 'continue';
      }
      case 'option-data': {
        if (this.bufferedBytes < this.optionLength) return 'need-more';
        const data = this.take(this.optionLength);
        this.stateValue = 'option-header';
        return this.handleOption(this.option, data, out);
      }
      default:
        return 'need-more';
    }
  }

  private handleOption(option: number, data: Buffer, out: Buffer[]): HandshakeOutcome | 'continue' {
    const reply = (type: number, payload?: Uint8Array): void => {
      out.push(encodeOptionReply(option, type, payload));
    };
    if (this.cfg.shuttingDown?.() === true) {
      if (option === NbdOpt.EXPORT_NAME) return this.close('server is shutting down');
      if (option !== NbdOpt.ABORT) {
        reply(NbdRep.ERR_SHUTDOWN, msg('server is shutting down'));
        return 'continue';
      }
    }
    switch (option) {
      case NbdOpt.EXPORT_NAME: {
        const name = data.toString('utf8');
        const ex = data.length <= NBD_MAX_STRING ? this.cfg.lookup(name) : null;
        // "If the chosen export does not exist ... the server MUST terminate the session."
        if (ex === null) return this.close(`unknown export ${JSON.stringify(name.slice(0, 256))} in NBD_OPT_EXPORT_NAME`);
        const flags = transmissionFlags(ex.view, this.structuredReplies);
        out.push(encodeExportNameReply(ex.view.backend.sizeBytes, flags, this.noZeroes));
        return this.enterTransmission(ex, flags);
      }
      case NbdOpt.ABORT:
        reply(NbdRep.ACK);
        return this.close('client sent NBD_OPT_ABORT');
      case NbdOpt.LIST:
        if (data.length !== 0) {
          reply(NbdRep.ERR_INVALID, msg('NBD_OPT_LIST takes no data'));
          return 'continue';
        }
        for (const ex of this.cfg.list()) reply(NbdRep.SERVER, encodeRepServer(ex.name, ex.description ?? ''));
        reply(NbdRep.ACK);
        return 'continue';
      case NbdOpt.STRUCTURED_REPLY:
        if (data.length !== 0) reply(NbdRep.ERR_INVALID, msg('NBD_OPT_STRUCTURED_REPLY takes no data'));
        else if (this.structuredReplies) reply(NbdRep.ERR_INVALID, msg('structured replies already negotiated'));
        else {
          this.structuredReplies = true;
          reply(NbdRep.ACK);
        }
        return 'continue';
      case NbdOpt.INFO:
      case NbdOpt.GO: {
        const req = decodeInfoRequest(data);
        if (typeof req === 'string') {
          reply(NbdRep.ERR_INVALID, msg(req));
          return 'continue';
        }
        const ex = this.cfg.lookup(req.name);
        if (ex === null) {
          reply(NbdRep.ERR_UNKNOWN, msg(`unknown export ${JSON.stringify(req.name.slice(0, 256))}`));
          return 'continue';
        }
        const flags = transmissionFlags(ex.view, this.structuredReplies);
        // NBD_INFO_EXPORT is mandatory; block sizes are always sent because we
        // enforce them (the spec lets a server send info nobody asked for).
        reply(NbdRep.INFO, encodeInfoExport(ex.view.backend.sizeBytes, flags));
        const asked = new Set(req.infos);
        if (asked.has(NbdInfo.NAME)) reply(NbdRep.INFO, encodeInfoString(NbdInfo.NAME, ex.name));
        if (asked.has(NbdInfo.DESCRIPTION) && ex.description !== undefined) {
          reply(NbdRep.INFO, encodeInfoString(NbdInfo.DESCRIPTION, ex.description));
        }
        reply(NbdRep.INFO, encodeInfoBlockSize(blockSizeConstraints(ex.view.backend)));
        reply(NbdRep.ACK);
        return option === NbdOpt.GO ? this.enterTransmission(ex, flags) : 'continue';
      }
      case NbdOpt.STARTTLS:
        // NOTLS mode: we do not support TLS at all (unix socket or trusted network).
        reply(NbdRep.ERR_UNSUP, msg('TLS is not supported'));
        return 'continue';
      default:
        // Unknown or unsupported (meta contexts, extended headers, ...): the
        // option length kept framing, so just say so.
        reply(NbdRep.ERR_UNSUP, msg(`option ${option} is not supported`));
        return 'continue';
    }
  }

  private enterTransmission(ex: HandshakeExport, flags: number): HandshakeOutcome {
    this.stateValue = 'transmission';
    const rest = this.bufferedBytes > 0 ? this.take(this.bufferedBytes) : Buffer.alloc(0);
    return { kind: 'transmission', export: ex, structuredReplies: this.structuredReplies, flags, rest };
  }
}

function msg(s: string): Buffer {
  return Buffer.from(s, 'utf8');
}
