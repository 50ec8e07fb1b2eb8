/**
 * Where a file or block device keeps its bytes, down through the block
 * stack as sysfs describes it, so that two paths sharing storage are caught
 * even when they are different devices: a partition and its whole disk
 * (/dev/loop0 and /dev/loop0p2, /dev/sda and /dev/sda1), a loop device (or
 * one of its partitions) and the image file behind it.
 *
 * Each path maps to a chain of byte ranges, one per layer, from the device
 * itself down: a partition adds its parent disk at `start` (sysfs
 * `partition`, `start`, `size`, in 512-byte sectors), a loop device adds its
 * backing file at `loop/offset` (`loop/backing_file`), a regular file is its
 * own inode. Two paths overlap when some layer appears in both chains with
 * intersecting ranges.
 *
 * Not descended: dm and md devices. Sysfs lists their `slaves` but not the
 * mapping (which part of a slave a dm-linear segment uses), and two dm-linear
 * devices over disjoint parts of one disk are a legitimate main and spare.
 * A dm/md device does hold its slaves exclusively, so a main or spare on a
 * slave of a stack is refused by the O_EXCL open (EBUSY).
 */
import { existsSync, readFileSync, realpathSync, statSync } from 'node:fs';
import { basename, dirname } from 'node:path';

/** One layer of where a path keeps its bytes. */
export interface StorageLayer {
  /** Identity of the layer: `block:MAJ:MIN` or `file:DEV:INO`. */
  key: string;
  /** What to call it in a message: /dev/NAME or the file path. */
  what: string;
  /** Byte range used on that layer, [start, end). */
  start: number;
  end: number;
}

const SECTOR = 512;

function readTrim(p: string): string {
  return readFileSync(p, 'utf8').trim();
}

/** The sysfs folder of device number `rdev` (glibc's dev_t encoding, as Node's stat gives it). */
function sysfsDir(rdev: number, sysRoot: string): string {
  const major = Math.floor(rdev / 256) & 0xfff;
  const minor = (rdev & 0xff) | (Math.floor(rdev / 4096) & 0xfff00);
  return realpathSync(`${sysRoot}/dev/block/${major}:${minor}`);
}

/** The layers of the block device whose sysfs folder is `sys`, for bytes [start, end) of it. */
function blockLayers(sys: string, start: number, end: number, out: StorageLayer[], depth: number): void {
  if (depth > 8) return; // sysfs is a tree: this only guards against a surprise
  const name = basename(sys);
  out.push({ key: `block:${readTrim(`${sys}/dev`)}`, what: `/dev/${name}`, start, end });
  if (existsSync(`${sys}/partition`)) {
    const first = Number(readTrim(`${sys}/start`)) * SECTOR;
    blockLayers(dirname(sys), first + start, first + end, out, depth + 1);
    return;
  }
  if (existsSync(`${sys}/loop/backing_file`)) {
    const file = readTrim(`${sys}/loop/backing_file`);
    const offset = Number(readTrim(`${sys}/loop/offset`));
    const st = statSync(file, { throwIfNoEntry: false });
    if (st !== undefined) out.push({ key: `file:${st.dev}:${st.ino}`, what: file, start: offset + start, end: offset + end });
  }
}

/**
 * The layers of `path` (a file or block device), most specific first. Empty
 * when the path cannot be examined (missing: the open reports that); a
 * layer that cannot be read ends the chain there.
 */
export function storageLayers(path: string, sysRoot = '/sys'): StorageLayer[] {
  const out: StorageLayer[] = [];
  try {
    const st = statSync(path);
    if (st.isBlockDevice()) {
      const sys = sysfsDir(st.rdev, sysRoot);
      const size = Number(readTrim(`${sys}/size`)) * SECTOR;
      blockLayers(sys, 0, size, out, 0);
    } else if (st.isFile()) {
      out.push({ key: `file:${st.dev}:${st.ino}`, what: path, start: 0, end: st.size });
    }
  } catch {
    // what was found so far is all we know
  }
  return out;
}

/** Where two paths share storage: the layer and the byte range each uses on it. */
export interface StackOverlap {
  layer: string;
  a: [number, number];
  b: [number, number];
  /** Both paths are the very same device or file (their first layers). */
  sameDevice: boolean;
}

/** Whether `a` and `b` share storage on some layer (the most specific one of `b` is reported), or null. */
export function stackOverlap(a: string, b: string, sysRoot = '/sys'): StackOverlap | null {
  const la = storageLayers(a, sysRoot);
  const lb = storageLayers(b, sysRoot);
  for (const x of lb) {
    const y = la.find((l) => l.key === x.key);
    if (y === undefined || !(x.start < y.end && y.start < x.end)) continue;
    return { layer: x.what, a: [y.start, y.end], b: [x.start, x.end], sameDevice: la[0].key === lb[0].key };
  }
  return null;
}
