/**
 * Openers of a kernel block device served by the daemon (/dev/ublkbN,
 * /dev/nbdN): who would be left with a dead device, or would make ublk's
 * DEL_DEV wait, if it were removed now. `remapctl remove` refuses a device
 * that has any (docs/OPERATION.md "Openers"), naming them, unless --force.
 *
 * Sources, for the device and its partitions:
 *  - mounts: the mountinfo of every mount namespace (/proc/self/mountinfo
 *    for ours, so that paths are seen from our root; /proc/PID/mountinfo of
 *    one PID per other namespace), matched on the major:minor field;
 *  - open file descriptors: /proc/PID/fd/N whose target is a block device
 *    node with the same device number (only targets under /dev/ are
 *    stat()ed, so a hung FUSE or network file is never touched);
 *  - stacked devices: /sys/block/X/holders (device-mapper, md, ...);
 *  - swap: /proc/swaps.
 */
import { readFile, readdir, readlink, stat } from 'node:fs/promises';
import { basename } from 'node:path';

export interface Opener {
  /** The device or partition held, e.g. '/dev/ublkb0p1'. */
  device: string;
  kind: 'mount' | 'fd' | 'holder' | 'swap';
  /** The process (fd: the holder; mount in another namespace: one process of it); null when none applies. */
  pid: number | null;
  comm: string | null;
  /** Human detail: the mount point, the fd, the holder's name. */
  detail: string;
}

export interface MountEntry {
  major: number;
  minor: number;
  mountPoint: string;
  fsType: string;
  source: string;
}

/** Decodes the octal escapes of mountinfo and /proc/swaps (\040 space, \011 tab, \012 newline, \134 backslash). */
export function unescapeProc(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_m, o: string) => String.fromCharCode(parseInt(o, 8)));
}

/**
 * Parses /proc/PID/mountinfo: `id parent major:minor root mountpoint options
 * [optional fields...] - fstype source superoptions`. Malformed lines are
 * skipped.
 */
export function parseMountinfo(text: string): MountEntry[] {
  const out: MountEntry[] = [];
  for (const line of text.split('\n')) {
    if (line === '') continue;
    const f = line.split(' ');
    if (f.length < 7) continue;
    const mm = /^(\d{1,10}):(\d{1,10})$/.exec(f[2]);
    if (mm === null) continue;
    const sep = f.indexOf('-', 6);
    if (sep < 0 || sep + 2 >= f.length) continue;
    out.push({ major: Number(mm[1]), minor: Number(mm[2]), mountPoint: unescapeProc(f[4]), fsType: f[sep + 1], source: unescapeProc(f[sep + 2]) });
  }
  return out;
}

/** Parses a sysfs `dev` file ("MAJOR:MINOR\n"); null when malformed. */
export function parseDevNumber(text: string): { major: number; minor: number } | null {
  const m = /^(\d{1,10}):(\d{1,10})\s*$/.exec(text);
  return m === null ? null : { major: Number(m[1]), minor: Number(m[2]) };
}

/** The paths listed in /proc/swaps (header skipped). */
export function parseSwaps(text: string): string[] {
  return text.split('\n').slice(1).map((l) => l.split(/[ \t]+/)[0]).filter((p) => p !== '').map(unescapeProc);
}

/** Linux's encoding of a dev_t (glibc gnu_dev_major/minor). */
function devOf(rdev: bigint): { major: number; minor: number } {
  return {
    major: Number(((rdev >> 8n) & 0xfffn) | ((rdev >> 32n) & ~0xfffn)),
    minor: Number((rdev & 0xffn) | ((rdev >> 12n) & ~0xffn)),
  };
}

export interface FindOpenersOptions {
  /** /proc (tests point it elsewhere). */
  procRoot?: string;
  /** /sys (tests point it elsewhere). */
  sysRoot?: string;
  /** Pids never reported as fd holders (default: this process). */
  ignorePids?: number[];
}

interface Target {
  device: string;
  /** Its sysfs folder (a partition's is inside its disk's). */
  sysDir: string;
  major: number;
  minor: number;
}

async function tryRead(path: string): Promise<string | null> {
  try {
    return await readFile(path, 'utf8');
  } catch {
    return null;
  }
}

async function tryDir(path: string): Promise<string[]> {
  try {
    return await readdir(path);
  } catch {
    return [];
  }
}

/** The device and its partitions as sysfs knows them. */
async function targetsOf(device: string, sys: string): Promise<Target[]> {
  const name = basename(device);
  const out: Target[] = [];
  const top = parseDevNumber((await tryRead(`${sys}/block/${name}/dev`)) ?? '');
  if (top === null) return out;
  out.push({ device: `/dev/${name}`, sysDir: `${sys}/block/${name}`, ...top });
  for (const sub of await tryDir(`${sys}/block/${name}`)) {
    if (!sub.startsWith(name)) continue;
    const d = parseDevNumber((await tryRead(`${sys}/block/${name}/${sub}/dev`)) ?? '');
    if (d !== null) out.push({ device: `/dev/${sub}`, sysDir: `${sys}/block/${name}/${sub}`, ...d });
  }
  return out;
}

/**
 * Everything holding `devices` (e.g. ['/dev/ublkb0']) or their partitions.
 * Best effort: unreadable /proc entries (processes that exit meanwhile) are
 * skipped.
 */
export async function findOpeners(devices: string[], o: FindOpenersOptions = {}): Promise<Opener[]> {
  const proc = o.procRoot ?? '/proc';
  const sys = o.sysRoot ?? '/sys';
  const ignore = new Set(o.ignorePids ?? [process.pid]);
  const targets = (await Promise.all(devices.map((d) => targetsOf(d, sys)))).flat();
  if (targets.length === 0) return [];
  const byDev = (major: number, minor: number): Target | undefined => targets.find((t) => t.major === major && t.minor === minor);
  const out: Opener[] = [];

  for (const t of targets) {
    for (const h of await tryDir(`${t.sysDir}/holders`)) {
      const dmName = (await tryRead(`${sys}/block/${h}/dm/name`))?.trim();
      out.push({ device: t.device, kind: 'holder', pid: null, comm: null, detail: `held by ${h}${dmName ? ` (device-mapper ${dmName})` : ''}` });
    }
  }

  const swaps = await tryRead(`${proc}/swaps`);
  for (const p of swaps === null ? [] : parseSwaps(swaps)) {
    try {
      const st = await stat(p, { bigint: true });
      const d = devOf(st.rdev);
      const t = st.isBlockDevice() ? byDev(d.major, d.minor) : undefined;
      if (t !== undefined) out.push({ device: t.device, kind: 'swap', pid: null, comm: null, detail: `swap on ${p}` });
    } catch {
      // a swap file that vanished
    }
  }

  const pids = (await tryDir(proc)).filter((p) => /^\d+$/.test(p)).map(Number).sort((a, b) => a - b);
  const comms = new Map<number, string | null>();
  const commOf = async (pid: number): Promise<string | null> => {
    if (!comms.has(pid)) comms.set(pid, (await tryRead(`${proc}/${pid}/comm`))?.trim() ?? null);
    return comms.get(pid) ?? null;
  };
  let ownNs: string | null = null;
  try {
    ownNs = await readlink(`${proc}/self/ns/mnt`);
  } catch {
    ownNs = null;
  }
  const seenNs = new Set<string>();
  // Our own namespace through our own eyes: mount points relative to our root (a chroot), not pid 1's.
  if (ownNs !== null) {
    seenNs.add(ownNs);
    const mi = await tryRead(`${proc}/self/mountinfo`);
    for (const m of mi === null ? [] : parseMountinfo(mi)) {
      const t = byDev(m.major, m.minor);
      if (t !== undefined) out.push({ device: t.device, kind: 'mount', pid: null, comm: null, detail: `mounted at ${m.mountPoint} (${m.fsType})` });
    }
  }
  for (const pid of pids) {
    // mounts, once per mount namespace
    let ns: string | null;
    try {
      ns = await readlink(`${proc}/${pid}/ns/mnt`);
    } catch {
      ns = null;
    }
    const nsKey = ns ?? `pid:${pid}`;
    if (!seenNs.has(nsKey)) {
      seenNs.add(nsKey);
      const mi = await tryRead(`${proc}/${pid}/mountinfo`);
      for (const m of mi === null ? [] : parseMountinfo(mi)) {
        const t = byDev(m.major, m.minor);
        if (t === undefined) continue;
        const foreign = ns !== null && ns !== ownNs;
        out.push({
          device: t.device, kind: 'mount', pid, comm: await commOf(pid),
          detail: `mounted at ${m.mountPoint} (${m.fsType})${foreign ? ` in the mount namespace of pid ${pid} (${(await commOf(pid)) ?? '?'})` : ''}`,
        });
      }
    }
    // open file descriptors
    if (ignore.has(pid)) continue;
    for (const fd of await tryDir(`${proc}/${pid}/fd`)) {
      let target: string;
      try {
        target = await readlink(`${proc}/${pid}/fd/${fd}`);
      } catch {
        continue;
      }
      if (!target.startsWith('/dev/')) continue;
      try {
        const st = await stat(`${proc}/${pid}/fd/${fd}`, { bigint: true });
        if (!st.isBlockDevice()) continue;
        const d = devOf(st.rdev);
        const t = byDev(d.major, d.minor);
        if (t !== undefined) out.push({ device: t.device, kind: 'fd', pid, comm: await commOf(pid), detail: `open by pid ${pid} (${(await commOf(pid)) ?? '?'}) as fd ${fd}` });
      } catch {
        // the fd was closed meanwhile
      }
    }
  }
  return out;
}

/** One line naming every opener, e.g. "/dev/ublkb0 mounted at /mnt (ext4); /dev/ublkb0 open by pid 12 (fio) as fd 5". */
export function describeOpeners(list: Opener[]): string {
  return list.map((x) => `${x.device} ${x.detail}`).join('; ');
}

/** The kernel block devices among a device's exports ('/dev/ublkbN', '/dev/nbdN'). */
export function kernelDevices(exports: string[]): string[] {
  return exports.filter((e) => /^\/dev\/(ublkb|nbd)\d+$/.test(e));
}
