/**
 * NBD protocol constants and wire codecs, taken from the NBD specification
 * (NetworkBlockDevice/nbd, doc/proto.md). Section names in the comments are
 * the spec's headings. Nothing here does I/O: every function maps bytes to
 * values or values to bytes, so the parsers built on it can be fuzzed.
 */

// ---------------------------------------------------------------- magics

/** "Newstyle negotiation": 'NBDMAGIC', the first 8 bytes the server sends. */
export const NBD_MAGIC = 0x4e42444d41474943n;
/** "Newstyle negotiation": 'IHAVEOPT', after NBDMAGIC and before every option. */
export const NBD_OPTS_MAGIC = 0x49484156454f5054n;
/** "Fixed newstyle negotiation": magic of every option reply. */
export const NBD_REP_MAGIC = 0x0003e889045565a9n;
/** "Request message". */
export const NBD_REQUEST_MAGIC = 0x25609513;
/** "Simple reply message". */
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
/** "Structured reply chunk message". */
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// ------------------------------------------------------- handshake flags

/** "Handshake flags" (16 bits, server). */
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;

/** "Client flags" (32 bits). Any other bit: the server MUST drop the connection. */
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

// ---------------------------------------------------- transmission flags

/** "Transmission flags" (16 bits). */
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_SEND_DF = 1 << 7;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
export const NBD_FLAG_SEND_RESIZE = 1 << 9;
export const NBD_FLAG_SEND_CACHE = 1 << 10;
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;

// ---------------------------------------------------------- option types

/** "Option types". */
export const NbdOpt = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

/** "Option reply types"; errors have bit 31 set. */
const REP_ERR = 0x80000000;
export const NbdRep = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: REP_ERR + 1,
  ERR_POLICY: REP_ERR + 2,
  ERR_INVALID: REP_ERR + 3,
  ERR_PLATFORM: REP_ERR + 4,
  ERR_TLS_REQD: REP_ERR + 5,
  ERR_UNKNOWN: REP_ERR + 6,
  ERR_SHUTDOWN: REP_ERR + 7,
  ERR_BLOCK_SIZE_REQD: REP_ERR + 8,
  ERR_TOO_BIG: REP_ERR + 9,
  ERR_EXT_HEADER_REQD: REP_ERR + 10,
} as const;

/** Info types of NBD_REP_INFO ("NBD_OPT_INFO and NBD_OPT_GO"). */
export const NbdInfo = {
  EXPORT: 0,
  NAME: 1,
  DESCRIPTION: 2,
  BLOCK_SIZE: 3,
} as const;

// --------------------------------------------------------- transmission

/** "Request types". */
export const NbdCmd = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
  RESIZE: 8,
} as const;

/** "Command flags". */
export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
export const NBD_CMD_FLAG_DF = 1 << 2;
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;

/** "Structured reply flags". */
export const NBD_REPLY_FLAG_DONE = 1 << 0;

/** "Structured reply types"; error chunk types have bit 15 set. */
export const NbdReplyType = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: (1 << 15) + 1,
  ERROR_OFFSET: (1 << 15) + 2,
} as const;

/**
 * "Error values": the only errors allowed on the wire. They happen to equal
 * the Linux errno values.
 */
export const NbdErr = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

// ------------------------------------------------------------- limits

/** "Conventions": a string MUST be no longer than 4096 bytes. */
export const NBD_MAX_STRING = 4096;
/**
 * Largest READ/WRITE payload this server accepts (our choice, advertised as
 * the maximum block size in NBD_INFO_BLOCK_SIZE).
 */
export const NBD_MAX_PAYLOAD = 32 * 1024 * 1024;
/** Option data we read and act on; longer options get NBD_REP_ERR_TOO_BIG. */
export const NBD_MAX_OPTION_LENGTH = 64 * 1024;
/** Option data we are still willing to read and discard to keep framing; beyond it we disconnect. */
export const NBD_MAX_OPTION_SKIP = 16 * 1024 * 1024;

export const REQUEST_HEADER_BYTES = 28;
export const SIMPLE_REPLY_BYTES = 16;
export const STRUCTURED_HEADER_BYTES = 20;
export const OPTION_HEADER_BYTES = 16;
export const OPTION_REPLY_HEADER_BYTES = 20;

// ------------------------------------------------------- error mapping

const NBD_ERRNOS: ReadonlySet<number> = new Set(Object.values(NbdErr));

/**
 * A host errno as the wire error value ("Error values"): EROFS becomes EPERM,
 * EDQUOT and EFBIG become ENOSPC (the spec asks for both), anything outside the
 * NBD set becomes EIO.
 */
export function toNbdError(errno: number): number {
  const n = Math.abs(errno);
  if (NBD_ERRNOS.has(n)) return n;
  switch (n) {
    case 30: // EROFS
      return NbdErr.EPERM;
    case 122: // EDQUOT
    case 27: // EFBIG
      return NbdErr.ENOSPC;
    default:
      return NbdErr.EIO;
  }
}

// ------------------------------------------------------------ handshake

/** "Newstyle negotiation": NBDMAGIC, IHAVEOPT, 16 bits of handshake flags. */
export function encodeServerGreeting(handshakeFlags: number): Buffer {
  const b = Buffer.allocUnsafe(18);
  b.writeBigUInt64BE(NBD_MAGIC, 0);
  b.writeBigUInt64BE(NBD_OPTS_MAGIC, 8);
  b.writeUInt16BE(handshakeFlags, 16);
  return b;
}

export interface OptionHeader {
  magic: bigint;
  option: number;
  length: number;
}

/** "Newstyle negotiation": the 16-byte header of a client option. */
export function decodeOptionHeader(b: Uint8Array, at = 0): OptionHeader {
  const v = view(b);
  return { magic: v.getBigUint64(at), option: v.getUint32(at + 8), length: v.getUint32(at + 12) };
}

export function encodeOptionHeader(option: number, length: number): Buffer {
  const b = Buffer.allocUnsafe(OPTION_HEADER_BYTES);
  b.writeBigUInt64BE(NBD_OPTS_MAGIC, 0);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(length >>> 0, 12);
  return b;
}

/** "Fixed newstyle negotiation": one option reply (header and data). */
export function encodeOptionReply(option: number, replyType: number, data: Uint8Array = EMPTY): Buffer {
  const b = Buffer.allocUnsafe(OPTION_REPLY_HEADER_BYTES + data.length);
  b.writeBigUInt64BE(NBD_REP_MAGIC, 0);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(replyType >>> 0, 12);
  b.writeUInt32BE(data.length, 16);
  b.set(data, OPTION_REPLY_HEADER_BYTES);
  return b;
}

export interface OptionReply {
  option: number;
  replyType: number;
  data: Uint8Array;
}

/** Inverse of encodeOptionReply (for tests and fuzzing); null if incomplete. */
export function decodeOptionReply(b: Uint8Array): { reply: OptionReply; bytes: number } | null {
  if (b.length < OPTION_REPLY_HEADER_BYTES) return null;
  const v = view(b);
  if (v.getBigUint64(0) !== NBD_REP_MAGIC) throw new RangeError('bad option reply magic');
  const length = v.getUint32(16);
  if (b.length < OPTION_REPLY_HEADER_BYTES + length) return null;
  return {
    reply: { option: v.getUint32(8), replyType: v.getUint32(12), data: b.subarray(20, 20 + length) },
    bytes: OPTION_REPLY_HEADER_BYTES + length,
  };
}

/** Data of NBD_REP_SERVER ("Option reply types"): name length, name, then free-form details. */
export function encodeRepServer(name: string, details = ''): Buffer {
  const n = Buffer.from(name, 'utf8');
  const d = Buffer.from(details, 'utf8');
  const b = Buffer.allocUnsafe(4 + n.length + d.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  d.copy(b, 4 + n.length);
  return b;
}

/** NBD_INFO_EXPORT: info type, 64 bits of size, 16 bits of transmission flags. */
export function encodeInfoExport(sizeBytes: number, transmissionFlags: number): Buffer {
  const b = Buffer.allocUnsafe(12);
  b.writeUInt16BE(NbdInfo.EXPORT, 0);
  b.writeBigUInt64BE(BigInt(sizeBytes), 2);
  b.writeUInt16BE(transmissionFlags, 10);
  return b;
}

/** NBD_INFO_NAME / NBD_INFO_DESCRIPTION: info type, then the string. */
export function encodeInfoString(type: typeof NbdInfo.NAME | typeof NbdInfo.DESCRIPTION, s: string): Buffer {
  const t = Buffer.from(s, 'utf8');
  const b = Buffer.allocUnsafe(2 + t.length);
  b.writeUInt16BE(type, 0);
  t.copy(b, 2);
  return b;
}

export interface BlockSizeConstraints {
  minimum: number;
  preferred: number;
  maximum: number;
}

/** NBD_INFO_BLOCK_SIZE: info type, minimum, preferred, maximum (32 bits each). */
export function encodeInfoBlockSize(c: BlockSizeConstraints): Buffer {
  const b = Buffer.allocUnsafe(14);
  b.writeUInt16BE(NbdInfo.BLOCK_SIZE, 0);
  b.writeUInt32BE(c.minimum, 2);
  b.writeUInt32BE(c.preferred, 6);
  b.writeUInt32BE(c.maximum, 10);
  return b;
}

/** Reply to NBD_OPT_EXPORT_NAME: size, transmission flags, 124 zeroes unless NO_ZEROES. */
export function encodeExportNameReply(sizeBytes: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(10 + (noZeroes ? 0 : 124));
  b.writeBigUInt64BE(BigInt(sizeBytes), 0);
  b.writeUInt16BE(transmissionFlags, 8);
  return b;
}

export interface InfoRequest {
  name: string;
  infos: number[];
}

/**
 * Data of NBD_OPT_INFO / NBD_OPT_GO: 32 bits name length, name, 16 bits count,
 * count x 16 bits info types. Returns a reason string when malformed.
 */
export function decodeInfoRequest(data: Uint8Array): InfoRequest | string {
  if (data.length < 6) return 'option data shorter than 6 bytes';
  const v = view(data);
  const nameLen = v.getUint32(0);
  if (nameLen > NBD_MAX_STRING) return `export name of ${nameLen} bytes is longer than ${NBD_MAX_STRING}`;
  if (4 + nameLen + 2 > data.length) return 'export name overruns the option';
  const count = v.getUint16(4 + nameLen);
  if (4 + nameLen + 2 + 2 * count !== data.length) return 'information request count does not match the option length';
  const name = Buffer.from(data.buffer, data.byteOffset + 4, nameLen).toString('utf8');
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(v.getUint16(4 + nameLen + 2 + 2 * i));
  return { name, infos };
}

export function encodeInfoRequest(name: string, infos: number[]): Buffer {
  const n = Buffer.from(name, 'utf8');
  const b = Buffer.allocUnsafe(4 + n.length + 2 + 2 * infos.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  b.writeUInt16BE(infos.length, 4 + n.length);
  infos.forEach((t, i) => b.writeUInt16BE(t, 4 + n.length + 2 + 2 * i));
  return b;
}

// --------------------------------------------------------- transmission

export interface RequestHeader {
  magic: number;
  flags: number;
  type: number;
  /** Opaque 64-bit cookie, echoed in every reply. */
  handle: bigint;
  offset: number;
  length: number;
}

/**
 * "Request message": 28 bytes. Offsets above 2^53 do not fit a JS number;
 * they are reported as Infinity, which every range check rejects.
 */
export function decodeRequestHeader(b: Uint8Array, at = 0): RequestHeader {
  const v = view(b);
  const off = v.getBigUint64(at + 16);
  return {
    magic: v.getUint32(at),
    flags: v.getUint16(at + 4),
    type: v.getUint16(at + 6),
    handle: v.getBigUint64(at + 8),
    offset: off > BigInt(Number.MAX_SAFE_INTEGER) ? Number.POSITIVE_INFINITY : Number(off),
    length: v.getUint32(at + 24),
  };
}

export function encodeRequestHeader(h: Omit<RequestHeader, 'magic'> & { magic?: number }): Buffer {
  const b = Buffer.allocUnsafe(REQUEST_HEADER_BYTES);
  b.writeUInt32BE((h.magic ?? NBD_REQUEST_MAGIC) >>> 0, 0);
  b.writeUInt16BE(h.flags, 4);
  b.writeUInt16BE(h.type, 6);
  b.writeBigUInt64BE(h.handle, 8);
  b.writeBigUInt64BE(BigInt(h.offset), 16);
  b.writeUInt32BE(h.length >>> 0, 24);
  return b;
}

/** "Simple reply message": magic, error, handle (data follows for a successful READ). */
export function encodeSimpleReply(error: number, handle: bigint): Buffer {
  const b = Buffer.allocUnsafe(SIMPLE_REPLY_BYTES);
  b.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error >>> 0, 4);
  b.writeBigUInt64BE(handle, 8);
  return b;
}

/** "Structured reply chunk message": the 20-byte header. */
export function encodeChunkHeader(flags: number, type: number, handle: bigint, length: number): Buffer {
  const b = Buffer.allocUnsafe(STRUCTURED_HEADER_BYTES);
  writeChunkHeader(b, flags, type, handle, length);
  return b;
}

function writeChunkHeader(b: Buffer, flags: number, type: number, handle: bigint, length: number): void {
  b.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(handle, 8);
  b.writeUInt32BE(length >>> 0, 16);
}

/**
 * NBD_REPLY_TYPE_OFFSET_DATA: chunk header and the 64-bit offset; the
 * `dataLength` bytes of data are sent right after it.
 */
export function encodeOffsetDataHeader(flags: number, handle: bigint, offset: number, dataLength: number): Buffer {
  const b = Buffer.allocUnsafe(STRUCTURED_HEADER_BYTES + 8);
  writeChunkHeader(b, flags, NbdReplyType.OFFSET_DATA, handle, 8 + dataLength);
  b.writeBigUInt64BE(BigInt(offset), STRUCTURED_HEADER_BYTES);
  return b;
}

/** NBD_REPLY_TYPE_ERROR: error, message length, message. Always final here. */
export function encodeErrorChunk(handle: bigint, error: number, message: string): Buffer {
  let msg = Buffer.from(message, 'utf8');
  if (msg.length > NBD_MAX_STRING) msg = msg.subarray(0, NBD_MAX_STRING);
  const b = Buffer.allocUnsafe(STRUCTURED_HEADER_BYTES + 6 + msg.length);
  writeChunkHeader(b, NBD_REPLY_FLAG_DONE, NbdReplyType.ERROR, handle, 6 + msg.length);
  b.writeUInt32BE(error >>> 0, STRUCTURED_HEADER_BYTES);
  b.writeUInt16BE(msg.length, STRUCTURED_HEADER_BYTES + 4);
  msg.copy(b, STRUCTURED_HEADER_BYTES + 6);
  return b;
}

/** NBD_REPLY_TYPE_NONE with NBD_REPLY_FLAG_DONE (the type MUST carry DONE). */
export function encodeNoneChunk(handle: bigint): Buffer {
  return encodeChunkHeader(NBD_REPLY_FLAG_DONE, NbdReplyType.NONE, handle, 0);
}

export interface ChunkHeader {
  magic: number;
  flags: number;
  type: number;
  handle: bigint;
  length: number;
}

export function decodeChunkHeader(b: Uint8Array, at = 0): ChunkHeader {
  const v = view(b);
  return { magic: v.getUint32(at), flags: v.getUint16(at + 4), type: v.getUint16(at + 6), handle: v.getBigUint64(at + 8), length: v.getUint32(at + 16) };
}

const EMPTY = new Uint8Array(0);

function view(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}
