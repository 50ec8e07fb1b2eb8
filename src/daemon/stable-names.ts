/**
 * Stable names: `/dev/disk/by-remap/NAME` for the kernel block device of a
 * dm-remapd device (/dev/ublkbN, /dev/nbdN), whose number the kernel picks.
 *
 * The daemon owns these links, so they exist with or without udev (early
 * boot, containers, the test guest): it makes a device's link once the device
 * runs, takes it away when its removal begins, and at start drops the links
 * a previous run left behind (a crash, a device removed meanwhile) and fixes
 * links that point elsewhere.
 *
 * systemd only knows a link as a `.device` unit (which an fstab mount waits
 * for) when udev made it. So, for udev, the daemon also writes
 * `<udevDir>/<kernel name>` holding `DM_REMAPD_NAME=NAME` and asks the kernel
 * for a `change` uevent of the disk; udev/99-dm-remapd.rules imports that
 * file and adds the same symlink to udev's database. Both writers make the
 * same link atomically (a temporary link renamed over it).
 */
import { type Stats, chmodSync, existsSync, lstatSync, mkdirSync, readFileSync, statSync, readdirSync, readlinkSync, renameSync, symlinkSync, unlinkSync, writeFileSync } from 'node:fs';
import { basename, dirname, join, relative, resolve } from 'node:path';
import type { Logger } from 'pino';
import type { DeviceManager } from './devices.js';
import { errorBody } from './protocol.js';

export const BY_REMAP_DIR = '/dev/disk/by-remap';
export const UDEV_NAMES_DIR = '/run/dm-remapd/udev';

/** Kernel names of the block devices dm-remapd serves: ublkbN, nbdN. */
const KERNEL_NAME = /^(?:ublkb|nbd)\d{1,7}$/;
/** Device names that are safe as one path component and in a udev property file. */
const LINK_NAME = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$/;

/** The kernel block device among a device's export endpoints: /dev/ublkbN first, then /dev/nbdN; null when it has none. */
export function kernelDeviceOf(endpoints: readonly string[]): string | null {
  return endpoints.find((e) => /^\/dev\/ublkb\d{1,7}$/.test(e)) ?? endpoints.find((e) => /^\/dev\/nbd\d{1,7}$/.test(e)) ?? null;
}

export interface StableNamesOptions {
  /** The links' folder (BY_REMAP_DIR). */
  linkDir: string;
  /** The folder of udev's per-disk name files (UDEV_NAMES_DIR); null: none. */
  udevDir: string | null;
  /** Where `<kernel name>/uevent` lives ('/sys/block'). */
  sysBlockDir?: string;
  logger: Logger;
}

export interface LinkEntry {
  name: string;
  /** Absolute path of the kernel device, e.g. /dev/ublkb0. */
  device: string;
}

function code(e: unknown): string | undefined {
  return (e as NodeJS.ErrnoException).code;
}

/** lstat that answers null for a missing path. */
function lstatOrNull(p: string): Stats | null {
  try {
    return lstatSync(p);
  } catch (e) {
    if (code(e) === 'ENOENT') return null;
    throw e;
  }
}

/**
 * `mkdir -p` whose new folders are 0755 whatever the umask (the unit's is
 * 0077): users may list /dev/disk/by-remap, as they may /dev/disk/by-id.
 */
function ensureDir(dir: string): void {
  let st: Stats | null = null;
  try {
    st = statSync(dir);
  } catch (e) {
    if (code(e) !== 'ENOENT') throw e;
  }
  if (st !== null) {
    if (!st.isDirectory()) throw Object.assign(new Error(`ENOTDIR: ${dir} is not a folder`), { code: 'ENOTDIR' });
    return;
  }
  const parent = dirname(dir);
  if (parent !== dir) ensureDir(parent);
  try {
    mkdirSync(dir);
  } catch (e) {
    if (code(e) !== 'EEXIST') throw e;
    return;
  }
  chmodSync(dir, 0o755);
}

/**
 * Makes, removes and reconciles the links. Every call is synchronous (a few
 * local file operations), so a link exists when `remapctl add` answers and
 * is gone before a removal stops the device. Failures are logged
 * (`stable-name-failed`) and never fail the device.
 */
export class StableNames {
  private readonly sysBlockDir: string;
  private readonly log: Logger;
  /** Links made by this daemon: name -> device. */
  private readonly linked = new Map<string, string>();

  constructor(private readonly o: StableNamesOptions) {
    this.sysBlockDir = o.sysBlockDir ?? '/sys/block';
    this.log = o.logger;
  }

  get linkDir(): string {
    return this.o.linkDir;
  }

  /** The path of NAME's link. */
  pathOf(name: string): string {
    return join(this.o.linkDir, name);
  }

  /** The link of NAME -> device, made or fixed; the udev name file; a change uevent. False when it could not be made (logged). */
  link(name: string, device: string): boolean {
    const kname = basename(device);
    if (!LINK_NAME.test(name) || !KERNEL_NAME.test(kname)) {
      this.log.warn({ event: 'stable-name-failed', device: name, kernelDevice: device }, `no stable name for ${name}: "${name}" or "${device}" is not a name this daemon links`);
      return false;
    }
    const path = this.pathOf(name);
    try {
      ensureDir(this.o.linkDir);
      const target = relative(this.o.linkDir, device);
      const st = lstatOrNull(path);
      if (st !== null && !st.isSymbolicLink()) {
        // Not ours (an operator's file or folder): never clobber it.
        this.log.warn({ event: 'stable-name-failed', device: name, path, kernelDevice: device },
          `no stable name for ${name}: ${path} exists and is not a symlink; remove it`);
        return false;
      }
      if (st === null || readlinkSync(path) !== target) {
        const tmp = join(this.o.linkDir, `.${name}.dm-remapd-${process.pid}`);
        if (lstatOrNull(tmp) !== null) unlinkSync(tmp);
        symlinkSync(target, tmp);
        renameSync(tmp, path);
      }
      this.linked.set(name, device);
    } catch (err) {
      this.log.warn({ event: 'stable-name-failed', device: name, path, kernelDevice: device, error: errorBody(err) },
        `cannot link ${path} -> ${device}: ${(err as Error).message}`);
      return false;
    }
    this.writeUdevName(name, kname);
    this.log.info({ event: 'stable-name', device: name, path, kernelDevice: device }, `${path} -> ${device}`);
    return true;
  }

  /** Removes NAME's link if it points to `device` (any other target is left alone), its udev name file, and sends a change uevent. */
  unlink(name: string, device: string): void {
    const kname = basename(device);
    this.linked.delete(name);
    if (KERNEL_NAME.test(kname)) this.removeUdevName(kname, name);
    const path = this.pathOf(name);
    try {
      const st = lstatOrNull(path);
      if (st !== null && st.isSymbolicLink() && resolve(this.o.linkDir, readlinkSync(path)) === resolve(device)) {
        unlinkSync(path);
        this.log.info({ event: 'stable-name-removed', device: name, path, kernelDevice: device }, `${path} removed`);
      }
    } catch (err) {
      if (code(err) !== 'ENOENT') {
        this.log.warn({ event: 'stable-name-failed', device: name, path, kernelDevice: device, error: errorBody(err) },
          `cannot remove ${path}: ${(err as Error).message}`);
      }
    }
    if (KERNEL_NAME.test(kname)) this.changeUevent(kname);
  }

  /**
   * Makes the links of `current` and removes every other link of this
   * daemon's kind (a symlink to a ublkbN or nbdN) from the folder, and every
   * other udev name file. Anything else in the folder is left alone.
   * Returns what it did.
   */
  reconcile(current: readonly LinkEntry[]): { linked: string[]; removed: string[] } {
    const want = new Map(current.map((c) => [c.name, resolve(c.device)]));
    const removed: string[] = [];
    let entries: string[] = [];
    try {
      entries = readdirSync(this.o.linkDir);
    } catch (err) {
      if (code(err) !== 'ENOENT') {
        this.log.warn({ event: 'stable-name-failed', path: this.o.linkDir, error: errorBody(err) }, `cannot read ${this.o.linkDir}: ${(err as Error).message}`);
      }
    }
    for (const entry of entries) {
      const path = join(this.o.linkDir, entry);
      try {
        const st = lstatOrNull(path);
        if (st === null || !st.isSymbolicLink()) continue;
        const target = resolve(this.o.linkDir, readlinkSync(path));
        const leftover = entry.startsWith('.') && entry.includes('.dm-remapd-');
        // A current device's link is fixed by link() below, atomically (never missing meanwhile).
        if (!leftover && (!KERNEL_NAME.test(basename(target)) || want.has(entry))) continue;
        unlinkSync(path);
        if (!leftover) removed.push(entry);
        this.log.info({ event: 'stable-name-removed', device: leftover ? undefined : entry, path, kernelDevice: target, stale: true },
          `${path} removed (stale: -> ${target})`);
      } catch (err) {
        this.log.warn({ event: 'stable-name-failed', path, error: errorBody(err) }, `cannot check ${path}: ${(err as Error).message}`);
      }
    }
    if (this.o.udevDir !== null) {
      const knames = new Set(current.map((c) => basename(c.device)));
      let files: string[] = [];
      try {
        files = readdirSync(this.o.udevDir);
      } catch {
        files = [];
      }
      for (const f of files) {
        const tmp = /^(?:ublkb|nbd)\d{1,7}\.tmp-\d+$/.test(f); // a crash between write and rename
        if (!tmp && (!KERNEL_NAME.test(f) || knames.has(f))) continue;
        try {
          unlinkSync(join(this.o.udevDir, f));
        } catch {
          // gone meanwhile
        }
        if (!tmp) this.changeUevent(f);
      }
    }
    const linked: string[] = [];
    for (const c of current) if (this.link(c.name, c.device)) linked.push(c.name);
    return { linked, removed };
  }

  /** Links made by this daemon and not removed since. */
  links(): LinkEntry[] {
    return [...this.linked].map(([name, device]) => ({ name, device }));
  }

  private writeUdevName(name: string, kname: string): void {
    if (this.o.udevDir === null) return;
    const file = join(this.o.udevDir, kname);
    try {
      ensureDir(this.o.udevDir);
      const tmp = `${file}.tmp-${process.pid}`;
      writeFileSync(tmp, `DM_REMAPD_NAME=${name}\n`, { mode: 0o644 });
      renameSync(tmp, file);
    } catch (err) {
      this.log.warn({ event: 'stable-name-failed', device: name, path: file, error: errorBody(err) }, `cannot write ${file}: ${(err as Error).message}`);
      return;
    }
    this.changeUevent(kname);
  }

  private removeUdevName(kname: string, name: string): void {
    if (this.o.udevDir === null) return;
    const file = join(this.o.udevDir, kname);
    try {
      // Only this device's file: the kernel name may already serve another device.
      if (readFileSync(file, 'utf8') === `DM_REMAPD_NAME=${name}\n`) unlinkSync(file);
    } catch {
      // no file
    }
  }

  /**
   * Asks the kernel for a `change` uevent of the disk and of its partitions
   * (scanned before the name file existed), so that udev runs its rules
   * again. Without sysfs, or the disk gone: nothing.
   */
  private changeUevent(kname: string): void {
    const dir = join(this.sysBlockDir, kname);
    let parts: string[] = [];
    try {
      parts = readdirSync(dir).filter((p) => p.startsWith(`${kname}p`) && /^\d+$/.test(p.slice(kname.length + 1)));
    } catch {
      parts = [];
    }
    for (const file of [join(dir, 'uevent'), ...parts.map((p) => join(dir, p, 'uevent'))]) {
      try {
        writeFileSync(file, 'change');
      } catch (err) {
        if (code(err) !== 'ENOENT') this.log.debug({ event: 'uevent-failed', path: file, error: errorBody(err) }, `cannot write ${file}`);
      }
    }
  }
}

export interface StableNamesHandle {
  /** After reassembly: links the running devices, drops stale links. */
  reconcile(): void;
  /** Before the daemon stops its devices: their links wait for stopped(). */
  stopping(): void;
  /**
   * After the daemon stopped its devices: a ublk disk that still exists (kept,
   * quiesced, for the next daemon to recover: docs/UBLK.md) keeps its link
   * and udev name, so that its name never disappears under a mounted
   * filesystem during a restart; every other link goes.
   */
  stopped(): void;
}

/**
 * Keeps the links in step with `mgr`'s devices: made when a device runs,
 * removed when its removal begins (at daemon stop: see stopped()). Call
 * reconcile() once the remembered devices are reassembled.
 */
export function attachStableNames(mgr: DeviceManager, names: StableNames, sysBlockDir = '/sys/block'): StableNamesHandle {
  let stopping = false;
  mgr.onDevice((ev) => {
    if (ev.type === 'running') {
      const device = kernelDeviceOf(mgr.status(ev.name).exports);
      if (device !== null) names.link(ev.name, device);
    } else if (!stopping) {
      const made = names.links().find((l) => l.name === ev.name);
      if (made !== undefined) names.unlink(ev.name, made.device);
    }
  });
  return {
    stopping(): void {
      stopping = true;
    },
    stopped(): void {
      for (const l of names.links()) {
        const kname = basename(l.device);
        if (kname.startsWith('ublkb') && existsSync(join(sysBlockDir, kname))) {
          mgr.logger.info({ event: 'stable-name-kept', device: l.name, path: names.pathOf(l.name), kernelDevice: l.device },
            `${names.pathOf(l.name)} kept: ${l.device} stays for the next daemon`);
        } else {
          names.unlink(l.name, l.device);
        }
      }
    },
    reconcile(): void {
      const current: LinkEntry[] = [];
      for (const s of mgr.list()) {
        if (s.state === 'stopping' || s.state === 'starting') continue;
        const device = kernelDeviceOf(s.exports);
        if (device !== null) current.push({ name: s.name, device });
      }
      const r = names.reconcile(current);
      mgr.logger.info({ event: 'stable-names', dir: names.linkDir, linked: r.linked, removed: r.removed },
        `stable names in ${names.linkDir}: ${r.linked.length} linked, ${r.removed.length} stale removed`);
    },
  };
}
