/**
 * GNU ddrescue mapfiles: a strict parser and a writer, plus the conversions
 * between mapfile areas (bytes) and block ranges of a dm-remapd device.
 * Pure: no I/O here.
 *
 * The format (GNU ddrescue manual, "Mapfile structure"): '#' at the start of
 * a line or after whitespace starts a comment that runs to the end of the
 * line. The first non-comment line is the status line: current position,
 * a status character (? * / - F G +) and, since ddrescue 1.20, the current
 * pass (a positive decimal). Every following non-comment line is one data
 * block: position, size, status character (? non-tried, * non-trimmed,
 * / non-scraped, - bad sector, + finished). The blocks are contiguous and
 * non-overlapping. Integers are read as ddrescue and nbdkit read them (C's
 * %lli): decimal, 0x-prefixed hexadecimal, or 0-prefixed octal; ddrescue
 * writes hexadecimal.
 */

export type AreaStatus = '?' | '*' | '/' | '-' | '+';
export type PassStatus = '?' | '*' | '/' | '-' | 'F' | 'G' | '+';

export const AREA_STATUSES: readonly AreaStatus[] = ['?', '*', '/', '-', '+'];
export const PASS_STATUSES: readonly PassStatus[] = ['?', '*', '/', '-', 'F', 'G', '+'];

export interface MapArea {
  pos: number;
  size: number;
  status: AreaStatus;
  /** 1-based line number in the parsed text (parser output only). */
  line?: number;
}

export interface Mapfile {
  currentPos: number;
  currentStatus: PassStatus;
  /** Absent in mapfiles of ddrescue before 1.20. */
  currentPass?: number;
  areas: MapArea[];
}

/** A block range of a device: `count` blocks from `first`. */
export type BlockRange = [first: number, count: number];

/** A mapfile that does not follow the format; `line` is 1-based (0: the file as a whole). */
export class MapfileError extends Error {
  constructor(readonly line: number, message: string) {
    super(line > 0 ? `line ${line}: ${message}` : message);
    this.name = 'MapfileError';
  }
}

/** Largest mapfile accepted (a map of a badly damaged disk has some 100k lines, a few MiB). */
export const MAX_MAPFILE_BYTES = 64 * 1024 * 1024;

const NUMBER = /^(?:0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$/;

function shown(t: string): string {
  return JSON.stringify(t.length > 40 ? `${t.slice(0, 40)}...` : t);
}

function parseNumber(tok: string, what: string, line: number): number {
  if (!NUMBER.test(tok)) throw new MapfileError(line, `${what} ${shown(tok)} is not a non-negative integer (decimal, 0x hex or 0 octal)`);
  let v: bigint;
  if (tok.length > 2 && (tok[1] === 'x' || tok[1] === 'X')) v = BigInt(tok);
  else if (tok.length > 1 && tok[0] === '0') v = BigInt(`0o${tok.slice(1)}`);
  else v = BigInt(tok);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new MapfileError(line, `${what} ${shown(tok)} is too large (over 2^53 - 1)`);
  return Number(v);
}

/** The line without its comment, split at whitespace. */
function tokens(raw: string, line: number): string[] {
  let text = raw;
  for (let i = 0; i < text.length; i++) {
    if (text[i] === '#' && (i === 0 || text[i - 1] === ' ' || text[i - 1] === '\t')) {
      text = text.slice(0, i);
      break;
    }
  }
  // A CR of a CRLF file is whitespace; any other control character is not text of a mapfile.
  // eslint-disable-next-line no-control-regex
  const bad = /[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f]/.exec(text);
  if (bad !== null) throw new MapfileError(line, `unexpected control character 0x${bad[0].charCodeAt(0).toString(16).padStart(2, '0')}`);
  return text.split(/[ \t\r]+/).filter((t) => t.length > 0);
}

/**
 * Parse a mapfile strictly. Throws MapfileError naming the line for anything
 * that is not the format: a missing or malformed status line, a block line
 * with other than 3 fields, an unknown status, a zero size, a gap or overlap
 * between blocks, numbers over 2^53 - 1.
 */
export function parseMapfile(text: string): Mapfile {
  if (text.length > MAX_MAPFILE_BYTES) throw new MapfileError(0, `mapfile is larger than ${MAX_MAPFILE_BYTES} bytes`);
  const lines = text.split('\n');
  let status: Omit<Mapfile, 'areas'> | null = null;
  const areas: MapArea[] = [];
  let end = -1;
  for (let i = 0; i < lines.length; i++) {
    const line = i + 1;
    const t = tokens(lines[i], line);
    if (t.length === 0) continue;
    if (status === null) {
      if (t.length < 2 || t.length > 3) {
        throw new MapfileError(line, `status line must be "POSITION STATUS [PASS]", got ${t.length} field(s): ${shown(t.join(' '))}`);
      }
      const currentPos = parseNumber(t[0], 'status line position', line);
      if (t[1].length !== 1 || !(PASS_STATUSES as readonly string[]).includes(t[1])) {
        throw new MapfileError(line, `status line: unknown status ${shown(t[1])} (one of ${PASS_STATUSES.join(' ')})`);
      }
      status = { currentPos, currentStatus: t[1] as PassStatus };
      if (t.length === 3) {
        if (!/^[1-9][0-9]*$/.test(t[2])) throw new MapfileError(line, `status line: pass ${shown(t[2])} is not a positive decimal integer`);
        const pass = Number(t[2]);
        if (!Number.isSafeInteger(pass)) throw new MapfileError(line, `status line: pass ${shown(t[2])} is too large`);
        status.currentPass = pass;
      }
      continue;
    }
    if (t.length !== 3) throw new MapfileError(line, `data block line must be "POSITION SIZE STATUS", got ${t.length} field(s): ${shown(t.join(' '))}`);
    const pos = parseNumber(t[0], 'position', line);
    const size = parseNumber(t[1], 'size', line);
    if (t[2].length !== 1 || !(AREA_STATUSES as readonly string[]).includes(t[2])) {
      throw new MapfileError(line, `unknown block status ${shown(t[2])} (one of ${AREA_STATUSES.join(' ')})`);
    }
    if (size === 0) throw new MapfileError(line, 'block size is 0');
    if (pos + size > Number.MAX_SAFE_INTEGER) throw new MapfileError(line, `block ends past 2^53 - 1 (position ${pos}, size ${size})`);
    if (end >= 0 && pos !== end) {
      throw new MapfileError(line, `block at ${pos} ${pos < end ? 'overlaps the previous block' : 'leaves a gap after the previous block'}, which ends at ${end}`);
    }
    areas.push({ pos, size, status: t[2] as AreaStatus, line });
    end = pos + size;
  }
  if (status === null) throw new MapfileError(0, 'no status line: the mapfile is empty or holds only comments');
  return { ...status, areas };
}

function hex(n: number): string {
  return `0x${n.toString(16).toUpperCase().padStart(8, '0')}`;
}

/**
 * A mapfile as ddrescue writes it: heading comments (each prefixed with
 * "# "), the status line, then one line per area in hexadecimal.
 */
export function formatMapfile(m: Mapfile, comments: readonly string[] = []): string {
  const out: string[] = comments.map((c) => `# ${c.replace(/[\r\n]/g, ' ')}`);
  out.push(m.currentPass === undefined ? '# current_pos  current_status' : '# current_pos  current_status  current_pass');
  out.push(`${hex(m.currentPos)}     ${m.currentStatus}${m.currentPass === undefined ? '' : `               ${m.currentPass}`}`);
  out.push('#      pos        size  status');
  for (const a of m.areas) out.push(`${hex(a.pos)}  ${hex(a.size)}  ${a.status}`);
  return `${out.join('\n')}\n`;
}

/** Sorted, merged block ranges from any number of block ranges (overlapping or adjacent ones join). */
export function mergeBlockRanges(ranges: Iterable<BlockRange>): BlockRange[] {
  const sorted = [...ranges].filter((r) => r[1] > 0).sort((a, b) => a[0] - b[0]);
  const out: BlockRange[] = [];
  for (const [first, count] of sorted) {
    const last = out[out.length - 1];
    if (last !== undefined && first <= last[0] + last[1]) last[1] = Math.max(last[1], first + count - last[0]);
    else out.push([first, count]);
  }
  return out;
}

/** Block ranges from a sorted list of blocks (consecutive blocks join). */
export function rangesOfBlocks(blocks: Iterable<number>): BlockRange[] {
  return mergeBlockRanges([...blocks].map((b): BlockRange => [b, 1]));
}

/**
 * The areas of a whole device of `sizeBytes`: the given block ranges bad
 * ('-'), everything else finished ('+'), adjacent areas of one status merged.
 */
export function deviceAreas(sizeBytes: number, blockSize: number, bad: Iterable<BlockRange>): MapArea[] {
  const areas: MapArea[] = [];
  const push = (pos: number, size: number, status: AreaStatus): void => {
    if (size <= 0) return;
    const last = areas[areas.length - 1];
    if (last !== undefined && last.status === status && last.pos + last.size === pos) last.size += size;
    else areas.push({ pos, size, status });
  };
  let at = 0;
  for (const [first, count] of mergeBlockRanges(bad)) {
    const start = Math.min(first * blockSize, sizeBytes);
    const end = Math.min((first + count) * blockSize, sizeBytes);
    push(at, start - at, '+');
    push(start, end - start, '-');
    at = end;
  }
  push(at, sizeBytes - at, '+');
  return areas;
}

/** The blocks an area touches (any byte of it), as a range. */
export function blocksOfArea(a: MapArea, blockSize: number): BlockRange {
  const first = Math.floor(a.pos / blockSize);
  const last = Math.floor((a.pos + a.size - 1) / blockSize);
  return [first, last - first + 1];
}

/** Merge adjacent areas of the same status (what ddrescue does before writing). */
export function compactAreas(areas: readonly MapArea[]): MapArea[] {
  const out: MapArea[] = [];
  for (const a of areas) {
    const last = out[out.length - 1];
    if (last !== undefined && last.status === a.status && last.pos + last.size === a.pos) last.size += a.size;
    else out.push({ pos: a.pos, size: a.size, status: a.status });
  }
  return out;
}
