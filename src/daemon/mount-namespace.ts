/**
 * The ublk mount-namespace self-deadlock, and what the daemon does about it.
 *
 * A mount holds its block device open. If the daemon's own mount namespace
 * holds a mount of a device the daemon serves, that mount lives until the
 * daemon's last process exits, and the kernel releases it during that exit,
 * after the daemon has stopped serving: the release's writeback then waits
 * for a server that is gone (with USER_RECOVERY the requests are held for a
 * successor that, under systemd, is not started until the old process has
 * exited), and a device deletion the daemon itself waits for never finishes.
 * In the initial namespace every mount is the operator's, unmounted before
 * the daemon stops (the unit's ordering). A private namespace (`unshare -m`,
 * systemd's ProtectSystem=, PrivateTmp=, PrivateDevices=, ...) gets copies
 * of the mounts that existed when it was made, and, with slave propagation,
 * of later ones, which an unmount in the initial namespace may leave behind
 * when the copy is busy or was re-bound.
 *
 * So: systemd/dm-remapd.service uses no namespace-creating option, the
 * daemon warns at start when it finds itself in another mount namespace than
 * PID 1 (`mount-namespace-private`), and, only then, lazily unmounts the
 * copies of its own devices' mounts in its own namespace before it stops
 * them (`own-mount-detached`): in a private namespace these copies belong
 * to nobody else.
 */
import { spawn } from 'node:child_process';
import { readFileSync, readlinkSync } from 'node:fs';
import { join } from 'node:path';
import type { Logger } from 'pino';

export interface MountNamespaceVerdict {
  /** `mnt:[N]` of this process, null when unreadable. */
  self: string | null;
  /** `mnt:[N]` of PID 1 (of this PID namespace), null when unreadable. */
  init: string | null;
  /** true: the initial mount namespace; false: a private one; null: unknown (PID 1 not readable). */
  initial: boolean | null;
  /** Why `initial` is null. */
  reason?: string;
}

/** Compares /proc/self/ns/mnt with /proc/1/ns/mnt under `procRoot` ('/proc'). */
export function mountNamespaceVerdict(procRoot = '/proc'): MountNamespaceVerdict {
  const read = (pid: string): string | Error => {
    try {
      return readlinkSync(join(procRoot, pid, 'ns', 'mnt'));
    } catch (e) {
      return e as Error;
    }
  };
  const self = read('self');
  const init = read('1');
  const out: MountNamespaceVerdict = { self: typeof self === 'string' ? self : null, init: typeof init === 'string' ? init : null, initial: null };
  if (out.self !== null && out.init !== null) out.initial = out.self === out.init;
  else out.reason = [self, init].filter((x): x is Error => x instanceof Error).map((e) => e.message).join('; ');
  return out;
}

/** Logs the verdict: a warning for a private namespace, info otherwise. */
export function checkMountNamespace(log: Logger, procRoot = '/proc'): MountNamespaceVerdict {
  const v = mountNamespaceVerdict(procRoot);
  if (v.initial === false) {
    log.warn({ event: 'mount-namespace-private', mountNamespace: v.self, initMountNamespace: v.init },
      `dm-remapd runs in a private mount namespace (${v.self}, PID 1 has ${v.init}): a mount of one of its own ublk/nbd devices held by this `
      + 'namespace cannot be released while the daemon stops (the ublk self-deadlock). Run it in the initial mount namespace: no unshare -m, '
      + 'and no ProtectSystem=, ProtectHome=, PrivateTmp=, PrivateDevices=, PrivateMounts=, ReadOnlyPaths= or similar in its unit. '
      + 'At stop it lazily unmounts such copies in its own namespace first.');
  } else if (v.initial === true) {
    log.info({ event: 'mount-namespace', mountNamespace: v.self, initial: true }, `mount namespace ${v.self}: the initial one`);
  } else {
    log.info({ event: 'mount-namespace', mountNamespace: v.self, initial: null, reason: v.reason },
      `mount namespace ${v.self ?? '?'}: cannot compare with PID 1 (${v.reason ?? 'unknown'})`);
  }
  return v;
}

export interface MountEntry {
  mountId: number;
  parentId: number;
  major: number;
  minor: number;
  root: string;
  mountPoint: string;
  fsType: string;
  source: string;
}

/** Undoes mountinfo's octal escapes (\040 space, \011 tab, \012 newline, \134 backslash). */
function unescapeField(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

/**
 * Parses /proc/PID/mountinfo (proc(5)): `ID PARENT MAJ:MIN ROOT POINT
 * OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS`. Malformed lines are
 * skipped, never thrown on.
 */
export function parseMountinfo(text: string): MountEntry[] {
  const out: MountEntry[] = [];
  for (const line of text.split('\n')) {
    const f = line.split(' ');
    const sep = f.indexOf('-', 6);
    if (f.length < 10 || sep < 6 || sep + 2 >= f.length) continue;
    const dev = /^(\d{1,10}):(\d{1,10})$/.exec(f[2]);
    if (!/^\d{1,10}$/.test(f[0]) || !/^\d{1,10}$/.test(f[1]) || dev === null) continue;
    out.push({
      mountId: Number(f[0]), parentId: Number(f[1]), major: Number(dev[1]), minor: Number(dev[2]),
      root: unescapeField(f[3]), mountPoint: unescapeField(f[4]), fsType: f[sep + 1], source: unescapeField(f[sep + 2]),
    });
  }
  return out;
}

/** MAJ:MIN of a disk from `<sysBlockDir>/<kernel name>/dev`, null when it has none. */
function devNumber(sysBlockDir: string, kname: string): { major: number; minor: number } | null {
  try {
    const m = /^(\d+):(\d+)\s*$/.exec(readFileSync(join(sysBlockDir, kname, 'dev'), 'utf8'));
    return m === null ? null : { major: Number(m[1]), minor: Number(m[2]) };
  } catch {
    return null;
  }
}

/** Partitions count too: a disk's partitions are listed under its sysfs folder. */
function devNumbers(sysBlockDir: string, kname: string): Array<{ major: number; minor: number }> {
  const out: Array<{ major: number; minor: number }> = [];
  const disk = devNumber(sysBlockDir, kname);
  if (disk !== null) out.push(disk);
  for (let i = 1; i <= 64; i++) {
    const part = devNumber(join(sysBlockDir, kname), `${kname}p${i}`);
    if (part !== null) out.push(part);
  }
  return out;
}

function umountLazy(point: string, timeoutMs: number): Promise<{ code: number | null; stderr: string }> {
  return new Promise((resolve) => {
    // Asynchronous on purpose: the unmount's writeback is served by this process's event loop.
    const p = spawn('umount', ['-l', '--', point], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    p.stderr.setEncoding('utf8').on('data', (c: string) => { stderr += c; });
    const timer = setTimeout(() => p.kill('SIGKILL'), timeoutMs);
    p.on('error', (e) => { clearTimeout(timer); resolve({ code: null, stderr: e.message }); });
    p.on('close', (code) => { clearTimeout(timer); resolve({ code, stderr: stderr.trim() }); });
  });
}

/**
 * Lazily unmounts, in this process's mount namespace, every mount of the
 * given kernel devices (/dev/ublkbN, /dev/nbdN, and their partitions),
 * deepest first. Call it only in a private namespace. Returns the mount
 * points it detached.
 */
export async function detachOwnMounts(devices: readonly string[], log: Logger,
  o: { procRoot?: string; sysBlockDir?: string; timeoutMs?: number } = {}): Promise<string[]> {
  const sysBlockDir = o.sysBlockDir ?? '/sys/block';
  const wanted = new Map<string, string>();
  for (const d of devices) {
    const kname = d.replace(/^\/dev\//, '');
    for (const n of devNumbers(sysBlockDir, kname)) wanted.set(`${n.major}:${n.minor}`, d);
  }
  if (wanted.size === 0) return [];
  let mounts: MountEntry[];
  try {
    mounts = parseMountinfo(readFileSync(join(o.procRoot ?? '/proc', 'self', 'mountinfo'), 'utf8'));
  } catch {
    return [];
  }
  const ours = mounts.filter((m) => wanted.has(`${m.major}:${m.minor}`))
    .sort((a, b) => b.mountPoint.split('/').length - a.mountPoint.split('/').length);
  const done: string[] = [];
  for (const m of ours) {
    const device = wanted.get(`${m.major}:${m.minor}`);
    const r = await umountLazy(m.mountPoint, o.timeoutMs ?? 5000);
    if (r.code === 0) {
      done.push(m.mountPoint);
      log.warn({ event: 'own-mount-detached', kernelDevice: device, mountPoint: m.mountPoint },
        `detached ${m.mountPoint} (${device}) from this daemon's private mount namespace before stopping the device`);
    } else {
      log.error({ event: 'own-mount-detach-failed', kernelDevice: device, mountPoint: m.mountPoint, code: r.code, stderr: r.stderr },
        `cannot detach ${m.mountPoint} (${device}) in this daemon's mount namespace: ${r.stderr || `exit ${r.code}`}`);
    }
  }
  return done;
}
