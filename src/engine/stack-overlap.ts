/**
 * Where a file or block device keeps its bytes, down through the block
 * stack, so that two paths sharing storage are caught even when they are
 * different devices: a partition and its whole disk (/dev/loop0 and
 * /dev/loop0p2, /dev/sda and /dev/sda1), a loop device (or one of its
 * partitions) and the image file behind it, two device-mapper devices over
 * overlapping parts of one disk.
 *
 * Each path maps to a set of byte ranges, one or more per layer, from the
 * device itself down (a tree: a dm device with several segments branches):
 *  - a partition adds its parent disk at `start` (sysfs `partition`,
 *    `start`, `size`, in 512-byte sectors);
 *  - a loop device adds its backing file at `loop/offset`
 *    (`loop/backing_file`); a regular file is its own inode;
 *  - a dm device (sysfs `dm/`) adds what its table maps the used range to,
 *    read with `dmsetup table --major M --minor N` (sysfs lists `slaves`
 *    but not the mapping): `linear DEV OFFSET`, `flakey DEV OFFSET ...` and
 *    `delay DEV OFFSET DELAY [DEV OFFSET DELAY [...]]` exactly (the segment's
 *    sectors at OFFSET of each DEV); `log-writes DATA LOG` exactly on DATA
 *    (at the same sector: that target does not subtract the segment start)
 *    and the whole of LOG; `error` and `zero` nothing; any other target
 *    (crypt, raid, thin, striped, snapshot, an unknown one, or a known one
 *    with arguments it does not expect) the whole of every device its table
 *    names (arguments of the form MAJ:MIN or /path);
 *  - an md device (sysfs `md/`) adds the whole of each of its `slaves`.
 * Two paths overlap when some layer appears under both with intersecting
 * ranges. One exception: dm-log-writes writes its log device on its own
 * account, as an append-only log, never at the data's addresses; ranges
 * reached only as the log of one and the same log-writes device are tagged
 * with it (`via`) and not compared with each other (what the two paths
 * write through that device is compared on the device itself). So main and
 * spare as disjoint dm-linear segments of one log-writes device are
 * accepted; anything else that reaches the log device is refused.
 *
 * Bounds: 16 layers deep, 4096 ranges per path (a guard, not a limit a real
 * stack reaches); a dm table is read once per comparison.
 * When a dm table cannot be read (no dmsetup, not root, the device went
 * away, output that does not parse), that device is not descended, as
 * before this existed, and nothing is logged: the device itself is still
 * compared, and a dm/md device holds its slaves exclusively, so a main or
 * spare on a slave of a stack is refused by the O_EXCL open (EBUSY).
 * dmsetup runs synchronously (execFileSync, 5 s timeout), only when a path
 * goes through a dm device, and only at add/open time.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, realpathSync, statSync } from 'node:fs';
import { basename, dirname } from 'node:path';

/** One layer of where a path keeps its bytes. */
export interface StorageLayer {
  /** Identity of the layer: `block:MAJ:MIN` or `file:DEV:INO`. */
  key: string;
  /** What to call it in a message: /dev/NAME, /dev/mapper/NAME or the file path. */
  what: string;
  /** Byte range used on that layer, [start, end). */
  start: number;
  end: number;
  /**
   * Reached only as the log of this dm-log-writes device (its `block:MAJ:MIN`
   * key): written by that target as an append-only log, so two ranges with
   * the same `via` do not clash with each other.
   */
  via?: string;
}

/** How the layers of a path are looked up (tests give another sysfs root and table reader). */
export interface StackOptions {
  /** Where sysfs is mounted; /sys. */
  sysRoot?: string;
  /** The table of dm device MAJ:MIN as `dmsetup table` prints it, or null when it cannot be read; dmsetup. */
  readDmTable?: (major: number, minor: number) => string | null;
}

const SECTOR = 512;
const MAX_DEPTH = 16;
const MAX_RANGES = 4096;

function readTrim(p: string): string {
  return readFileSync(p, 'utf8').trim();
}

// ---------------------------------------------------------------- dm tables

/** A dm table line that cannot be a table line (the caller then does not descend that device). */
export class DmTableError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'DmTableError';
  }
}

/** Where one dm segment keeps its bytes on one device the table names. */
export interface DmMap {
  /** The device as the table names it: MAJ:MIN (as dmsetup prints it) or a path. */
  dev: string;
  /**
   * `exact`: sector `s` of the segment (counted from the segment's start)
   * is sector `offset + s` of dev. `whole`: all of dev, as far as we know.
   */
  kind: 'exact' | 'whole';
  /** Sectors; 0 for `whole`. */
  offset: number;
  /** `whole` only: dm-log-writes' log device (written on the target's own account). */
  log?: boolean;
}

/** One line of a dm table. */
export interface DmSegment {
  /** First sector of the dm device the segment covers. */
  start: number;
  /** Sectors. */
  length: number;
  target: string;
  args: string[];
  /** Where its bytes go: [] for `error` and `zero`. */
  maps: DmMap[];
}

/** Sector counts beyond this would not stay exact as byte counts. */
const MAX_SECTORS = Math.floor(Number.MAX_SAFE_INTEGER / SECTOR);

function sectors(t: string | undefined): number | null {
  if (t === undefined || !/^\d{1,16}$/.test(t)) return null;
  const n = Number(t);
  return n <= MAX_SECTORS ? n : null;
}

/** Whether a table argument names a device (dmsetup prints MAJ:MIN; a table may be loaded with paths). */
export function isDeviceArg(t: string): boolean {
  return /^\d{1,10}:\d{1,10}$/.test(t) || t.startsWith('/');
}

/** Every device the arguments name, each as a whole (the conservative reading of a target we do not model). */
function wholeOfEach(args: string[]): DmMap[] {
  return [...new Set(args.filter(isDeviceArg))].map((dev) => ({ dev, kind: 'whole' as const, offset: 0 }));
}

/** `DEV OFFSET` at args[i], as an exact map, or null. */
function exactAt(args: string[], i: number): DmMap | null {
  const dev = args[i];
  const offset = sectors(args[i + 1]);
  return dev !== undefined && isDeviceArg(dev) && offset !== null ? { dev, kind: 'exact', offset } : null;
}

/** Where a segment of `target` with `args`, starting at sector `start` of its dm device, keeps its bytes. */
export function segmentMaps(target: string, args: string[], start: number): DmMap[] {
  switch (target) {
    case 'error':
    case 'zero':
      return [];
    case 'linear': {
      const m = args.length === 2 ? exactAt(args, 0) : null;
      return m !== null ? [m] : wholeOfEach(args);
    }
    case 'flakey': {
      // DEV OFFSET UP DOWN [N FEATURES...]: the features name no device
      const m = args.length >= 4 && sectors(args[2]) !== null && sectors(args[3]) !== null ? exactAt(args, 0) : null;
      return m !== null ? [m] : wholeOfEach(args);
    }
    case 'delay': {
      // DEV OFFSET DELAY, then optionally the same for writes, then for flushes
      if (args.length !== 3 && args.length !== 6 && args.length !== 9) return wholeOfEach(args);
      const maps: DmMap[] = [];
      for (let i = 0; i < args.length; i += 3) {
        const m = sectors(args[i + 2]) !== null ? exactAt(args, i) : null;
        if (m === null) return wholeOfEach(args);
        maps.push(m);
      }
      return maps;
    }
    case 'log-writes': {
      // DATA LOG: sector s of the dm device is sector s of DATA (no segment offset)
      const [data, log] = args;
      if (args.length !== 2 || !isDeviceArg(data) || !isDeviceArg(log)) return wholeOfEach(args);
      return [{ dev: data, kind: 'exact', offset: start }, { dev: log, kind: 'whole', offset: 0, log: true }];
    }
    default:
      return wholeOfEach(args);
  }
}

/**
 * The segments of a dm table as `dmsetup table` prints it, one per line:
 * `START LENGTH TARGET ARGS...` (sectors). Blank lines are skipped. Throws
 * a DmTableError (and nothing else) for text that is not such a table.
 */
export function parseDmTable(text: string): DmSegment[] {
  if (typeof text !== 'string') throw new DmTableError('a dm table is text');
  const out: DmSegment[] = [];
  for (const [i, line] of text.split('\n').entries()) {
    const f = line.trim().split(/\s+/).filter((t) => t !== '');
    if (f.length === 0) continue;
    const start = sectors(f[0]);
    const length = sectors(f[1]);
    const target = f[2];
    if (start === null || length === null || length === 0 || start + length > MAX_SECTORS) {
      throw new DmTableError(`dm table line ${i + 1}: expected START LENGTH TARGET, got ${JSON.stringify(line.slice(0, 80))}`);
    }
    if (target === undefined || !/^[A-Za-z0-9][A-Za-z0-9_.+-]*$/.test(target)) {
      throw new DmTableError(`dm table line ${i + 1}: no target name in ${JSON.stringify(line.slice(0, 80))}`);
    }
    const args = f.slice(3);
    out.push({ start, length, target, args, maps: segmentMaps(target, args, start) });
  }
  return out;
}

/** The table of dm device MAJ:MIN through dmsetup, or null (no dmsetup, no permission, no such device). */
export function dmsetupTable(major: number, minor: number): string | null {
  for (const bin of ['dmsetup', '/usr/sbin/dmsetup', '/sbin/dmsetup']) {
    try {
      return execFileSync(bin, ['table', '--major', String(major), '--minor', String(minor)], {
        encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'], timeout: 5000, maxBuffer: 4 << 20,
      });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') continue; // not at this path: try the next
      return null;
    }
  }
  return null;
}

// ---------------------------------------------------------------- the walk

interface Walk {
  sysRoot: string;
  readDmTable: (major: number, minor: number) => string | null;
  out: StorageLayer[];
  seen: Set<string>;
}

/** The sysfs folder of device number `rdev` (glibc's dev_t encoding, as Node's stat gives it). */
function sysfsDir(rdev: number, sysRoot: string): string {
  const major = Math.floor(rdev / 256) & 0xfff;
  const minor = (rdev & 0xff) | (Math.floor(rdev / 4096) & 0xfff00);
  return realpathSync(`${sysRoot}/dev/block/${major}:${minor}`);
}

/** The sysfs folder of a device a dm table names (MAJ:MIN or a path), or null. */
function argDir(dev: string, sysRoot: string): string | null {
  try {
    if (/^\d+:\d+$/.test(dev)) return realpathSync(`${sysRoot}/dev/block/${dev}`);
    const st = statSync(dev);
    return st.isBlockDevice() ? sysfsDir(st.rdev, sysRoot) : null;
  } catch {
    return null;
  }
}

function deviceBytes(sys: string): number {
  return Number(readTrim(`${sys}/size`)) * SECTOR;
}

/** Adds the layers of the block device whose sysfs folder is `sys`, for bytes [start, end) of it. */
function blockLayers(sys: string, start: number, end: number, via: string | undefined, depth: number, w: Walk): void {
  if (depth > MAX_DEPTH || w.out.length >= MAX_RANGES) return; // a guard: block stacks are trees of a few levels
  const devNo = readTrim(`${sys}/dev`);
  const key = `block:${devNo}`;
  const id = `${key}|${start}|${end}|${via ?? ''}`;
  if (w.seen.has(id)) return; // the same range again (many segments over one log device)
  w.seen.add(id);
  const name = basename(sys);
  const dm = existsSync(`${sys}/dm`);
  let what = `/dev/${name}`;
  if (dm) {
    try { what = `/dev/mapper/${readTrim(`${sys}/dm/name`)}`; } catch { /* /dev/dm-N then */ }
  }
  w.out.push({ key, what, start, end, ...(via !== undefined ? { via } : {}) });
  if (existsSync(`${sys}/partition`)) {
    const first = Number(readTrim(`${sys}/start`)) * SECTOR;
    blockLayers(dirname(sys), first + start, first + end, via, depth + 1, w);
    return;
  }
  if (existsSync(`${sys}/loop/backing_file`)) {
    const file = readTrim(`${sys}/loop/backing_file`);
    const offset = Number(readTrim(`${sys}/loop/offset`));
    const st = statSync(file, { throwIfNoEntry: false });
    if (st !== undefined) w.out.push({ key: `file:${st.dev}:${st.ino}`, what: file, start: offset + start, end: offset + end, ...(via !== undefined ? { via } : {}) });
    return;
  }
  if (dm) {
    dmLayers(key, devNo, start, end, via, depth, w);
    return;
  }
  if (existsSync(`${sys}/md`)) {
    for (const s of readdirSync(`${sys}/slaves`)) {
      const slave = realpathSync(`${sys}/slaves/${s}`);
      blockLayers(slave, 0, deviceBytes(slave), via, depth + 1, w);
    }
  }
}

/** Adds what the table of dm device `devNo` maps bytes [start, end) of it to; nothing when the table cannot be read. */
function dmLayers(key: string, devNo: string, start: number, end: number, via: string | undefined, depth: number, w: Walk): void {
  const [major, minor] = devNo.split(':').map(Number);
  const text = w.readDmTable(major, minor);
  if (text === null) return;
  let table: DmSegment[];
  try {
    table = parseDmTable(text);
  } catch {
    return; // not a table we can read: not descended (as without dmsetup)
  }
  for (const seg of table) {
    const segStart = seg.start * SECTOR;
    const s = Math.max(start, segStart);
    const e = Math.min(end, segStart + seg.length * SECTOR);
    if (s >= e) continue;
    for (const m of seg.maps) {
      const below = argDir(m.dev, w.sysRoot);
      if (below === null) continue;
      if (m.kind === 'whole') {
        blockLayers(below, 0, deviceBytes(below), m.log === true ? (via ?? key) : via, depth + 1, w);
      } else {
        const at = m.offset * SECTOR + (s - segStart);
        blockLayers(below, at, at + (e - s), via, depth + 1, w);
      }
    }
  }
}

/** A table reader that asks once per device. */
function memo(read: (major: number, minor: number) => string | null): (major: number, minor: number) => string | null {
  const cache = new Map<string, string | null>();
  return (major, minor) => {
    const k = `${major}:${minor}`;
    if (!cache.has(k)) cache.set(k, read(major, minor));
    return cache.get(k) ?? null;
  };
}

function walk(o: StackOptions): Walk {
  return { sysRoot: o.sysRoot ?? '/sys', readDmTable: memo(o.readDmTable ?? dmsetupTable), out: [], seen: new Set() };
}

/**
 * The layers of block device MAJ:MIN (a string such as "253:0"), the whole
 * of it, most specific first; what was found before a layer that cannot be
 * read.
 */
export function deviceLayers(devNo: string, o: StackOptions = {}): StorageLayer[] {
  const w = walk(o);
  try {
    const sys = realpathSync(`${w.sysRoot}/dev/block/${devNo}`);
    blockLayers(sys, 0, deviceBytes(sys), undefined, 0, w);
  } catch {
    // what was found so far is all we know
  }
  return w.out;
}

/**
 * The layers of `path` (a file or block device), most specific first (the
 * device or file itself, then depth first). Empty when the path cannot be
 * examined (missing: the open reports that); a layer that cannot be read
 * ends that branch there.
 */
export function storageLayers(path: string, o: StackOptions = {}): StorageLayer[] {
  const w = walk(o);
  try {
    const st = statSync(path);
    if (st.isBlockDevice()) {
      const sys = sysfsDir(st.rdev, w.sysRoot);
      blockLayers(sys, 0, deviceBytes(sys), undefined, 0, w);
    } else if (st.isFile()) {
      w.out.push({ key: `file:${st.dev}:${st.ino}`, what: path, start: 0, end: st.size });
    }
  } catch {
    // what was found so far is all we know
  }
  return w.out;
}

/** Where two paths share storage: the layer and the byte range each uses on it. */
export interface StackOverlap {
  layer: string;
  a: [number, number];
  b: [number, number];
  /** Both paths are the very same device or file (their first layers). */
  sameDevice: boolean;
}

/**
 * Where layer sets `la` and `lb` share storage (the first such range of
 * `lb`, which is the most specific one), or null. Ranges reached only as
 * the log of the same dm-log-writes device (equal `via`) do not clash.
 */
export function layersOverlap(la: StorageLayer[], lb: StorageLayer[]): StackOverlap | null {
  if (la.length === 0 || lb.length === 0) return null;
  for (const x of lb) {
    const y = la.find((l) => l.key === x.key && x.start < l.end && l.start < x.end && !(x.via !== undefined && x.via === l.via));
    if (y === undefined) continue;
    return { layer: x.what, a: [y.start, y.end], b: [x.start, x.end], sameDevice: la[0].key === lb[0].key };
  }
  return null;
}

/** Whether `a` and `b` share storage on some layer (the most specific one of `b` is reported), or null. */
export function stackOverlap(a: string, b: string, o: StackOptions = {}): StackOverlap | null {
  const shared = { ...o, readDmTable: memo(o.readDmTable ?? dmsetupTable) };
  return layersOverlap(storageLayers(a, shared), storageLayers(b, shared));
}
