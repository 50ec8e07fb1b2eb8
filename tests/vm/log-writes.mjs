// tests/vm/log-writes.mjs: reader and replayer of the kernel dm-log-writes
// target's log (Documentation/admin-guide/device-mapper/log-writes.rst).
// Debian ships no `replay-log`, so the crash-consistency guest test
// (guest-crash.sh, crash-check.mjs) replays with this. Plain ESM JavaScript:
// the guest runs it with the host's node, no build step.
//
// On-disk format (all integers little-endian). `S` is the log's sector size,
// the logical block size of the logged device:
//   byte 0:   super: u64 magic 0x6a736677736872, u64 version 1,
//             u64 nr_entries, u32 sectorsize; the rest of the sector zero.
//   then nr_entries entries, back to back, each one header sector:
//             u64 sector, u64 nr_sectors (both in units of S), u64 flags,
//             u64 data_len (only a MARK has it: its text follows the 32
//             header bytes in the same sector)
//           followed by nr_sectors * S bytes of written data (none for a
//           DISCARD, a MARK or an empty FLUSH).
// Flags: FLUSH 1, FUA 2, DISCARD 4, MARK 8, METADATA 16.
// The target writes the super (with the entry count) after each FUA or
// MARK entry and when it is torn down, so read the log after `dmsetup
// remove`: nr_entries then covers everything.

export const LOG_FLUSH = 1;
export const LOG_FUA = 2;
export const LOG_DISCARD = 4;
export const LOG_MARK = 8;
export const LOG_METADATA = 16;
const KNOWN_FLAGS = LOG_FLUSH | LOG_FUA | LOG_DISCARD | LOG_MARK | LOG_METADATA;
export const WRITE_LOG_MAGIC = 0x6a736677736872n;
export const WRITE_LOG_VERSION = 1n;
const ENTRY_HEADER_BYTES = 32;

/** The log is not a dm-log-writes log, or is damaged or truncated. */
export class LogWritesError extends Error {
  constructor(message, where = {}) {
    super(message);
    this.name = 'LogWritesError';
    this.entry = where.entry ?? null;
    this.offset = where.offset ?? null;
  }
}

function u64(buf, off, what, where) {
  const v = buf.readBigUInt64LE(off);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new LogWritesError(`${what} ${v} is too large`, where);
  return Number(v);
}

/**
 * Parse a whole log held in a Buffer.
 * @param {Buffer} log
 * @param {{ deviceBytes?: number }} [opts] size of the logged device: every
 *   write must fall inside it
 * @returns {{ sectorSize: number, entries: Array<{ index: number, pos: number,
 *   sector: number, nrSectors: number, flags: number, dataLen: number,
 *   offset: number, length: number, dataPos: number, mark: string | null }> }}
 *   offset/length: the bytes of the logged device the entry covers;
 *   dataPos: where its data starts in the log (-1 when it has none)
 */
export function parseLogWrites(log, opts = {}) {
  if (!Buffer.isBuffer(log)) throw new TypeError('log must be a Buffer');
  if (log.length < 28) throw new LogWritesError(`log of ${log.length} bytes is shorter than its super block`, { offset: 0 });
  const magic = log.readBigUInt64LE(0);
  if (magic !== WRITE_LOG_MAGIC) throw new LogWritesError(`bad magic 0x${magic.toString(16)} (expected 0x${WRITE_LOG_MAGIC.toString(16)})`, { offset: 0 });
  const version = log.readBigUInt64LE(8);
  if (version !== WRITE_LOG_VERSION) throw new LogWritesError(`unsupported log version ${version}`, { offset: 8 });
  const nrEntries = u64(log, 16, 'nr_entries', { offset: 16 });
  const sectorSize = log.readUInt32LE(24);
  if (sectorSize < 512 || sectorSize > 65536 || (sectorSize & (sectorSize - 1)) !== 0) {
    throw new LogWritesError(`sector size ${sectorSize} is not a power of two between 512 and 65536`, { offset: 24 });
  }
  if (log.length < sectorSize) throw new LogWritesError(`log of ${log.length} bytes is shorter than one ${sectorSize}-byte sector`, { offset: 0 });
  // each entry takes at least its header sector
  if (nrEntries > Math.floor(log.length / sectorSize) - 1) {
    throw new LogWritesError(`nr_entries ${nrEntries} cannot fit in a log of ${log.length} bytes`, { offset: 16 });
  }
  const deviceBytes = opts.deviceBytes;
  const entries = [];
  let pos = sectorSize;
  for (let index = 0; index < nrEntries; index++) {
    const where = { entry: index, offset: pos };
    if (pos + sectorSize > log.length) throw new LogWritesError(`entry ${index} at ${pos} runs past the end of the log (${log.length} bytes)`, where);
    const sector = u64(log, pos, `entry ${index}: sector`, where);
    const nrSectors = u64(log, pos + 8, `entry ${index}: nr_sectors`, where);
    const flagsBig = log.readBigUInt64LE(pos + 16);
    if ((flagsBig & ~BigInt(KNOWN_FLAGS)) !== 0n) throw new LogWritesError(`entry ${index}: unknown flags 0x${flagsBig.toString(16)}`, where);
    const flags = Number(flagsBig);
    const dataLen = u64(log, pos + 24, `entry ${index}: data_len`, where);
    let mark = null;
    let dataPos = -1;
    let next;
    if (flags & LOG_MARK) {
      if (flags !== LOG_MARK) throw new LogWritesError(`entry ${index}: a mark with other flags (0x${flags.toString(16)})`, where);
      if (nrSectors !== 0 || sector !== 0) throw new LogWritesError(`entry ${index}: a mark covering sectors (${sector}+${nrSectors})`, where);
      if (dataLen > sectorSize - ENTRY_HEADER_BYTES) throw new LogWritesError(`entry ${index}: mark of ${dataLen} bytes does not fit its sector`, where);
      mark = log.toString('utf8', pos + ENTRY_HEADER_BYTES, pos + ENTRY_HEADER_BYTES + dataLen);
      next = pos + sectorSize;
    } else {
      if (dataLen !== 0) throw new LogWritesError(`entry ${index}: data_len ${dataLen} on an entry that is not a mark (inline data is not supported)`, where);
      if ((flags & LOG_DISCARD) && (flags & (LOG_FLUSH | LOG_FUA))) throw new LogWritesError(`entry ${index}: a discard with FLUSH/FUA`, where);
      const dataBytes = flags & LOG_DISCARD ? 0 : nrSectors * sectorSize;
      if (!Number.isSafeInteger(dataBytes) || pos + sectorSize + dataBytes > log.length) {
        throw new LogWritesError(`entry ${index}: ${nrSectors} sectors of data run past the end of the log (${log.length} bytes)`, where);
      }
      if (dataBytes > 0) dataPos = pos + sectorSize;
      next = pos + sectorSize + dataBytes;
    }
    const offset = sector * sectorSize;
    const length = nrSectors * sectorSize;
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(offset + length)) throw new LogWritesError(`entry ${index}: sector ${sector} is out of range`, where);
    if (deviceBytes !== undefined && length > 0 && offset + length > deviceBytes) {
      throw new LogWritesError(`entry ${index}: bytes ${offset}..${offset + length} are past the end of the ${deviceBytes}-byte device`, where);
    }
    entries.push({ index, pos, sector, nrSectors, flags, dataLen, offset, length, dataPos, mark });
    pos = next;
  }
  return { sectorSize, entries };
}

/** True for an entry that carries data to put on the device (a write or a discard). */
export function changesData(e) {
  return e.length > 0 && e.mark === null;
}

/**
 * Apply one entry to an image of the logged device: copy its data, or zero
 * a discarded range (what the data reads as afterwards is unspecified; zero
 * is one of the allowed outcomes). With `keepChunk`, only the 4 KiB chunks
 * of the device (offset / 4096) for which it returns true are applied: a
 * write torn at 4 KiB boundaries.
 * @param {Buffer} image
 * @param {Buffer} log
 * @param {ReturnType<typeof parseLogWrites>['entries'][number]} e
 * @param {(chunk: number) => boolean} [keepChunk]
 * @returns {number} bytes applied
 */
export function applyEntry(image, log, e, keepChunk) {
  if (!changesData(e)) return 0;
  if (e.offset + e.length > image.length) throw new LogWritesError(`entry ${e.index}: bytes ${e.offset}..${e.offset + e.length} are past the end of the ${image.length}-byte image`, { entry: e.index, offset: e.pos });
  let applied = 0;
  const put = (from, to) => {
    if (e.flags & LOG_DISCARD) image.fill(0, from, to);
    else log.copy(image, from, e.dataPos + (from - e.offset), e.dataPos + (to - e.offset));
    applied += to - from;
  };
  if (keepChunk === undefined) {
    put(e.offset, e.offset + e.length);
    return applied;
  }
  let at = e.offset;
  const end = e.offset + e.length;
  while (at < end) {
    const chunkEnd = Math.min(end, (Math.floor(at / 4096) + 1) * 4096);
    if (keepChunk(Math.floor(at / 4096))) put(at, chunkEnd);
    at = chunkEnd;
  }
  return applied;
}

/** Human name of an entry's flags, e.g. "FLUSH|FUA". */
export function flagNames(flags) {
  const n = [];
  if (flags & LOG_FLUSH) n.push('FLUSH');
  if (flags & LOG_FUA) n.push('FUA');
  if (flags & LOG_DISCARD) n.push('DISCARD');
  if (flags & LOG_MARK) n.push('MARK');
  if (flags & LOG_METADATA) n.push('METADATA');
  return n.length > 0 ? n.join('|') : 'WRITE';
}
