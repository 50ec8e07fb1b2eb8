/**
 * Seeded fuzz of the live NBD server: the compiled daemon (a real process)
 * exports a device on a unix socket and on localhost TCP, and several lanes
 * of raw clients open connection after connection, each sending one batch of
 * mutated frames:
 *
 * - handshake: client flags (sometimes with unknown bits), then options with
 *   random numbers, lengths and data (LIST, INFO and GO with well-formed,
 *   malformed and unknown names, STRUCTURED_REPLY with and without data,
 *   STARTTLS, meta context, unknown numbers, over-long data, more than 1024
 *   options), then one terminal: GO or EXPORT_NAME into transmission, an
 *   unknown EXPORT_NAME, ABORT, bad option magic, an absurd length, a frame
 *   cut short, a half-close or an abrupt close;
 * - transmission: request headers with random types, flags, handles, offsets
 *   (aligned, misaligned, past the end, 64-bit) and lengths (zero,
 *   misaligned, over 32 MiB), valid-looking WRITEs with their payloads, then
 *   one terminal: DISC, bad magic, a WRITE over 32 MiB, a header or payload
 *   cut short, a half-close or an abrupt close.
 *
 * Every answer is checked against a model written from the NBD spec and
 * docs/NBD.md: each option gets its final reply (ACK or the right ERR_*),
 * each request exactly one reply with its handle and the expected error,
 * and every framing violation ends the connection after the earlier
 * requests were answered. Afterwards a connection opened before the fuzz and
 * a fresh one (raw, then nbdsh) do verified writes and reads, the daemon is
 * alive, logged no error, counts no I/O errors and holds no stale connection.
 *
 * DMR_FUZZ_FRAMES (default 100000; 1000000 for the long run) sets the number
 * of frames, DMR_FUZZ_SEED the seed (printed, with the figures, at the end).
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { truncateSync, writeFileSync } from 'node:fs';
import * as net from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cleanup, ctl, request, startDaemon, tempDir, type Daemon } from '../daemon/helpers.js';

const FRAMES = Number(process.env.DMR_FUZZ_FRAMES ?? 100_000);
const SEED = Number(process.env.DMR_FUZZ_SEED ?? 0x5eed_2024);
const LANES = 4;
const DEVICE = 'fz';
const SIZE = 64 << 20;
const BS = 4096;

// Constants from the NBD spec (doc/proto.md), kept apart from src/ on purpose.
const NBDMAGIC = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const REPLY_MAGIC = 0x3e889045565a9n;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_MAGIC = 0x67446698;
const STRUCTURED_MAGIC = 0x668e33ef;
const OPT = { EXPORT_NAME: 1, ABORT: 2, LIST: 3, PEEK_EXPORT: 4, STARTTLS: 5, INFO: 6, GO: 7, STRUCTURED_REPLY: 8, LIST_META: 9, SET_META: 10, EXT_HEADERS: 11 };
const REP = { ACK: 1, SERVER: 2, INFO: 3, ERR_UNSUP: 0x80000001, ERR_INVALID: 0x80000003, ERR_UNKNOWN: 0x80000006, ERR_TOO_BIG: 0x80000009 };
const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6, BLOCK_STATUS: 7 };
const F = { HAS_FLAGS: 1, READ_ONLY: 2, SEND_FLUSH: 4, SEND_FUA: 8, SEND_TRIM: 32, SEND_WRITE_ZEROES: 64, SEND_DF: 128, SEND_CACHE: 1024, SEND_FAST_ZERO: 2048 };
const CF = { FUA: 1, NO_HOLE: 2, DF: 4, REQ_ONE: 8, FAST_ZERO: 16 };
const E = { OK: 0, EPERM: 1, EIO: 5, ENOMEM: 12, EINVAL: 22, ENOSPC: 28, EOVERFLOW: 75, ENOTSUP: 95, ESHUTDOWN: 108 };
const WIRE_ERRORS = new Set(Object.values(E));
const MAX_PAYLOAD = 32 << 20;

// ------------------------------------------------------------ seeded PRNG

/** sfc32: small, fast, good enough, and reproducible from one seed. */
class Rng {
  private a: number; private b: number; private c: number; private d: number;
  constructor(seed: number) {
    this.a = 0x9e3779b9; this.b = 0x243f6a88; this.c = 0xb7e15162; this.d = seed >>> 0;
    for (let i = 0; i < 15; i++) this.u32();
  }
  u32(): number {
    const t = (((this.a + this.b) | 0) + this.d) | 0;
    this.d = (this.d + 1) | 0;
    this.a = this.b ^ (this.b >>> 9);
    this.b = (this.c + (this.c << 3)) | 0;
    this.c = (this.c << 21) | (this.c >>> 11);
    this.c = (this.c + t) | 0;
    return t >>> 0;
  }
  /** 0 <= n < max */
  int(max: number): number { return Math.floor((this.u32() / 0x1_0000_0000) * max); }
  range(lo: number, hi: number): number { return lo + this.int(hi - lo + 1); }
  chance(p: number): boolean { return this.u32() / 0x1_0000_0000 < p; }
  u64(): bigint { return (BigInt(this.u32()) << 32n) | BigInt(this.u32()); }
  bytes(n: number): Buffer { const b = Buffer.allocUnsafe(n); for (let i = 0; i < n; i++) b[i] = this.u32() & 0xff; return b; }
  /** Pick by weight: [[weight, value], ...] */
  pick<T>(table: Array<[number, T]>): T {
    let total = 0;
    for (const [w] of table) total += w;
    let x = this.int(total);
    for (const [w, v] of table) { if (x < w) return v; x -= w; }
    return table[table.length - 1][1];
  }
}

// ----------------------------------------------------------- encoders

function u32(v: number): Buffer { const b = Buffer.allocUnsafe(4); b.writeUInt32BE(v >>> 0); return b; }

function optionFrame(option: number, data: Buffer, lengthField = data.length, magic = IHAVEOPT): Buffer {
  const h = Buffer.allocUnsafe(16);
  h.writeBigUInt64BE(magic, 0);
  h.writeUInt32BE(option >>> 0, 8);
  h.writeUInt32BE(lengthField >>> 0, 12);
  return Buffer.concat([h, data]);
}

function infoData(nameBytes: Buffer, infos: number[], nameLenField = nameBytes.length, countField = infos.length): Buffer {
  const b = Buffer.allocUnsafe(4 + nameBytes.length + 2 + 2 * infos.length);
  b.writeUInt32BE(nameLenField >>> 0, 0);
  nameBytes.copy(b, 4);
  b.writeUInt16BE(countField & 0xffff, 4 + nameBytes.length);
  infos.forEach((t, i) => b.writeUInt16BE(t, 4 + nameBytes.length + 2 + 2 * i));
  return b;
}

function requestHeader(type: number, flags: number, handle: bigint, offset: bigint, length: number, magic = REQUEST_MAGIC): Buffer {
  const b = Buffer.allocUnsafe(28);
  b.writeUInt32BE(magic >>> 0, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(handle, 8);
  b.writeBigUInt64BE(offset, 16);
  b.writeUInt32BE(length >>> 0, 24);
  return b;
}

// ------------------------------------------------------------- models

const exportKnown = (name: string): boolean => name === '' || name === DEVICE;

/** What the server must answer to NBD_OPT_INFO/GO data: ERR_INVALID, ERR_UNKNOWN or ACK. */
function infoVerdict(data: Buffer): number {
  if (data.length < 6) return REP.ERR_INVALID;
  const nameLen = data.readUInt32BE(0);
  if (nameLen > 4096) return REP.ERR_INVALID;
  if (4 + nameLen + 2 > data.length) return REP.ERR_INVALID;
  const count = data.readUInt16BE(4 + nameLen);
  if (4 + nameLen + 2 + 2 * count !== data.length) return REP.ERR_INVALID;
  return exportKnown(data.subarray(4, 4 + nameLen).toString('utf8')) ? REP.ACK : REP.ERR_UNKNOWN;
}

interface ExpectedRequest { type: number; length: number; expect: number[] }

/** The wire error for one request, per docs/NBD.md's error mapping (engine I/O never fails here). */
function requestVerdict(type: number, flags: number, offset: bigint, length: number, tflags: number, structured: boolean): number[] {
  let allowed = (tflags & F.SEND_FUA) !== 0 ? CF.FUA : 0;
  let supported = true;
  let writes = false;
  switch (type) {
    case CMD.READ: if ((tflags & F.SEND_DF) !== 0 && structured) allowed |= CF.DF; break;
    case CMD.WRITE: writes = true; break;
    case CMD.FLUSH: supported = (tflags & F.SEND_FLUSH) !== 0; break;
    case CMD.TRIM: supported = (tflags & F.SEND_TRIM) !== 0; writes = true; break;
    case CMD.WRITE_ZEROES:
      supported = (tflags & F.SEND_WRITE_ZEROES) !== 0; writes = true; allowed |= CF.NO_HOLE;
      if ((tflags & F.SEND_FAST_ZERO) !== 0) allowed |= CF.FAST_ZERO;
      break;
    case CMD.CACHE: supported = (tflags & F.SEND_CACHE) !== 0; break;
    default: return [E.EINVAL];
  }
  if (!supported || (flags & ~allowed) !== 0) return [E.EINVAL];
  if (writes && (tflags & F.READ_ONLY) !== 0) return [E.EPERM];
  if (type === CMD.FLUSH) return offset === 0n && length === 0 ? [E.OK] : [E.EINVAL];
  if (length === 0) return [E.EINVAL];
  if ((type === CMD.READ || type === CMD.WRITE) && length > MAX_PAYLOAD) return [E.EINVAL];
  if (offset >= 1n << 53n) {
    // Offsets that do not fit a JS number are past the end of any export:
    // ENOSPC for a write (as the spec asks), EINVAL otherwise.
    return writes ? [E.ENOSPC] : [E.EINVAL];
  }
  if (offset % BigInt(BS) !== 0n || length % BS !== 0) return [E.EINVAL];
  if (offset + BigInt(length) > BigInt(SIZE)) return [writes ? E.ENOSPC : E.EINVAL];
  if (type === CMD.WRITE_ZEROES && (flags & CF.FAST_ZERO) !== 0) return [E.ENOTSUP];
  return [E.OK];
}

// --------------------------------------------------------------- wire

class Closed extends Error {}

/** A socket with exact-length reads; a watchdog destroys it if it takes too long. */
class Wire {
  private chunks: Buffer[] = [];
  private avail = 0;
  private wake: (() => void) | null = null;
  ended = false;
  timedOut = false;
  readonly closed: Promise<void>;
  private readonly watchdog: NodeJS.Timeout;

  constructor(readonly sock: net.Socket, limitMs: number) {
    sock.on('data', (d: Buffer) => { this.chunks.push(d); this.avail += d.length; this.kick(); });
    sock.on('error', () => undefined);
    this.closed = new Promise((resolve) => sock.once('close', () => { this.ended = true; this.kick(); resolve(); }));
    this.watchdog = setTimeout(() => { this.timedOut = true; sock.destroy(); }, limitMs);
  }

  static connect(to: { path: string } | { host: string; port: number }, limitMs = 20_000): Promise<Wire> {
    return new Promise((resolve, reject) => {
      const s = net.connect(to as net.NetConnectOpts);
      s.once('connect', () => { s.off('error', reject); resolve(new Wire(s, limitMs)); });
      s.once('error', reject);
    });
  }

  private kick(): void { const w = this.wake; this.wake = null; w?.(); }

  get buffered(): number { return this.avail; }

  private async need(n: number): Promise<void> {
    while (this.avail < n) {
      if (this.ended) throw new Closed(`connection closed with ${this.avail}/${n} bytes${this.timedOut ? ' (watchdog timeout)' : ''}`);
      await new Promise<void>((resolve) => { this.wake = resolve; });
    }
  }

  async read(n: number): Promise<Buffer> {
    await this.need(n);
    const first = this.chunks[0];
    let out: Buffer;
    if (first.length >= n) {
      out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
    } else {
      const all = Buffer.concat(this.chunks);
      out = all.subarray(0, n);
      this.chunks = all.length > n ? [all.subarray(n)] : [];
    }
    this.avail -= n;
    return out;
  }

  /** Waits for the server to close; returns the number of bytes that came before the close. */
  async eof(): Promise<number> {
    await this.closed;
    return this.avail;
  }

  write(b: Buffer): void { this.sock.write(b); }

  done(): void { clearTimeout(this.watchdog); this.sock.destroy(); }
}

async function optionReply(w: Wire): Promise<{ option: number; type: number; data: Buffer }> {
  const h = await w.read(20);
  if (h.readBigUInt64BE(0) !== REPLY_MAGIC) throw new Error(`bad option reply magic 0x${h.readBigUInt64BE(0).toString(16)}`);
  const len = h.readUInt32BE(16);
  return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: len > 0 ? await w.read(len) : Buffer.alloc(0) };
}

/** Replies of one option until the final one; returns it (and the INFO_EXPORT flags if any came). */
async function finalReply(w: Wire, option: number): Promise<{ type: number; exportInfo?: { size: bigint; flags: number } }> {
  let exportInfo: { size: bigint; flags: number } | undefined;
  for (;;) {
    const r = await optionReply(w);
    if (r.option !== option) throw new Error(`reply for option ${r.option}, expected ${option}`);
    if (r.type === REP.INFO && r.data.readUInt16BE(0) === 0) exportInfo = { size: r.data.readBigUInt64BE(2), flags: r.data.readUInt16BE(10) };
    if (r.type === REP.ACK || r.type >= 0x80000000) return exportInfo !== undefined ? { type: r.type, exportInfo } : { type: r.type };
    if (r.type !== REP.SERVER && r.type !== REP.INFO) throw new Error(`unexpected intermediate reply type 0x${r.type.toString(16)} to option ${option}`);
  }
}

/** Reads transmission replies until every handle in `pending` is answered; checks each error against the model. */
async function collectReplies(w: Wire, pending: Map<bigint, ExpectedRequest>, structured: boolean, tally: Map<number, number>): Promise<void> {
  while (pending.size > 0) {
    const m = (await w.read(4)).readUInt32BE(0);
    if (m === SIMPLE_MAGIC) {
      const r = await w.read(12);
      const error = r.readUInt32BE(0);
      const handle = r.readBigUInt64BE(4);
      const q = pending.get(handle);
      if (q === undefined) throw new Error(`simple reply for unknown or already answered handle 0x${handle.toString(16)}`);
      if (q.type === CMD.READ && structured) throw new Error('simple reply to a READ with structured replies');
      if (!q.expect.includes(error)) throw new Error(`handle 0x${handle.toString(16)} (cmd ${q.type}, length ${q.length}): error ${error}, expected ${q.expect.join('|')}`);
      if (error === 0 && q.type === CMD.READ) await w.read(q.length);
      pending.delete(handle);
      tally.set(error, (tally.get(error) ?? 0) + 1);
    } else if (m === STRUCTURED_MAGIC) {
      const r = await w.read(16);
      const flags = r.readUInt16BE(0);
      const type = r.readUInt16BE(2);
      const handle = r.readBigUInt64BE(4);
      const len = r.readUInt32BE(12);
      const body = len > 0 ? await w.read(len) : Buffer.alloc(0);
      const q = pending.get(handle);
      if (q === undefined) throw new Error(`structured reply for unknown handle 0x${handle.toString(16)}`);
      let error = 0;
      if (type === 0x8001) {
        error = body.readUInt32BE(0);
        if (body.readUInt16BE(4) !== len - 6) throw new Error('error chunk message length mismatch');
      } else if (type === 1) {
        if (len - 8 !== q.length) throw new Error(`OFFSET_DATA of ${len - 8} bytes for a ${q.length}-byte READ`);
      } else if (type !== 0) throw new Error(`unexpected chunk type ${type}`);
      if ((flags & 1) !== 0) {
        if (!q.expect.includes(error)) throw new Error(`handle 0x${handle.toString(16)} (cmd ${q.type}, length ${q.length}): error ${error}, expected ${q.expect.join('|')}`);
        pending.delete(handle);
        tally.set(error, (tally.get(error) ?? 0) + 1);
      } else if (error !== 0) throw new Error('error chunk without DONE');
    } else {
      throw new Error(`bad reply magic 0x${m.toString(16)}`);
    }
  }
}

// ------------------------------------------------------------- fuzzer

interface Figures {
  frames: number;
  connections: number;
  transmissions: number;
  optionsAnswered: number;
  requestsAnswered: number;
  bytesSent: number;
  tally: Map<number, number>;
  terminals: Map<string, number>;
}

interface Target { to: { path: string } | { host: string; port: number }; flagsPlain: number; flagsStructured: number }

class Lane {
  private readonly rng: Rng;
  private conn = 0;
  constructor(private readonly id: number, seed: number, private readonly target: Target, private readonly budget: { left: number }, private readonly fig: Figures) {
    this.rng = new Rng(seed);
  }

  async run(): Promise<void> {
    while (this.budget.left > 0) {
      this.conn++;
      try {
        await this.connection();
      } catch (e) {
        throw new Error(`lane ${this.id} connection ${this.conn} (seed ${SEED}): ${(e as Error).message}`);
      }
    }
  }

  private count(frames: number): void {
    this.budget.left -= frames;
    this.fig.frames += frames;
  }

  private terminal(name: string): void { this.fig.terminals.set(name, (this.fig.terminals.get(name) ?? 0) + 1); }

  /** One middle option: its frame and the final reply the server owes. */
  private middleOption(structured: { on: boolean }): { frame: Buffer; option: number; expect: number } {
    const r = this.rng;
    const kind = r.pick<string>([[12, 'list'], [8, 'structured'], [25, 'info'], [15, 'go-bad'], [6, 'starttls'], [12, 'unsupported'], [15, 'random'], [1, 'too-big']]);
    switch (kind) {
      case 'list': {
        const data = r.chance(0.8) ? Buffer.alloc(0) : r.bytes(r.range(1, 40));
        return { frame: optionFrame(OPT.LIST, data), option: OPT.LIST, expect: data.length === 0 ? REP.ACK : REP.ERR_INVALID };
      }
      case 'structured': {
        const data = r.chance(0.85) ? Buffer.alloc(0) : r.bytes(r.range(1, 16));
        let expect = REP.ERR_INVALID;
        if (data.length === 0 && !structured.on) { structured.on = true; expect = REP.ACK; }
        return { frame: optionFrame(OPT.STRUCTURED_REPLY, data), option: OPT.STRUCTURED_REPLY, expect };
      }
      case 'info': case 'go-bad': {
        const option = kind === 'info' ? OPT.INFO : OPT.GO;
        let data = this.infoPayload();
        // A GO in the middle must not succeed (it would end the handshake).
        if (option === OPT.GO && infoVerdict(data) === REP.ACK) data = infoData(Buffer.from(`no-${r.u32().toString(36)}`), []);
        return { frame: optionFrame(option, data), option, expect: infoVerdict(data) };
      }
      case 'starttls':
        return { frame: optionFrame(OPT.STARTTLS, r.chance(0.5) ? Buffer.alloc(0) : r.bytes(r.range(1, 8))), option: OPT.STARTTLS, expect: REP.ERR_UNSUP };
      case 'unsupported': {
        const option = r.pick([[1, OPT.PEEK_EXPORT], [1, OPT.LIST_META], [1, OPT.SET_META], [1, OPT.EXT_HEADERS]]);
        return { frame: optionFrame(option, r.bytes(r.range(0, 48))), option, expect: REP.ERR_UNSUP };
      }
      case 'too-big': {
        const option = r.pick([[1, OPT.INFO], [1, OPT.GO], [1, OPT.LIST], [1, 77]]);
        return { frame: optionFrame(option, Buffer.alloc(r.range(64 * 1024 + 1, 80 * 1024), 0x61)), option, expect: REP.ERR_TOO_BIG };
      }
      default: {
        let option = r.u32();
        if (option >= 1 && option <= 11) option = 12 + r.int(1000);
        return { frame: optionFrame(option, r.bytes(r.range(0, 64))), option, expect: REP.ERR_UNSUP };
      }
    }
  }

  /** INFO/GO data: sometimes well formed for a known name, often mutated. */
  private infoPayload(): Buffer {
    const r = this.rng;
    const name = r.pick<Buffer>([
      [4, Buffer.alloc(0)], [4, Buffer.from(DEVICE)], [3, Buffer.from(`x${r.u32().toString(16)}`)], [2, r.bytes(r.range(1, 24))], [1, Buffer.alloc(4097, 0x41)],
    ]);
    const infos = Array.from({ length: r.pick([[6, 0], [3, r.range(1, 4)], [1, r.range(5, 40)]]) }, () => (r.chance(0.8) ? r.int(4) : r.int(0x10000)));
    const d = infoData(name, infos);
    switch (r.pick<string>([[6, 'as-is'], [1, 'namelen'], [1, 'count'], [1, 'cut'], [1, 'extend'], [1, 'short']])) {
      case 'namelen': d.writeUInt32BE(r.chance(0.5) ? r.u32() : Math.max(0, name.length + r.range(-3, 3)), 0); return d;
      case 'count': d.writeUInt16BE(r.int(0x10000), 4 + name.length); return d;
      case 'cut': return d.subarray(0, r.int(d.length));
      case 'extend': return Buffer.concat([d, r.bytes(r.range(1, 9))]);
      case 'short': return r.bytes(r.int(6));
      default: return d;
    }
  }

  private async connection(): Promise<void> {
    this.fig.connections++;
    const w = await Wire.connect(this.target.to);
    try {
      await this.session(w);
    } finally {
      w.done();
    }
  }

  private async session(w: Wire): Promise<void> {
    const r = this.rng;
    const out: Buffer[] = [];
    let frames = 0;
    // Client flags: FIXED_NEWSTYLE and NO_ZEROES are the only bits a server may accept.
    const flagsOk = r.chance(0.97);
    const clientFlags = flagsOk ? r.pick([[6, 3], [2, 1], [1, 2], [1, 0]]) : (r.u32() | 4 << r.int(29)) >>> 0;
    out.push(u32(clientFlags));
    const noZeroes = (clientFlags & 2) !== 0;
    const structured = { on: false };
    const middle: Array<{ option: number; expect: number }> = [];
    let term: string;
    let overflow = false;
    if (!flagsOk) {
      term = 'bad-client-flags';
    } else {
      const n = r.pick([[90, r.int(7)], [9, r.range(7, 60)], [1, -1]]);
      if (n < 0) {
        // More than 1024 options: answered up to the limit, then dropped.
        overflow = true;
        for (let i = 0; i < 1025; i++) {
          const option = 100 + r.int(1000);
          out.push(optionFrame(option, Buffer.alloc(0)));
          if (i < 1024) middle.push({ option, expect: REP.ERR_UNSUP });
        }
        frames += 1025;
        term = 'option-overflow';
      } else {
        for (let i = 0; i < n; i++) {
          const o = this.middleOption(structured);
          out.push(o.frame);
          middle.push({ option: o.option, expect: o.expect });
        }
        frames += n;
        term = r.pick<string>([[55, 'go'], [12, 'export-name'], [5, 'export-name-unknown'], [6, 'abort'], [6, 'bad-option-magic'],
          [5, 'absurd-length'], [6, 'truncated-option'], [3, 'half-close'], [2, 'hangup']]);
      }
    }
    this.terminal(term);

    // The terminal frame of the handshake.
    let goInfos: number[] = [];
    switch (term) {
      case 'go': {
        goInfos = Array.from({ length: r.int(4) }, () => r.int(4));
        out.push(optionFrame(OPT.GO, infoData(Buffer.from(r.chance(0.5) ? '' : DEVICE), goInfos)));
        frames++;
        break;
      }
      case 'export-name': out.push(optionFrame(OPT.EXPORT_NAME, Buffer.from(r.chance(0.5) ? '' : DEVICE))); frames++; break;
      case 'export-name-unknown': out.push(optionFrame(OPT.EXPORT_NAME, Buffer.from(`nope${r.u32()}`))); frames++; break;
      case 'abort': out.push(optionFrame(OPT.ABORT, Buffer.alloc(0))); frames++; break;
      case 'bad-option-magic': {
        let magic = r.u64();
        if (magic === IHAVEOPT) magic ^= 1n;
        if (r.chance(0.5)) magic = IHAVEOPT ^ (1n << BigInt(r.int(64)));
        out.push(optionFrame(r.int(12), Buffer.alloc(0), 0, magic));
        frames++;
        break;
      }
      case 'absurd-length':
        // Over 16 MiB for any option, or over 64 KiB for EXPORT_NAME: the server hangs up without reading it.
        out.push(r.chance(0.5) ? optionFrame(r.range(1, 12), Buffer.alloc(0), r.range((16 << 20) + 1, 0xffffffff)) : optionFrame(OPT.EXPORT_NAME, Buffer.alloc(0), r.range(64 * 1024 + 1, 1 << 20)));
        frames++;
        break;
      case 'truncated-option': {
        const f = this.middleOption({ on: structured.on }).frame;
        out.push(f.subarray(0, r.range(1, f.length - 1)));
        frames++;
        break;
      }
      default: break;
    }

    // Transmission requests, written in the same batch (they reach the server as the handshake's leftover bytes).
    const intoTransmission = term === 'go' || term === 'export-name';
    const pending = new Map<bigint, ExpectedRequest>();
    let tterm = '';
    if (intoTransmission) {
      const tflags = structured.on ? this.target.flagsStructured : this.target.flagsPlain;
      const k = r.pick([[70, r.range(1, 400)], [25, r.range(401, 1000)], [5, r.range(1001, 3000)]]);
      for (let i = 0; i < k; i++) {
        const q = this.request(tflags, structured.on, pending);
        out.push(q);
      }
      frames += k;
      tterm = r.pick<string>([[35, 'disc'], [13, 'bad-magic'], [10, 'huge-write'], [10, 'truncated-header'], [10, 'truncated-payload'], [12, 'half-close'], [10, 'hangup']]);
      this.terminal(`t:${tterm}`);

      switch (tterm) {
        case 'disc': out.push(requestHeader(CMD.DISC, 0, r.u64(), 0n, 0)); frames++; break;
        case 'bad-magic': {
          let magic = r.chance(0.5) ? REQUEST_MAGIC ^ (1 << r.int(32)) : r.u32();
          if (magic >>> 0 === REQUEST_MAGIC) magic ^= 0x100;
          out.push(requestHeader(r.int(8), 0, r.u64(), 0n, 4096, magic));
          frames++;
          break;
        }
        case 'huge-write': out.push(requestHeader(CMD.WRITE, 0, r.u64(), 0n, r.range(MAX_PAYLOAD + 1, 0xffffffff))); frames++; break;
        case 'truncated-header': out.push(requestHeader(r.int(8), 0, r.u64(), 0n, 4096).subarray(0, r.range(1, 27))); frames++; break;
        case 'truncated-payload': {
          const len = BS * r.range(1, 4);
          out.push(requestHeader(CMD.WRITE, 0, r.u64(), 0n, len), Buffer.alloc(r.int(len), 0xee));
          frames++;
          break;
        }
        default: break;
      }
    }
    this.count(frames);

    const batch = Buffer.concat(out);
    this.fig.bytesSent += batch.length;
    // Mostly one write; sometimes dribbled in random pieces so frames straddle reads.
    if (r.chance(0.1) && batch.length < 256 * 1024) {
      for (let at = 0; at < batch.length;) {
        const n = Math.min(batch.length - at, r.range(1, 3000));
        w.write(batch.subarray(at, at + n));
        at += n;
        if (r.chance(0.3)) await new Promise((res) => setImmediate(res));
      }
    } else {
      w.write(batch);
    }
    const halfClose = term === 'truncated-option' || term === 'half-close' || tterm === 'truncated-header' || tterm === 'truncated-payload' || tterm === 'half-close';
    if (halfClose) w.sock.end();
    if (term === 'hangup' || tterm === 'hangup') {
      // Abrupt close, possibly with replies in flight: nothing to check but the server's health afterwards.
      if (r.chance(0.5)) await w.read(Math.min(w.buffered + 1, 18)).catch(() => undefined);
      w.sock.destroy();
      return;
    }

    // ---- check the answers
    const g = await w.read(18);
    if (g.readBigUInt64BE(0) !== NBDMAGIC || g.readBigUInt64BE(8) !== IHAVEOPT) throw new Error('bad greeting');
    if (g.readUInt16BE(16) !== 3) throw new Error(`greeting flags ${g.readUInt16BE(16)}, expected FIXED_NEWSTYLE|NO_ZEROES`);
    for (const m of middle) {
      const f = await finalReply(w, m.option);
      if (f.type !== m.expect) throw new Error(`option ${m.option}: reply 0x${f.type.toString(16)}, expected 0x${m.expect.toString(16)}`);
      this.fig.optionsAnswered++;
    }
    if (overflow || ['bad-client-flags', 'export-name-unknown', 'bad-option-magic', 'absurd-length', 'truncated-option', 'half-close'].includes(term)) {
      const extra = await w.eof();
      if (extra !== 0) throw new Error(`${term}: ${extra} unexpected bytes before the close`);
      return;
    }
    if (term === 'abort') {
      const f = await finalReply(w, OPT.ABORT);
      if (f.type !== REP.ACK) throw new Error(`ABORT answered 0x${f.type.toString(16)}`);
      if ((await w.eof()) !== 0) throw new Error('bytes after the ABORT ack');
      return;
    }
    const tflags = structured.on ? this.target.flagsStructured : this.target.flagsPlain;
    if (term === 'go') {
      const f = await finalReply(w, OPT.GO);
      if (f.type !== REP.ACK) throw new Error(`GO answered 0x${f.type.toString(16)}`);
      if (f.exportInfo === undefined || f.exportInfo.size !== BigInt(SIZE) || f.exportInfo.flags !== tflags) {
        throw new Error(`GO: export info ${JSON.stringify(f.exportInfo, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v))}, expected size ${SIZE} flags ${tflags}`);
      }
    } else {
      const x = await w.read(noZeroes ? 10 : 134);
      if (x.readBigUInt64BE(0) !== BigInt(SIZE) || x.readUInt16BE(8) !== tflags) throw new Error('EXPORT_NAME: wrong size or flags');
      if (!noZeroes && !x.subarray(10).every((b) => b === 0)) throw new Error('EXPORT_NAME: padding is not zero');
    }
    this.fig.transmissions++;
    const n = pending.size;
    try {
      await collectReplies(w, pending, structured.on, this.fig.tally);
    } catch (e) {
      throw new Error(`${(e as Error).message} (after ${middle.length} options and ${term}, structured ${structured.on}; ${n - pending.size}/${n} requests answered, ending ${tterm})`);
    }
    this.fig.requestsAnswered += n;
    // DISC, a framing violation or our half-close: the server closes after the last reply.
    const extra = await w.eof();
    if (extra !== 0) throw new Error(`${tterm}: ${extra} unexpected bytes after the last reply`);
  }

  /** One transmission request (never DISC, never a framing violation) and its expected answer. */
  private request(tflags: number, structured: boolean, pending: Map<bigint, ExpectedRequest>): Buffer {
    const r = this.rng;
    const type = r.pick([[30, CMD.READ], [22, CMD.WRITE], [1, CMD.FLUSH], [3, CMD.TRIM], [3, CMD.WRITE_ZEROES], [6, CMD.CACHE], [2, CMD.BLOCK_STATUS],
      [6, r.chance(0.5) ? r.range(8, 40) : r.range(8, 0xffff)]]);
    const validFlag = type === CMD.READ ? CF.DF : type === CMD.WRITE_ZEROES ? r.pick([[1, CF.NO_HOLE], [1, CF.FAST_ZERO], [1, CF.FUA]]) : CF.FUA;
    const flags = r.pick([[80, 0], [12, r.chance(0.05) ? validFlag : validFlag & ~CF.FUA], [8, r.int(0x10000)]]);
    const blocks = SIZE / BS;
    let length: number;
    if (type === CMD.FLUSH) length = r.chance(0.5) ? 0 : r.int(0x10000);
    else if (type === CMD.TRIM || type === CMD.WRITE_ZEROES || type === CMD.CACHE) {
      length = r.pick([[70, BS * r.range(1, 64)], [10, BS * r.range(65, 4096)], [8, r.range(1, 20000)], [6, 0], [6, r.u32()]]);
    } else if (type === CMD.WRITE) {
      length = r.pick([[850, BS * r.range(1, 2)], [80, r.range(1, 9000)], [50, 0], [17, BS * r.range(3, 64)], [3, BS * r.range(65, 256)]]);
    } else {
      length = r.pick([[800, BS * r.range(1, 2)], [60, r.range(1, 9000)], [40, 0], [17, BS * r.range(3, 64)], [3, BS * r.range(65, 256)], [50, r.range(MAX_PAYLOAD + 1, 0xffffffff)], [30, r.u32()]]);
      // READs of random huge lengths are refused; keep the valid ones small enough to stream back.
      if (length > 1 << 20 && length <= MAX_PAYLOAD) length = BS;
    }
    let offset: bigint;
    if (type === CMD.FLUSH) offset = r.chance(0.5) ? 0n : BigInt(r.int(SIZE));
    else {
      offset = r.pick<bigint>([
        [70, BigInt(BS * r.int(blocks))], [6, 0n], [8, BigInt(r.int(SIZE))], [5, BigInt(SIZE - BS * r.int(5))], [3, BigInt(SIZE)],
        [4, r.u64()], [2, (1n << 53n) + BigInt(BS * r.int(1000))], [2, BigInt(SIZE) * BigInt(r.range(2, 1000))],
      ]);
    }
    let handle = r.u64();
    while (pending.has(handle)) handle = r.u64();
    const expect = requestVerdict(type, flags, offset, length, tflags, structured);
    pending.set(handle, { type, length, expect });
    const h = requestHeader(type, flags, handle, offset, length);
    return type === CMD.WRITE && length > 0 ? Buffer.concat([h, Buffer.alloc(length, r.int(256))]) : h;
  }
}

// ---------------------------------------------------------- raw client

/** A polite raw client: GO on the device, then simple-reply READ/WRITE/FLUSH. */
async function openClient(to: Target['to']): Promise<Wire> {
  const w = await Wire.connect(to, 120_000);
  await w.read(18);
  w.write(u32(3));
  w.write(optionFrame(OPT.GO, infoData(Buffer.from(DEVICE), [])));
  const f = await finalReply(w, OPT.GO);
  if (f.type !== REP.ACK) throw new Error('GO refused');
  return w;
}

async function simple(w: Wire, type: number, handle: bigint, offset: number, length: number, payload?: Buffer): Promise<{ error: number; data?: Buffer }> {
  w.write(payload !== undefined ? Buffer.concat([requestHeader(type, 0, handle, BigInt(offset), length), payload]) : requestHeader(type, 0, handle, BigInt(offset), length));
  const r = await w.read(16);
  if (r.readUInt32BE(0) !== SIMPLE_MAGIC || r.readBigUInt64BE(8) !== handle) throw new Error('bad reply');
  const error = r.readUInt32BE(4);
  if (error === 0 && type === CMD.READ) return { error, data: Buffer.from(await w.read(length)) };
  return { error };
}

async function verifiedWriteRead(w: Wire, offset: number, tag: string): Promise<void> {
  const data = randomBytes(64 * 1024);
  expect((await simple(w, CMD.WRITE, 1n, offset, data.length, data)).error, `${tag}: write`).toBe(0);
  expect((await simple(w, CMD.FLUSH, 2n, 0, 0)).error, `${tag}: flush`).toBe(0);
  const back = await simple(w, CMD.READ, 3n, offset, data.length);
  expect(back.error, `${tag}: read`).toBe(0);
  expect(back.data?.equals(data), `${tag}: data read back differs`).toBe(true);
}

/** Transmission flags the export announces, with and without structured replies (NBD_OPT_INFO). */
async function probeFlags(to: Target['to']): Promise<{ plain: number; structured: number }> {
  const w = await Wire.connect(to);
  try {
    await w.read(18);
    w.write(u32(3));
    w.write(optionFrame(OPT.INFO, infoData(Buffer.alloc(0), [])));
    const a = await finalReply(w, OPT.INFO);
    w.write(optionFrame(OPT.STRUCTURED_REPLY, Buffer.alloc(0)));
    await finalReply(w, OPT.STRUCTURED_REPLY);
    w.write(optionFrame(OPT.INFO, infoData(Buffer.alloc(0), [])));
    const b = await finalReply(w, OPT.INFO);
    w.write(optionFrame(OPT.ABORT, Buffer.alloc(0)));
    if (a.exportInfo === undefined || b.exportInfo === undefined) throw new Error('no INFO_EXPORT');
    return { plain: a.exportInfo.flags, structured: b.exportInfo.flags };
  } finally {
    w.done();
  }
}

// ---------------------------------------------------------------- test

const SYS_ENV = { ...process.env, PATH: `/usr/bin:/bin:${process.env.PATH ?? ''}` };

describe('seeded fuzz of the live NBD server (dm-remapd process)', () => {
  let dir: string;
  let d: Daemon | undefined;
  beforeAll(() => { dir = tempDir('dmr-fuzz-'); });
  afterAll(async () => {
    if (d !== undefined) await d.stop();
    cleanup(dir);
  });

  it(`survives ${FRAMES} mutated frames over many connections; an older and a fresh connection still work`, async () => {
    const main = join(dir, 'main.img');
    const spare = join(dir, 'spare.img');
    writeFileSync(main, '');
    truncateSync(main, SIZE);
    writeFileSync(spare, '');
    truncateSync(spare, 8 << 20);
    // Every refused request is logged at warn: log errors only, and see readiness through ping.
    d = await startDaemon(dir, { args: ['--log-level', 'error'], waitReady: false });
    for (let i = 0; ; i++) {
      const p = await request(d.sock, 'ping').catch(() => null);
      if (p?.ok === true) break;
      if (i > 200 || d.proc.exitCode !== null) throw new Error(`daemon not up: ${d.stderr}`);
      await new Promise((res) => setTimeout(res, 25));
    }
    const nbdSock = join(dir, 'fz.nbd');
    const add = await ctl(d.sock, '--json', 'add', DEVICE, '--main', main, '--spare', spare, '--format', '--nbd-unix', nbdSock, '--nbd-tcp', '127.0.0.1:0');
    expect(add.code, add.stderr).toBe(0);
    const exportsList = (JSON.parse(add.stdout) as { exports: string[] }).exports;
    const tcp = exportsList.map((e) => /^nbd:\/\/127\.0\.0\.1:(\d+)\//.exec(e)).find((m) => m !== null);
    expect(tcp, exportsList.join(' ')).toBeDefined();
    const unixTo = { path: nbdSock };
    const tcpTo = { host: '127.0.0.1', port: Number((tcp as RegExpExecArray)[1]) };

    const flags = await probeFlags(unixTo);
    expect(flags.plain & F.HAS_FLAGS).toBe(F.HAS_FLAGS);
    expect(flags.structured).toBe(flags.plain | F.SEND_DF);

    const before = await openClient(unixTo);

    const fig: Figures = { frames: 0, connections: 0, transmissions: 0, optionsAnswered: 0, requestsAnswered: 0, bytesSent: 0, tally: new Map(), terminals: new Map() };
    const budget = { left: FRAMES };
    const t0 = Date.now();
    await Promise.all(Array.from({ length: LANES }, (_, i) => new Lane(i, SEED + i * 7919, {
      to: i === 0 ? tcpTo : unixTo, flagsPlain: flags.plain, flagsStructured: flags.structured,
    }, budget, fig).run()));
    const elapsed = Date.now() - t0;

    const errs = [...fig.tally.entries()].sort((a, b) => a[0] - b[0]).map(([e, n]) => `${e === 0 ? 'ok' : Object.entries(E).find(([, v]) => v === e)?.[0] ?? e}=${n}`).join(' ');
    const terms = [...fig.terminals.entries()].sort().map(([k, n]) => `${k}=${n}`).join(' ');
    console.log(`[nbd fuzz] seed ${SEED}: ${fig.frames} frames (${(fig.bytesSent / 1048576).toFixed(1)} MiB) over ${fig.connections} connections `
      + `(${LANES} concurrent lanes, one over TCP) in ${elapsed} ms (${Math.round(fig.frames / (elapsed / 1000))} frames/s); `
      + `${fig.optionsAnswered} option replies and ${fig.requestsAnswered} request replies checked over ${fig.transmissions} transmission phases; `
      + `replies: ${errs}; endings: ${terms}`);
    expect(fig.frames).toBeGreaterThanOrEqual(FRAMES);

    // The server process is alive, logged no error, and holds only the connection opened before the fuzz.
    expect(d.proc.exitCode).toBeNull();
    expect(d.proc.signalCode).toBeNull();
    expect(d.logs.filter((l) => l.level >= 50), JSON.stringify(d.logs.slice(0, 5))).toEqual([]);
    expect(d.stderr).toBe('');
    let st: Record<string, unknown> = {};
    for (let i = 0; i < 100; i++) {
      st = (await request(d.sock, 'status', { name: DEVICE })).result as Record<string, unknown>;
      if (st.connections === 1) break;
      await new Promise((res) => setTimeout(res, 20));
    }
    expect(st).toMatchObject({ state: 'running', connections: 1, readErrors: 0, writeErrors: 0, remappedBlocks: 0, pendingBlocks: 0 });

    // The connection opened before the fuzz, and a fresh one after it.
    await verifiedWriteRead(before, 40 << 20, 'connection opened before the fuzz');
    before.done();
    const after = await openClient(unixTo);
    await verifiedWriteRead(after, 41 << 20, 'fresh connection');
    after.done();
    const afterTcp = await openClient(tcpTo);
    await verifiedWriteRead(afterTcp, 42 << 20, 'fresh TCP connection');
    afterTcp.done();
    // And a real client.
    const uri = `nbd+unix:///${DEVICE}?socket=${nbdSock}`;
    const py = 'import os; d = os.urandom(65536); h.pwrite(d, 43 << 20); h.flush(); print(h.pread(65536, 43 << 20) == d, h.get_size())';
    expect(execFileSync('nbdsh', ['-u', uri, '-c', py], { encoding: 'utf8', timeout: 20_000, env: SYS_ENV }).trim()).toBe(`True ${SIZE}`);

    expect(d.proc.exitCode).toBeNull();
    expect(await d.stop()).toBe(0);
    d = undefined;
  }, 60_000 + Math.ceil(FRAMES * 0.3)); // the 1M run takes a few minutes
});

describe('requests pipelined before a half-close', () => {
  it('are all answered (with or without DISC), also those backpressure held back when the client shut its side', async () => {
    const { startFixture } = await import('./nbd-fixtures.js');
    const f = await startFixture({ sizeMiB: 64, name: DEVICE });
    try {
      for (let round = 0; round < 4; round++) {
        const w = await Wire.connect({ path: f.sock });
        // 40 READs of 1 MiB whose replies the client does not read for a
        // while, then two READs announcing 4 GiB (refused, but each counts
        // 32 MiB against the 64 MiB in-flight allowance until its reply is
        // written): the server stops taking requests with the rest of the
        // batch, and then the client's FIN, still unparsed.
        const pending = new Map<bigint, ExpectedRequest>();
        const reqs: Buffer[] = [];
        const add = (h: bigint, type: number, offset: number, length: number, expect: number): void => {
          reqs.push(requestHeader(type, 0, h, BigInt(offset), length));
          pending.set(h, { type, length, expect: [expect] });
        };
        for (let i = 0; i < 40; i++) add(BigInt(1000 + i), CMD.READ, i << 20, 1 << 20, E.OK);
        for (let i = 0; i < 2; i++) add(BigInt(2000 + i), CMD.READ, 0, 0xffffffff, E.EINVAL);
        for (let i = 0; i < 50; i++) add(BigInt(i), CMD.READ, i * BS, BS, E.OK);
        // Odd rounds end with NBD_CMD_DISC ("the server MUST handle all outstanding requests") before the FIN.
        if (round % 2 === 1) reqs.push(requestHeader(CMD.DISC, 0, 9999n, 0n, 0));
        w.write(Buffer.concat([u32(3), optionFrame(OPT.GO, infoData(Buffer.alloc(0), [])), ...reqs]));
        w.sock.end();
        w.sock.pause();
        await new Promise((res) => setTimeout(res, 300));
        w.sock.resume();
        await w.read(18);
        expect((await finalReply(w, OPT.GO)).type).toBe(REP.ACK);
        const tally = new Map<number, number>();
        await collectReplies(w, pending, false, tally).catch((e: Error) => {
          throw new Error(`round ${round}: ${e.message}; ${pending.size} of 92 requests never answered`);
        });
        expect(tally.get(E.OK)).toBe(90);
        expect(await w.eof()).toBe(0);
        w.done();
      }
    } finally {
      await f.close();
    }
  });
});
