/**
 * The NBD servers of `npm run bench:nbd`, each started on a unix socket in
 * the bench's temp folder and stopped again: the dm-remapd daemon (spawned
 * from dist/, the device added with remapctl), nbdkit's file plugin and
 * qemu-nbd, and the ceiling peer (bench/nbd-ceiling.c, compiled at bench
 * start). Every child runs in its own process group and is tracked, so
 * util.cleanupNow() kills it on Ctrl-C or an error.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, openSync, readFileSync, readdirSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { sleep, trackChild } from './util.js';

/** The built tree's root: this file is dist/bench/nbd-servers.js. */
const DIST = join(fileURLToPath(new URL('.', import.meta.url)), '..');
export const DAEMON_JS = join(DIST, 'src', 'daemon', 'main.js');
export const REMAPCTL_JS = join(DIST, 'src', 'cli', 'remapctl.js');
/** The repo's bench/ folder (sources, not built). */
export const CEILING_C = join(DIST, '..', 'bench', 'nbd-ceiling.c');

export interface NbdServer {
  /** Short label used in the tables. */
  label: string;
  /** How it was started, for the report. */
  command: string;
  pid: number;
  uri: string;
  /** Notes worth printing (e.g. a fallback taken). */
  notes: string[];
  /** usr+sys CPU seconds of the whole server so far, when `pid` alone does not cover it (forked workers). */
  cpuSeconds?(): number;
  stop(): Promise<void>;
}

export function uriOf(sock: string): string {
  return `nbd+unix:///?socket=${sock}`;
}

const CLK_TCK = 100; // sysconf(_SC_CLK_TCK) on Linux (USER_HZ), fixed at 100

/** The fields of /proc/PID/stat after the command name: [0] is the state (field 3), [11..14] utime, stime, cutime, cstime (fields 14-17). */
function statFields(pid: number): string[] {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  return stat.slice(stat.lastIndexOf(')') + 2).split(' ');
}

/** usr+sys CPU seconds of a process so far (all its threads), from /proc/PID/stat. */
export function processCpuSeconds(pid: number): number {
  try {
    const f = statFields(pid);
    return (Number(f[11]) + Number(f[12])) / CLK_TCK;
  } catch {
    return NaN;
  }
}

/**
 * CPU seconds of a forking server: its own usr+sys, that of its reaped
 * children (cutime+cstime) and that of its live children (from
 * /proc/PID/task/PID/children). A child that exits between the reads may be
 * missed once; the ceiling reaps its children at once, so this is rare.
 */
export function processTreeCpuSeconds(pid: number): number {
  try {
    const f = statFields(pid);
    let sum = (Number(f[11]) + Number(f[12]) + Number(f[13]) + Number(f[14])) / CLK_TCK;
    const kids = readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter((x) => x !== '');
    for (const k of kids) {
      const v = processCpuSeconds(Number(k));
      if (Number.isFinite(v)) sum += v;
    }
    return sum;
  } catch {
    return NaN;
  }
}

function spawnTracked(cmd: string, args: string[], logPath: string): ChildProcess {
  const fd = openSync(logPath, 'a');
  try {
    const c = spawn(cmd, args, { stdio: ['ignore', fd, fd], detached: true });
    trackChild(c);
    return c;
  } finally {
    closeSync(fd);
  }
}

function exited(c: ChildProcess): boolean {
  return c.exitCode !== null || c.signalCode !== null;
}

function waitExit(c: ChildProcess): Promise<void> {
  if (exited(c)) return Promise.resolve();
  return new Promise((res) => c.once('exit', () => res()));
}

/** SIGTERM, then SIGKILL of the process group after `graceMs`. */
async function terminate(c: ChildProcess, graceMs: number): Promise<void> {
  if (exited(c)) return;
  c.kill('SIGTERM');
  const t = setTimeout(() => {
    if (!exited(c) && c.pid !== undefined) {
      try {
        process.kill(-c.pid, 'SIGKILL');
      } catch {
        // gone
      }
    }
  }, graceMs);
  await waitExit(c);
  clearTimeout(t);
}

/** Whether something accepts a connection on unix socket `sock` now. */
export function tryConnect(sock: string): Promise<boolean> {
  return new Promise((res) => {
    const s = connect(sock);
    s.once('connect', () => {
      s.destroy();
      res(true);
    });
    s.once('error', () => res(false));
  });
}

/** Waits until something accepts connections on `sock`, or the child exits (false), or the timeout passes (throws). */
async function waitListening(c: ChildProcess, sock: string, what: string, logPath: string, timeoutMs = 15_000): Promise<boolean> {
  const t0 = Date.now();
  while (Date.now() - t0 < timeoutMs) {
    if (exited(c)) return false;
    if (existsSync(sock) && (await tryConnect(sock))) return true;
    await sleep(50);
  }
  throw new Error(`${what} did not listen on ${sock} within ${timeoutMs} ms: ${tail(logPath)}`);
}

function tail(logPath: string): string {
  try {
    return readFileSync(logPath, 'utf8').split('\n').slice(-8).join('\n');
  } catch {
    return '(no log)';
  }
}

// ------------------------------------------------------------------ nbdkit

export async function startNbdkit(dir: string, file: string, cacheNone: boolean): Promise<NbdServer> {
  const tag = cacheNone ? 'nbdkit-none' : 'nbdkit-cache';
  const sock = join(dir, `${tag}.sock`);
  const logPath = join(dir, `${tag}.log`);
  // -f: foreground (we track the pid); default 16 threads, parallel thread model.
  const args = ['-f', '-U', sock, 'file', file, ...(cacheNone ? ['cache=none'] : [])];
  const c = spawnTracked('nbdkit', args, logPath);
  if (!(await waitListening(c, sock, 'nbdkit', logPath))) throw new Error(`nbdkit exited at start: ${tail(logPath)}`);
  return {
    label: cacheNone ? 'nbdkit file cache=none' : 'nbdkit file (page cache)',
    command: `nbdkit ${args.join(' ')}`,
    pid: c.pid as number,
    uri: uriOf(sock),
    notes: [],
    stop: () => terminate(c, 3000),
  };
}

export function nbdkitVersion(): string {
  const r = spawnSync('nbdkit', ['--version'], { encoding: 'utf8' });
  return r.status === 0 ? r.stdout.trim() : 'nbdkit ?';
}

// ------------------------------------------------------------------ qemu-nbd

export async function startQemuNbd(dir: string, file: string, maxClients: number): Promise<NbdServer> {
  const notes: string[] = [];
  for (const aio of ['io_uring', 'native'] as const) {
    const sock = join(dir, `qemu-nbd-${aio}.sock`);
    const logPath = join(dir, `qemu-nbd-${aio}.log`);
    // -t: persistent (without it qemu-nbd exits when the first client leaves); -e: concurrent clients.
    const args = ['--cache=none', `--aio=${aio}`, '-t', '-e', String(maxClients), '-k', sock, '-f', 'raw', file];
    const c = spawnTracked('qemu-nbd', args, logPath);
    if (await waitListening(c, sock, 'qemu-nbd', logPath)) {
      return { label: `qemu-nbd cache=none aio=${aio}`, command: `qemu-nbd ${args.join(' ')}`, pid: c.pid as number, uri: uriOf(sock), notes, stop: () => terminate(c, 3000) };
    }
    notes.push(`qemu-nbd --aio=${aio} failed to start (${tail(logPath).trim().split('\n').pop() ?? '?'}); fell back to the next aio mode`);
  }
  throw new Error(`qemu-nbd did not start with aio=io_uring nor aio=native: ${notes.join('; ')}`);
}

export function qemuNbdVersion(): string {
  const r = spawnSync('qemu-nbd', ['--version'], { encoding: 'utf8' });
  return r.status === 0 ? (r.stdout.split('\n')[0] ?? '').trim() : 'qemu-nbd ?';
}

// ------------------------------------------------------------------ ceiling

export interface CeilingBuild {
  /** The compiled binary, or undefined when it could not be built. */
  bin?: string;
  /** Why not, for the report. */
  note?: string;
  command: string;
}

/**
 * Compiles bench/nbd-ceiling.c into `dir` (gcc -O2 -Wall ... -luring). A
 * missing gcc or missing liburing headers is not an error: the result then
 * has no `bin` and says why, and the bench skips the ceiling rows.
 */
export function buildCeiling(dir: string): CeilingBuild {
  const bin = join(dir, 'nbd-ceiling');
  const args = ['-O2', '-Wall', '-o', bin, CEILING_C, '-luring'];
  const command = `gcc ${args.join(' ')}`;
  if (!existsSync(CEILING_C)) return { command, note: `${CEILING_C} not found` };
  const r = spawnSync('gcc', args, { encoding: 'utf8', timeout: 120_000 });
  if (r.error !== undefined) {
    const code = (r.error as NodeJS.ErrnoException).code;
    return { command, note: code === 'ENOENT' ? 'gcc not found (apt install build-essential)' : `gcc: ${r.error.message}` };
  }
  if (r.status !== 0) {
    const err = (r.stderr ?? '').trim();
    if (/liburing\.h|-luring|cannot find -luring/.test(err)) return { command, note: 'liburing headers/library missing (apt install liburing-dev)' };
    return { command, note: `gcc failed (exit ${r.status}): ${err.split('\n').slice(0, 4).join(' | ')}` };
  }
  return { command, bin };
}

/** The ceiling server on a unix socket; `spin` = busy-poll its ring instead of sleeping. */
export async function startCeiling(dir: string, bin: string, file: string, spin: boolean): Promise<NbdServer> {
  const tag = spin ? 'ceiling-spin' : 'ceiling-sleep';
  const sock = join(dir, `${tag}.sock`);
  const logPath = join(dir, `${tag}.log`);
  const args = [sock, file, ...(spin ? ['--spin'] : [])];
  // It forks a child per connection; SIGTERM to it kills them, and the group kill covers the rest.
  const c = spawnTracked(bin, args, logPath);
  if (!(await waitListening(c, sock, 'nbd-ceiling', logPath))) throw new Error(`nbd-ceiling exited at start: ${tail(logPath)}`);
  const pid = c.pid as number;
  return {
    label: spin ? 'ceiling C server (busy-polls)' : 'ceiling C server (sleeps)',
    command: `nbd-ceiling ${args.join(' ')}`,
    pid,
    uri: uriOf(sock),
    notes: [],
    cpuSeconds: () => processTreeCpuSeconds(pid),
    stop: () => terminate(c, 3000),
  };
}

// ------------------------------------------------------------------ dm-remapd

export interface DmRemapdServer extends NbdServer {
  /** `remapctl --json status NAME` (result object). */
  status(): Record<string, unknown>;
  /** Folder the daemon writes its --cpu-prof profile to, when profiling. */
  profileDir?: string;
  logPath: string;
}

function remapctl(ctl: string, args: string[]): { code: number; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [REMAPCTL_JS, '--socket', ctl, ...args], { encoding: 'utf8', timeout: 30_000 });
  return { code: r.status ?? 1, stdout: r.stdout ?? '', stderr: r.stderr ?? '' };
}

/**
 * Spawns the real daemon (`node dist/src/daemon/main.js`) with a temp state
 * folder and control socket, then `remapctl add NAME --main FILE --spare
 * SPARE --format --nbd-unix SOCK`. With `profile`, node runs with
 * --cpu-prof (written when the daemon exits after SIGTERM).
 */
export async function startDmRemapd(dir: string, main: string, spare: string, o: { profile: boolean; logLevel: string }): Promise<DmRemapdServer> {
  const ctl = join(dir, 'dmr', 'control.sock');
  const stateDir = join(dir, 'dmr', 'state');
  const sock = join(dir, 'dmr', 'd0.nbd');
  const logPath = join(dir, 'dm-remapd.log');
  const profileDir = o.profile ? join(dir, 'dmr', 'prof') : undefined;
  const nodeArgs = profileDir !== undefined ? ['--cpu-prof', `--cpu-prof-dir=${profileDir}`] : [];
  const args = [...nodeArgs, DAEMON_JS, '--state-dir', stateDir, '--control-socket', ctl, '--log-level', o.logLevel];
  const c = spawnTracked(process.execPath, args, logPath);
  if (!(await waitListening(c, ctl, 'dm-remapd control socket', logPath))) throw new Error(`dm-remapd exited at start: ${tail(logPath)}`);
  const add = remapctl(ctl, ['add', 'd0', '--main', main, '--spare', spare, '--format', '--nbd-unix', sock]);
  if (add.code !== 0) {
    await terminate(c, 5000);
    throw new Error(`remapctl add failed (exit ${add.code}): ${add.stderr.trim() || add.stdout.trim()}`);
  }
  if (!(await waitListening(c, sock, 'dm-remapd NBD export', logPath))) throw new Error(`dm-remapd exited after add: ${tail(logPath)}`);
  return {
    label: 'dm-remapd (daemon)',
    command: `node ${args.join(' ')}; remapctl add d0 --main ${main} --spare ${spare} --format --nbd-unix ${sock}`,
    pid: c.pid as number,
    uri: uriOf(sock),
    notes: [],
    profileDir,
    logPath,
    status() {
      const r = remapctl(ctl, ['--json', 'status', 'd0']);
      if (r.code !== 0) throw new Error(`remapctl status failed (exit ${r.code}): ${r.stderr.trim() || r.stdout.trim()}`);
      const parsed: unknown = JSON.parse(r.stdout);
      if (typeof parsed !== 'object' || parsed === null) throw new Error('remapctl status: not an object');
      const obj = parsed as Record<string, unknown>;
      const inner = obj.result;
      return typeof inner === 'object' && inner !== null ? (inner as Record<string, unknown>) : obj;
    },
    async stop() {
      // SIGTERM: the daemon removes the device (final sync) and exits 0; the profile is written then.
      await terminate(c, 20_000);
    },
  };
}

export function profileFiles(profileDir: string): string[] {
  try {
    return readdirSync(profileDir).filter((f) => f.endsWith('.cpuprofile')).map((f) => join(profileDir, f));
  } catch {
    return [];
  }
}
