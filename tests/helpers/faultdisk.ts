/**
 * A real fault-injecting disk for tests.
 *
 * An nbdkit server running our python plugin (faultdisk_plugin.py) serves a
 * backing image; nbdfuse exposes it as a regular file that the code under
 * test can open with O_DIRECT and drive with io_uring. The plugin fails
 * requests overlapping chosen byte ranges with EIO, can block requests
 * (a hung disk), can be SIGKILLed (a vanished disk), and counts requests.
 *
 *   nbdkit -f --exit-with-parent -U NBD.sock python faultdisk_plugin.py \
 *       file=IMG size=N control=JSON socket=CTL.sock
 *   nbdfuse -C 1 MNT/NAME --unix NBD.sock
 *
 * Both are children of the test process (nbdkit is not nbdfuse's child: when
 * nbdkit is killed and nbdfuse then dies, nobody would reap it).
 *
 * Faults are described in a JSON control file (replaced atomically); the
 * plugin stats it on every request and re-reads it when it changes, and the
 * helper additionally asks the plugin to reload over its control socket so
 * that setBad()/setHang() have taken effect when their promise resolves.
 *
 * Facts measured on this machine (nbdkit 1.32.5, libnbd/nbdfuse 1.14.2):
 * - a request overlapping a bad range fails with EIO for the reader/writer
 *   of the FUSE file (O_DIRECT dd and preadv/pwritev alike);
 * - nbdfuse sends a new request only when a reply arrives, so requests are
 *   only partly concurrent and a blocked request (setHang) stalls all later
 *   I/O on the file, whatever the hang mode;
 * - after kill(), the next I/O fails with ECONNABORTED, nbdfuse itself then
 *   dies (an assertion in libnbd's completion path) and from then on open()
 *   and I/O fail with ENOTCONN until stop() unmounts.
 */
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, existsSync, openSync, readFileSync, rmSync, statSync, accessSync, constants as fsConstants } from 'node:fs';
import * as fs from 'node:fs/promises';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

/**
 * The folder of this module's sources. Compiled copies (dist/tests/helpers,
 * used by the demo) have no .py files beside them: use the sources then.
 */
const HERE = ((): string => {
  const here = path.dirname(fileURLToPath(import.meta.url));
  if (existsSync(path.join(here, 'faultdisk_plugin.py'))) return here;
  return path.resolve(here, '../../../tests/helpers');
})();
/** The nbdkit python plugin script. */
export const PLUGIN_PATH = path.join(HERE, 'faultdisk_plugin.py');
/** A python script doing one aligned O_DIRECT read or write, reporting the errno name. */
export const DIO_PROBE_PATH = path.join(HERE, 'dio_probe.py');
/** Debian's python3 (has the libnbd bindings; the first python3 on PATH may not). */
export const SYSTEM_PYTHON = '/usr/bin/python3';

export type ByteRange = [offset: number, length: number];

export interface FaultDiskOptions {
  /** Work directory: the mount point, control file, socket and (default) image go here. */
  dir: string;
  /** Base name for the files in dir and of the exposed file; default "disk". */
  name?: string;
  /** Size of the exposed disk in bytes. */
  sizeBytes: number;
  /** Reuse an existing image so data survives restarts; created sparse if absent, extended if shorter. */
  backingFile?: string;
  /** Fixed latency added to every read / write-like request (write, zero, trim). */
  delayMs?: { read?: number; write?: number };
  /** How long to wait for the mount to appear (default 20 s). */
  startTimeoutMs?: number;
  /**
   * A volatile write cache: writes without FUA stay in the plugin's memory
   * (reads see them, the backing file does not) until a FLUSH, or a FUA
   * write for its own range; powerCut() drops what was not flushed.
   */
  volatileCache?: boolean;
}

export interface PowerCutOptions {
  /**
   * Before dropping the cache, persist a random subset of the unflushed
   * writes, chosen by this seed: each write (in arrival order) is dropped,
   * kept whole, or torn at 4 KiB boundaries, as a real disk may persist any
   * subset of what it has not flushed. Without it, nothing unflushed survives.
   */
  keepRandomSubset?: number;
}

export interface PowerCutResult {
  /** Unflushed writes dropped whole, kept whole, and torn. */
  dropped: number;
  kept: number;
  torn: number;
}

export interface FaultDiskStats {
  /** pread requests that reached the plugin (after any hang), including failed ones. */
  reads: number;
  /** pwrite requests, including failed ones. */
  writes: number;
  flushes: number;
  trims: number;
  zeros: number;
  readBytes: number;
  writeBytes: number;
  /** Requests failed because they overlapped a bad range. */
  readErrors: number;
  writeErrors: number;
  /** Requests currently blocked by setHang(true). */
  blocked: number;
  /** Writes held in the volatile cache (volatileCache only; else 0). */
  unflushedWrites: number;
  /** powerCut() calls so far. */
  powerCuts: number;
}

export interface BadRanges {
  read?: ByteRange[];
  write?: ByteRange[];
}

export interface FaultDisk {
  /** The nbdfuse-exposed regular file to open. */
  readonly path: string;
  /** The real image behind it. */
  readonly backingFile: string;
  /** The FUSE mount point (a directory containing only `path`). */
  readonly mountDir: string;
  /** The JSON control file read by the plugin. */
  readonly controlFile: string;
  /** Pid of the nbdkit server (valid until kill()/stop()). */
  readonly nbdkitPid: number;
  /**
   * Replace the bad ranges ([offset, length) in bytes; an omitted list means
   * none). Requests overlapping a read range fail reads with EIO; a write
   * range fails writes, zero and trim. Applied before the promise resolves.
   */
  setBad(bad: BadRanges): Promise<void>;
  /**
   * While on, requests block in the plugin without answering (all data
   * requests and flush; with writesOnly, only writes/zero/trim/flush). Off
   * lets them run. Caveat: nbdfuse 1.14 issues no new NBD request while it
   * waits for a reply, so once one request is blocked, every later request
   * to the file waits behind it, reads included (a whole-disk stall).
   */
  setHang(on: boolean, opts?: { writesOnly?: boolean; ranges?: ByteRange[] }): Promise<void>;
  /** Change the per-request latency. */
  setDelay(delayMs: { read?: number; write?: number }): Promise<void>;
  /** Counters kept by the plugin. Throws after kill(). */
  stats(): Promise<FaultDiskStats>;
  /** Wait until at least `n` requests are blocked by a hang. */
  waitBlocked(n?: number, timeoutMs?: number): Promise<void>;
  /**
   * A simulated power cut (volatileCache only): the unflushed writes are
   * lost (or, with keepRandomSubset, a random subset of them is persisted
   * first). The disk stays up: what was flushed is what the next reader
   * sees. Stop the writers first, or their late writes land after the cut.
   */
  powerCut(opts?: PowerCutOptions): Promise<PowerCutResult>;
  /** The disk vanishes: nbdkit is SIGKILLed (see the module comment for what the FUSE file does then). */
  kill(): Promise<void>;
  /** Clean shutdown: release hangs, unmount, stop processes. Idempotent; never leaves a mount behind. */
  stop(): Promise<void>;
  /** nbdfuse/nbdkit stderr collected so far (tail). */
  logs(): string;
}

// ---------------------------------------------------------------------------
// tools

const TOOL_HINTS: Record<string, string> = {
  nbdkit: 'Debian package nbdkit (and nbdkit-plugin-python)',
  nbdfuse: 'Debian package libnbd-bin',
  nbdinfo: 'Debian package libnbd-bin',
  nbdcopy: 'Debian package libnbd-bin',
  fusermount3: 'Debian package fuse3',
  dd: 'Debian package coreutils',
  'qemu-img': 'Debian package qemu-utils',
  'qemu-io': 'Debian package qemu-utils',
  fio: 'Debian package fio',
  umount: 'Debian package mount',
};

function findOnPath(name: string): string | undefined {
  const candidates = name.includes('/')
    ? [name]
    : (process.env.PATH ?? '/usr/local/bin:/usr/bin:/bin')
        .split(':')
        .concat(['/usr/sbin', '/sbin'])
        .filter((d) => d.length > 0)
        .map((d) => path.join(d, name));
  for (const c of candidates) {
    try {
      accessSync(c, fsConstants.X_OK);
      return c;
    } catch {
      // keep looking
    }
  }
  return undefined;
}

/**
 * Throws a clear error naming every missing tool. Besides executables on
 * PATH, accepts the pseudo-names "nbdkit-python" (the nbdkit python plugin
 * is installed) and "/dev/fuse".
 */
export function requireTools(...names: string[]): void {
  const missing: string[] = [];
  for (const name of names) {
    if (name === 'nbdkit-python') {
      if (!pythonPluginAvailable()) missing.push('nbdkit-python (Debian package nbdkit-plugin-python)');
    } else if (name === '/dev/fuse') {
      if (!existsSync('/dev/fuse')) missing.push('/dev/fuse (FUSE kernel support)');
    } else if (findOnPath(name) === undefined) {
      const hint = TOOL_HINTS[name];
      missing.push(hint ? `${name} (${hint})` : name);
    }
  }
  if (missing.length > 0) {
    throw new Error(`required test tool(s) missing: ${missing.join(', ')}`);
  }
}

let pythonPluginOk: boolean | undefined;
function pythonPluginAvailable(): boolean {
  if (pythonPluginOk === undefined) {
    try {
      execFileSync('nbdkit', ['python', '--dump-plugin'], { stdio: 'ignore', timeout: 10_000 });
      pythonPluginOk = true;
    } catch {
      pythonPluginOk = false;
    }
  }
  return pythonPluginOk;
}

// ---------------------------------------------------------------------------
// temp dirs, mounts, registry of live disks

const tempDirs = new Set<string>();
const liveDisks = new Set<FaultDiskImpl>();

/** A fresh directory under /var/tmp (a real disk, not tmpfs). Removed by removeTempDir()/cleanupAll(). */
export async function makeTempDir(prefix: string): Promise<string> {
  const safe = prefix.replace(/[^A-Za-z0-9._-]/g, '_') || 'tmp';
  const dir = await fs.mkdtemp(path.join('/var/tmp', `${safe}-`));
  tempDirs.add(dir);
  installExitHook();
  return dir;
}

function decodeMountField(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_m, oct: string) => String.fromCharCode(parseInt(oct, 8)));
}

/** Mount points (from /proc/self/mounts) at or below `dir`; fuse ones only unless all=true. */
export function mountsUnder(dir: string, all = false): string[] {
  const root = path.resolve(dir);
  const out: string[] = [];
  let text = '';
  try {
    text = readFileSync('/proc/self/mounts', 'utf8');
  } catch {
    return out;
  }
  for (const line of text.split('\n')) {
    const f = line.split(' ');
    if (f.length < 3) continue;
    const mp = decodeMountField(f[1]);
    const type = f[2];
    if (!all && !type.startsWith('fuse')) continue;
    if (mp === root || mp.startsWith(root + '/')) out.push(mp);
  }
  // deepest first, so nested mounts go before their parents
  return out.sort((a, b) => b.length - a.length);
}

function isMounted(mp: string): boolean {
  return mountsUnder(mp, true).includes(path.resolve(mp));
}

/** Detach a mount point, politely first, lazily if busy. Synchronous; never throws. */
function unmountSync(mp: string): void {
  const attempts: Array<[string, string[]]> = [
    ['fusermount3', ['-u', mp]],
    ['fusermount3', ['-u', '-z', mp]],
    ['umount', ['-l', mp]],
  ];
  for (const [cmd, args] of attempts) {
    if (!isMounted(mp)) return;
    try {
      execFileSync(cmd, args, { stdio: 'ignore', timeout: 10_000 });
    } catch {
      // try the next way
    }
  }
}

/** Unmount anything left under dir, then remove it. */
export async function removeTempDir(dir: string): Promise<void> {
  for (const d of [...liveDisks]) {
    if (d.mountDir.startsWith(path.resolve(dir) + '/')) await d.stop();
  }
  for (const mp of mountsUnder(dir, true)) unmountSync(mp);
  if (mountsUnder(dir, true).length > 0) {
    throw new Error(`refusing to remove ${dir}: still has mounts ${mountsUnder(dir, true).join(', ')}`);
  }
  await fs.rm(dir, { recursive: true, force: true });
  tempDirs.delete(dir);
}

/** Stop every live fault disk and remove every temp dir made by makeTempDir(). For afterAll/afterEach. */
export async function cleanupAll(): Promise<void> {
  const errors: unknown[] = [];
  for (const d of [...liveDisks]) {
    try {
      await d.stop();
    } catch (e) {
      errors.push(e);
    }
  }
  for (const dir of [...tempDirs]) {
    try {
      await removeTempDir(dir);
    } catch (e) {
      errors.push(e);
    }
  }
  if (errors.length > 0) throw new AggregateError(errors, 'faultdisk cleanupAll failed');
}

let exitHookInstalled = false;
function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  // Last resort if a test forgot to stop a disk or the worker exits early:
  // synchronous, best effort, never throws.
  process.once('exit', () => {
    for (const d of liveDisks) d.emergencyStopSync();
    for (const dir of tempDirs) {
      try {
        for (const mp of mountsUnder(dir, true)) unmountSync(mp);
        if (mountsUnder(dir, true).length === 0) rmSync(dir, { recursive: true, force: true });
      } catch {
        // nothing more to do at exit
      }
    }
  });
}

// ---------------------------------------------------------------------------
// processes

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function waitFor(cond: () => boolean, timeoutMs: number, stepMs = 10): Promise<boolean> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    if (cond()) return true;
    if (Date.now() >= end) return false;
    await sleep(stepMs);
  }
}

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
}

/** Run a command to completion (no shell), with a timeout after which it is SIGKILLed. */
export function runCommand(cmd: string, args: string[], opts: { timeoutMs?: number } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    let timedOut = false;
    child.stdout.setEncoding('utf8').on('data', (s: string) => (stdout += s));
    child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, opts.timeoutMs ?? 30_000);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr, timedOut });
    });
  });
}

export type ProbeResult = { ok: true; bytes: number; sha256: string } | { ok: false; errno: string; phase: 'open' | 'io' };

/**
 * One page-aligned O_DIRECT read or write of [offset, offset+length) through
 * dio_probe.py, reporting the exact errno name on failure.
 */
export async function dioProbe(
  op: 'read' | 'write',
  file: string,
  offset: number,
  length: number,
  opts: { fill?: number; timeoutMs?: number } = {},
): Promise<ProbeResult> {
  const args = [DIO_PROBE_PATH, op, file, String(offset), String(length)];
  if (op === 'write') args.push(String(opts.fill ?? 0xa5));
  const r = await runCommand(SYSTEM_PYTHON, args, { timeoutMs: opts.timeoutMs ?? 30_000 });
  if (r.timedOut) throw new Error(`dio_probe ${op} ${file}@${offset} timed out`);
  const line = r.stdout.trim().split('\n').pop() ?? '';
  try {
    return parseProbe(JSON.parse(line));
  } catch {
    throw new Error(`dio_probe ${op} failed (code ${r.code}): ${r.stdout}${r.stderr}`);
  }
}

function parseProbe(v: unknown): ProbeResult {
  if (typeof v !== 'object' || v === null) throw new Error('bad probe output');
  const o = v as Record<string, unknown>;
  if (o.ok === true && typeof o.bytes === 'number' && typeof o.sha256 === 'string') {
    return { ok: true, bytes: o.bytes, sha256: o.sha256 };
  }
  if (o.ok === false && typeof o.errno === 'string' && (o.phase === 'open' || o.phase === 'io')) {
    return { ok: false, errno: o.errno, phase: o.phase };
  }
  throw new Error('bad probe output');
}

// ---------------------------------------------------------------------------
// the disk

type HangMode = 'none' | 'all' | 'writes';

interface ControlDoc {
  bad: { read: ByteRange[]; write: ByteRange[] };
  hang: HangMode;
  /** Only requests overlapping these hang (flush then never does); absent: all. */
  hangRanges?: ByteRange[];
  delayMs: { read: number; write: number };
}

const LOG_TAIL = 64 * 1024;

function checkRanges(what: string, ranges: ByteRange[] | undefined): ByteRange[] {
  const out: ByteRange[] = [];
  for (const r of ranges ?? []) {
    if (!Array.isArray(r) || r.length !== 2) throw new TypeError(`${what}: each range is [offset, length]`);
    const [off, len] = r;
    if (!Number.isSafeInteger(off) || off < 0 || !Number.isSafeInteger(len) || len <= 0) {
      throw new RangeError(`${what}: bad range [${String(off)}, ${String(len)}]`);
    }
    out.push([off, len]);
  }
  return out;
}

function checkDelay(d: { read?: number; write?: number } | undefined): { read: number; write: number } {
  const read = d?.read ?? 0;
  const write = d?.write ?? 0;
  for (const v of [read, write]) {
    if (!Number.isFinite(v) || v < 0) throw new RangeError(`delayMs must be >= 0, got ${v}`);
  }
  return { read, write };
}

/** A child process we own, with its exit tracked. */
class Proc {
  exited = false;
  spawnError: Error | undefined;
  readonly exit: Promise<void>;

  constructor(
    readonly name: string,
    readonly child: ChildProcess,
    onOutput: (s: string) => void,
  ) {
    child.stdout?.setEncoding('utf8').on('data', onOutput);
    child.stderr?.setEncoding('utf8').on('data', onOutput);
    child.on('error', (e) => (this.spawnError = e));
    this.exit = new Promise((resolve) => {
      child.on('exit', (code, signal) => {
        this.exited = true;
        onOutput(`[${name} exited: ${signal ?? `code ${String(code)}`}]\n`);
        resolve();
      });
      child.on('error', () => {
        this.exited = true;
        resolve();
      });
    });
    // a forgotten disk must not keep the test process alive; the exit hook cleans up
    child.unref();
    for (const s of [child.stdout, child.stderr]) (s as unknown as { unref?: () => void } | null)?.unref?.();
  }

  get pid(): number {
    return this.child.pid ?? -1;
  }

  signal(sig: NodeJS.Signals): void {
    if (this.exited) return;
    try {
      this.child.kill(sig);
    } catch {
      // gone already
    }
  }

  /** Wait up to timeoutMs for exit; true if it exited. */
  async waitExit(timeoutMs: number): Promise<boolean> {
    if (this.exited) return true;
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<void>((r) => (timer = setTimeout(r, timeoutMs)));
    await Promise.race([this.exit, timeout]);
    clearTimeout(timer);
    return this.exited;
  }

  /** SIGTERM, then SIGKILL if it lingers. */
  async terminate(graceMs: number): Promise<void> {
    if (this.exited) return;
    this.signal('SIGTERM');
    if (await this.waitExit(graceMs)) return;
    this.signal('SIGKILL');
    await this.waitExit(5_000);
  }
}

class FaultDiskImpl implements FaultDisk {
  readonly path: string;
  readonly backingFile: string;
  readonly mountDir: string;
  readonly controlFile: string;

  private readonly ctlSocket: string;
  private readonly nbdSocket: string;
  private readonly nbdkitPidFile: string;
  private readonly nbdfusePidFile: string;
  private readonly sizeBytes: number;
  private readonly volatileCache: boolean;
  private readonly control: ControlDoc;
  private nbdkit: Proc | undefined;
  private nbdfuse: Proc | undefined;
  private watchdog: ChildProcess | undefined;
  private log = '';
  private killed = false;
  private stopping: Promise<void> | undefined;
  private controlSeq = 0;

  constructor(opts: FaultDiskOptions) {
    const name = opts.name ?? 'disk';
    if (!/^[A-Za-z0-9._-]+$/.test(name)) throw new Error(`faultdisk: bad name ${JSON.stringify(name)}`);
    if (!Number.isSafeInteger(opts.sizeBytes) || opts.sizeBytes <= 0) {
      throw new RangeError(`faultdisk: sizeBytes must be a positive integer, got ${opts.sizeBytes}`);
    }
    const dir = path.resolve(opts.dir);
    this.sizeBytes = opts.sizeBytes;
    this.volatileCache = opts.volatileCache === true;
    this.mountDir = path.join(dir, `${name}.mnt`);
    this.path = path.join(this.mountDir, name);
    this.controlFile = path.join(dir, `${name}.control.json`);
    this.nbdkitPidFile = path.join(dir, `${name}.nbdkit.pid`);
    this.nbdfusePidFile = path.join(dir, `${name}.nbdfuse.pid`);
    this.backingFile = opts.backingFile ? path.resolve(opts.backingFile) : path.join(dir, `${name}.img`);
    // sun_path is 108 bytes; fall back to short paths for deep work dirs
    const short = Buffer.byteLength(path.join(dir, `${name}.nbd.sock`)) >= 100;
    const base = short ? path.join(os.tmpdir(), `faultdisk-${randomBytes(6).toString('hex')}`) : path.join(dir, name);
    this.ctlSocket = `${base}.ctl.sock`;
    this.nbdSocket = `${base}.nbd.sock`;
    this.control = {
      bad: { read: [], write: [] },
      hang: 'none',
      delayMs: checkDelay(opts.delayMs),
    };
  }

  get nbdkitPid(): number {
    return this.nbdkit?.pid ?? -1;
  }

  logs(): string {
    let out = '';
    for (const f of this.logFiles) {
      try {
        const t = readFileSync(f, 'utf8');
        out += t.length > LOG_TAIL ? t.slice(t.length - LOG_TAIL) : t;
      } catch {
        // not written yet
      }
    }
    return out + this.log;
  }

  private readonly logFiles: string[] = [];

  private appendLog(s: string): void {
    this.log += s;
    if (this.log.length > LOG_TAIL) this.log = this.log.slice(this.log.length - LOG_TAIL);
  }

  private spawnOwned(name: string, args: string[]): Proc {
    // Output goes to a file, not a pipe to this process: an engine whose
    // event loop is blocked in the kernel on this FUSE mount (FUSE does not
    // honour non-blocking submission) cannot drain a pipe, and nbdkit blocked
    // writing its log to a full pipe would never answer: a deadlock.
    const logFile = path.join(path.dirname(this.controlFile), `${path.basename(this.controlFile).split('.')[0]}.${name}.log`);
    const fd = openSync(logFile, 'a');
    let child: ChildProcess;
    try {
      child = spawn(name, args, { stdio: ['ignore', fd, fd] });
    } finally {
      closeSync(fd);
    }
    if (!this.logFiles.includes(logFile)) this.logFiles.push(logFile);
    const p = new Proc(name, child, (s) => this.appendLog(s));
    liveDisks.add(this);
    installExitHook();
    return p;
  }

  async start(timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    await fs.mkdir(path.dirname(this.controlFile), { recursive: true });
    if (isMounted(this.mountDir)) unmountSync(this.mountDir); // stale, from a crashed run
    await fs.mkdir(this.mountDir, { recursive: true });
    await fs.mkdir(path.dirname(this.backingFile), { recursive: true });
    const fh = await fs.open(this.backingFile, 'a'); // creates if absent, keeps data
    try {
      const st = await fh.stat();
      if (st.size < this.sizeBytes) await fh.truncate(this.sizeBytes); // sparse
    } finally {
      await fh.close();
    }
    await this.writeControl();
    for (const f of [this.nbdkitPidFile, this.nbdfusePidFile, this.ctlSocket, this.nbdSocket]) {
      await fs.rm(f, { force: true });
    }

    try {
      // nbdkit is our own child (not nbdfuse's), so we reap it however it
      // ends; --exit-with-parent ties it to this process.
      const nbdkit = this.spawnOwned('nbdkit', [
        '-f', '--exit-with-parent',
        '-U', this.nbdSocket,
        '-P', this.nbdkitPidFile,
        'python', PLUGIN_PATH,
        `file=${this.backingFile}`,
        `size=${this.sizeBytes}`,
        `control=${this.controlFile}`,
        `socket=${this.ctlSocket}`,
        ...(this.volatileCache ? ['volatile=1'] : []),
      ]);
      this.nbdkit = nbdkit;
      await this.waitReady(nbdkit, () => existsSync(this.nbdkitPidFile), deadline, 'nbdkit');
      const hello = await this.rpc('hello');
      if (hello.pid !== nbdkit.pid) throw new Error(`faultdisk: unexpected hello reply ${JSON.stringify(hello)}`);

      // -C 1: one connection, so what a hang does does not depend on which
      // of several connections a request happened to be sent on.
      const nbdfuse = this.spawnOwned('nbdfuse', ['-C', '1', '-P', this.nbdfusePidFile, this.path, '--unix', this.nbdSocket]);
      this.nbdfuse = nbdfuse;
      await this.waitReady(
        nbdfuse,
        () => {
          if (!existsSync(this.nbdfusePidFile)) return false;
          try {
            const st = statFile(this.path);
            return st !== undefined && st.isFile && st.size === this.sizeBytes;
          } catch {
            return false; // e.g. ENOTCONN while nbdfuse is still coming up
          }
        },
        deadline,
        'nbdfuse',
      );
      this.startWatchdog();
    } catch (e) {
      const logs = this.log;
      await this.stop().catch(() => undefined);
      throw new Error(`faultdisk: start failed: ${e instanceof Error ? e.message : String(e)}\nlogs:\n${logs}`);
    }
  }

  /**
   * If this process dies without stop() (a test worker killed by its pool
   * gets no 'exit' event), a detached shell sees its stdin pipe close and
   * detaches the mount and kills nbdfuse and nbdkit. stop() kills it first.
   */
  private startWatchdog(): void {
    const script = [
      'mnt=$1; shift',
      'read -r _ || true',
      'fusermount3 -u -z "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null',
      'for p in "$@"; do kill -9 "$p" 2>/dev/null; done',
      'exit 0',
    ].join('\n');
    const pids = [this.nbdfuse?.pid ?? -1, this.nbdkit?.pid ?? -1].filter((p) => p > 0).map(String);
    const wd = spawn('sh', ['-c', script, 'faultdisk-watchdog', this.mountDir, ...pids], {
      stdio: ['pipe', 'ignore', 'ignore'],
      detached: true,
    });
    wd.on('error', (e) => this.appendLog(`[watchdog: ${e.message}]\n`));
    wd.unref();
    (wd.stdin as unknown as { unref?: () => void } | null)?.unref?.();
    this.watchdog = wd;
  }

  private stopWatchdog(): void {
    const wd = this.watchdog;
    this.watchdog = undefined;
    if (wd && wd.exitCode === null && wd.signalCode === null) {
      try {
        wd.kill('SIGKILL');
      } catch {
        // gone already
      }
    }
  }

  private async waitReady(p: Proc, ready: () => boolean, deadline: number, what: string): Promise<void> {
    const ok = await waitFor(() => p.exited || p.spawnError !== undefined || ready(), Math.max(0, deadline - Date.now()), 20);
    if (p.spawnError) throw new Error(`${what}: ${p.spawnError.message}`);
    if (p.exited) throw new Error(`${what} exited before it was ready`);
    if (!ok) throw new Error(`${what} not ready in time`);
  }

  private async writeControl(): Promise<void> {
    const tmp = `${this.controlFile}.tmp-${process.pid}-${this.controlSeq++}`;
    await fs.writeFile(tmp, JSON.stringify(this.control));
    await fs.rename(tmp, this.controlFile);
  }

  private rpc(cmd: string, timeoutMs = 5_000): Promise<Record<string, unknown>> {
    return new Promise((resolve, reject) => {
      const sock = net.createConnection(this.ctlSocket);
      let data = '';
      let done = false;
      const finish = (err: Error | undefined, value?: Record<string, unknown>): void => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        sock.destroy();
        if (err) reject(err);
        else resolve(value ?? {});
      };
      const timer = setTimeout(() => finish(new Error(`faultdisk: control "${cmd}" timed out`)), timeoutMs);
      sock.setEncoding('utf8');
      sock.on('connect', () => sock.write(`${cmd}\n`));
      sock.on('data', (s: string) => {
        data += s;
        const nl = data.indexOf('\n');
        if (nl < 0) return;
        try {
          const v: unknown = JSON.parse(data.slice(0, nl));
          if (typeof v !== 'object' || v === null) throw new Error('not an object');
          const o = v as Record<string, unknown>;
          if (typeof o.error === 'string') finish(new Error(`faultdisk: plugin: ${o.error}`));
          else finish(undefined, o);
        } catch (e) {
          finish(new Error(`faultdisk: bad control reply ${JSON.stringify(data)}: ${String(e)}`));
        }
      });
      sock.on('error', (e) => finish(new Error(`faultdisk: control "${cmd}" failed: ${e.message}`)));
      sock.on('close', () => finish(new Error(`faultdisk: control "${cmd}": connection closed without reply`)));
    });
  }

  /** Write the control file and, while the plugin lives, make it apply it now. */
  private async applyControl(): Promise<void> {
    await this.writeControl();
    if (this.killed || this.stopping) return;
    await this.rpc('reload');
  }

  async setBad(bad: BadRanges): Promise<void> {
    this.control.bad = { read: checkRanges('setBad read', bad.read), write: checkRanges('setBad write', bad.write) };
    await this.applyControl();
  }

  async setHang(on: boolean, opts: { writesOnly?: boolean; ranges?: ByteRange[] } = {}): Promise<void> {
    this.control.hang = on ? (opts.writesOnly ? 'writes' : 'all') : 'none';
    if (on && opts.ranges !== undefined) this.control.hangRanges = checkRanges('setHang ranges', opts.ranges);
    else delete this.control.hangRanges;
    await this.applyControl();
  }

  async setDelay(delayMs: { read?: number; write?: number }): Promise<void> {
    this.control.delayMs = checkDelay(delayMs);
    await this.applyControl();
  }

  async stats(): Promise<FaultDiskStats> {
    if (this.killed) throw new Error('faultdisk: stats() after kill(): the nbdkit server is gone');
    if (this.stopping) throw new Error('faultdisk: stats() after stop()');
    const o = await this.rpc('stats');
    const num = (k: string): number => {
      const v = o[k];
      if (typeof v !== 'number') throw new Error(`faultdisk: stats reply lacks ${k}`);
      return v;
    };
    return {
      reads: num('reads'),
      writes: num('writes'),
      flushes: num('flushes'),
      trims: num('trims'),
      zeros: num('zeros'),
      readBytes: num('readBytes'),
      writeBytes: num('writeBytes'),
      readErrors: num('readErrors'),
      writeErrors: num('writeErrors'),
      blocked: num('blocked'),
      unflushedWrites: num('unflushedWrites'),
      powerCuts: num('powerCuts'),
    };
  }

  async powerCut(opts: PowerCutOptions = {}): Promise<PowerCutResult> {
    if (!this.volatileCache) throw new Error('faultdisk: powerCut() needs volatileCache: true');
    if (this.killed || this.stopping) throw new Error('faultdisk: powerCut() after kill()/stop()');
    const seed = opts.keepRandomSubset;
    if (seed !== undefined && (!Number.isSafeInteger(seed) || seed < 0)) {
      throw new RangeError(`faultdisk: keepRandomSubset must be a non-negative integer, got ${seed}`);
    }
    const o = await this.rpc(seed === undefined ? 'powercut' : `powercut ${seed}`, 30_000);
    const num = (k: string): number => {
      const v = o[k];
      if (typeof v !== 'number') throw new Error(`faultdisk: powercut reply lacks ${k}`);
      return v;
    };
    return { dropped: num('dropped'), kept: num('kept'), torn: num('torn') };
  }

  async waitBlocked(n = 1, timeoutMs = 10_000): Promise<void> {
    const end = Date.now() + timeoutMs;
    for (;;) {
      const s = await this.stats();
      if (s.blocked >= n) return;
      if (Date.now() >= end) throw new Error(`faultdisk: ${s.blocked} request(s) blocked, wanted ${n}, after ${timeoutMs} ms`);
      await sleep(10);
    }
  }

  async kill(): Promise<void> {
    if (this.killed || this.stopping) return;
    this.killed = true;
    const p = this.nbdkit;
    if (p && !p.exited) {
      p.signal('SIGKILL');
      if (!(await p.waitExit(5_000))) throw new Error(`faultdisk: nbdkit ${p.pid} survived SIGKILL`);
    }
  }

  stop(): Promise<void> {
    this.stopping ??= this.doStop();
    return this.stopping;
  }

  private async doStop(): Promise<void> {
    this.stopWatchdog();
    try {
      // 1. release blocked requests, so a polite unmount can succeed
      if (!this.killed && this.control.hang !== 'none' && this.nbdkit && !this.nbdkit.exited) {
        this.control.hang = 'none';
        await this.writeControl().catch(() => undefined);
        await this.rpc('reload', 2_000).catch(() => undefined);
      }
      // 2. unmount; nbdfuse then exits by itself
      const fuse = this.nbdfuse;
      if (isMounted(this.mountDir)) {
        try {
          execFileSync('fusermount3', ['-u', this.mountDir], { stdio: 'ignore', timeout: 10_000 });
        } catch {
          // busy (an fd still open) or nbdfuse died: detach lazily, and make
          // nbdfuse go so that the FUSE connection is torn down
          unmountSync(this.mountDir);
          fuse?.signal('SIGTERM');
        }
      }
      if (fuse && !(await fuse.waitExit(5_000))) await fuse.terminate(2_000);
      // 3. the server
      await this.nbdkit?.terminate(2_000);
      // 4. a daemon killed before unmounting leaves a dead mount: detach it
      if (isMounted(this.mountDir)) unmountSync(this.mountDir);
      if (isMounted(this.mountDir)) throw new Error(`faultdisk: could not unmount ${this.mountDir}`);
      for (const f of [this.ctlSocket, this.nbdSocket, this.nbdkitPidFile, this.nbdfusePidFile]) {
        await fs.rm(f, { force: true });
      }
      await fs.rmdir(this.mountDir).catch(() => undefined);
    } finally {
      liveDisks.delete(this);
    }
  }

  /** Synchronous last resort for process exit. */
  emergencyStopSync(): void {
    try {
      if (isMounted(this.mountDir)) unmountSync(this.mountDir);
      this.nbdfuse?.signal('SIGKILL');
      this.nbdkit?.signal('SIGKILL');
      this.stopWatchdog();
      for (const f of [this.ctlSocket, this.nbdSocket]) rmSync(f, { force: true });
    } catch {
      // best effort at exit
    }
  }
}

function statFile(p: string): { isFile: boolean; size: number } | undefined {
  const st = statSync(p, { throwIfNoEntry: false });
  return st ? { isFile: st.isFile(), size: st.size } : undefined;
}

/**
 * Start nbdkit (python plugin) behind nbdfuse and wait until the exposed
 * file exists with the right size and the plugin answers on its control
 * socket. Call stop() (or cleanupAll()) when done.
 */
export async function startFaultDisk(opts: FaultDiskOptions): Promise<FaultDisk> {
  requireTools('nbdkit', 'nbdfuse', 'fusermount3', 'nbdkit-python', '/dev/fuse');
  const disk = new FaultDiskImpl(opts);
  await disk.start(opts.startTimeoutMs ?? 20_000);
  return disk;
}
