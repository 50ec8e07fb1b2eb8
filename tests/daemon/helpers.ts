/**
 * Test helpers: spawn the compiled daemon (dist/, built by `npm run build`)
 * with a temp state folder and control socket under /var/tmp, run remapctl,
 * and talk raw protocol to the control socket.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { connect } from 'node:net';
import type { Readable } from 'node:stream';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = resolve(fileURLToPath(new URL('.', import.meta.url)), '..', '..');
export const DAEMON = join(ROOT, 'dist', 'src', 'daemon', 'main.js');
export const REMAPCTL = join(ROOT, 'dist', 'src', 'cli', 'remapctl.js');

export function requireBuild(): void {
  if (!existsSync(DAEMON) || !existsSync(REMAPCTL)) throw new Error(`build first: ${DAEMON} or ${REMAPCTL} missing (npm run build)`);
}

export function tempDir(prefix = 'dmr-test-'): string {
  return mkdtempSync(join('/var/tmp', prefix));
}

export function cleanup(dir: string): void {
  rmSync(dir, { recursive: true, force: true });
}

export interface LogLine {
  level: number;
  event?: string;
  device?: string;
  msg: string;
  [k: string]: unknown;
}

export interface Daemon {
  proc: ChildProcess;
  dir: string;
  sock: string;
  stateDir: string;
  logs: LogLine[];
  stderr: string;
  /** The exit code, once the process has exited and its log output has been read to the end (or 2 s passed). */
  exited: Promise<number | null>;
  /** Sends the signal and resolves with the exit code. */
  stop(signal?: NodeJS.Signals): Promise<number | null>;
  /**
   * The first log line that matches, waiting for it if needed. The daemon logs
   * before it answers, but its log comes through a pipe that this process may
   * read after the answer, so a line is waited for, never looked up at once.
   */
  waitLog(pred: (l: LogLine) => boolean, timeoutMs?: number): Promise<LogLine>;
  /** Every matching log line, once at least `n` of them have been seen. */
  waitLogs(pred: (l: LogLine) => boolean, n: number, timeoutMs?: number): Promise<LogLine[]>;
}

export interface DaemonOptions {
  args?: string[];
  env?: Record<string, string>;
  /** Wait for the "ready" event (default true). */
  waitReady?: boolean;
  stateDir?: string;
  sock?: string;
}

/**
 * The child's exit code, once `out` (a pipe the test reads) has also been read
 * to its end, or `graceMs` after the exit if something else still holds the
 * pipe open. Node may report the exit before the last output has been read.
 */
export function exitAfterOutput(proc: ChildProcess, out: Readable | null, graceMs = 2000): Promise<number | null> {
  return new Promise((res) => {
    proc.once('exit', (code) => {
      if (out === null || out.readableEnded || out.destroyed) return res(code);
      const t = setTimeout(() => res(code), graceMs);
      out.once('close', () => { clearTimeout(t); res(code); });
    });
  });
}

export async function startDaemon(dir: string, o: DaemonOptions = {}): Promise<Daemon> {
  requireBuild();
  const sock = o.sock ?? join(dir, 'run', 'control.sock');
  const stateDir = o.stateDir ?? join(dir, 'state');
  const proc = spawn(process.execPath, [DAEMON, '--state-dir', stateDir, '--control-socket', sock, ...(o.args ?? [])], {
    env: { ...process.env, ...(o.env ?? {}) },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const logs: LogLine[] = [];
  const waiters: Array<{ pred: (l: LogLine) => boolean; resolve: (l: LogLine) => void }> = [];
  let buf = '';
  proc.stdout?.setEncoding('utf8');
  proc.stdout?.on('data', (c: string) => {
    buf += c;
    for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      let l: LogLine;
      try {
        l = JSON.parse(line) as LogLine;
      } catch {
        l = { level: 0, msg: `NON-JSON: ${line}` };
      }
      logs.push(l);
      for (const w of [...waiters]) {
        if (w.pred(l)) {
          waiters.splice(waiters.indexOf(w), 1);
          w.resolve(l);
        }
      }
    }
  });
  const d: Daemon = {
    proc, dir, sock, stateDir, logs, stderr: '',
    exited: exitAfterOutput(proc, proc.stdout),
    async stop(signal: NodeJS.Signals = 'SIGTERM') {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      return d.exited;
    },
    waitLog(pred, timeoutMs = 10_000) {
      const found = logs.find(pred);
      if (found !== undefined) return Promise.resolve(found);
      return new Promise((res, rej) => {
        const t = setTimeout(() => rej(new Error(`log line not seen within ${timeoutMs} ms; logs:\n${logs.map((l) => JSON.stringify(l)).join('\n')}\nstderr: ${d.stderr}`)), timeoutMs);
        waiters.push({ pred, resolve: (l) => { clearTimeout(t); res(l); } });
      });
    },
    async waitLogs(pred, n, timeoutMs = 10_000) {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const got = logs.filter(pred);
        if (got.length >= n) return got;
        if (Date.now() >= deadline) {
          throw new Error(`${got.length} of ${n} log lines seen within ${timeoutMs} ms; logs:\n${logs.map((l) => JSON.stringify(l)).join('\n')}\nstderr: ${d.stderr}`);
        }
        await new Promise((r) => setTimeout(r, 10));
      }
    },
  };
  proc.stderr?.setEncoding('utf8');
  proc.stderr?.on('data', (c: string) => {
    d.stderr += c;
  });
  if (o.waitReady !== false) {
    await Promise.race([
      d.waitLog((l) => l.event === 'ready'),
      d.exited.then((code) => {
        throw new Error(`daemon exited with ${code} before ready: ${d.stderr}\n${logs.map((l) => JSON.stringify(l)).join('\n')}`);
      }),
    ]);
  }
  return d;
}

export interface CtlResult {
  code: number | null;
  stdout: string;
  stderr: string;
  ms: number;
}

export function runNode(script: string, args: string[], opts: { env?: Record<string, string>; wrap?: string[] } = {}): Promise<CtlResult> {
  const t0 = Date.now();
  const argv = [...(opts.wrap ?? []), process.execPath, script, ...args];
  return new Promise((res) => {
    const p = spawn(argv[0], argv.slice(1), { env: { ...process.env, ...(opts.env ?? {}) }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    p.stdout.setEncoding('utf8').on('data', (c: string) => { stdout += c; });
    p.stderr.setEncoding('utf8').on('data', (c: string) => { stderr += c; });
    p.on('close', (code) => res({ code, stdout, stderr, ms: Date.now() - t0 }));
  });
}

/** remapctl --socket SOCK ARGS... */
export function ctl(sock: string | null, ...args: string[]): Promise<CtlResult> {
  return runNode(REMAPCTL, sock === null ? args : ['--socket', sock, ...args]);
}

/** Writes raw bytes to the control socket and collects answer lines until `count` arrived (or the socket closed). */
export function raw(sock: string, data: string | Buffer, count: number, timeoutMs = 5000): Promise<Array<Record<string, unknown>>> {
  return new Promise((res, rej) => {
    const s = connect(sock);
    const out: Array<Record<string, unknown>> = [];
    let buf = '';
    const t = setTimeout(() => { s.destroy(); rej(new Error(`only ${out.length}/${count} answers: ${JSON.stringify(out)}`)); }, timeoutMs);
    const finish = (): void => { clearTimeout(t); s.destroy(); res(out); };
    s.setEncoding('utf8');
    s.on('connect', () => s.write(data));
    s.on('data', (c: string) => {
      buf += c;
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        out.push(JSON.parse(buf.slice(0, nl)) as Record<string, unknown>);
        buf = buf.slice(nl + 1);
      }
      if (out.length >= count) finish();
    });
    s.on('error', () => finish());
    s.on('close', () => finish());
  });
}

export async function request(sock: string, cmd: string, args: Record<string, unknown> = {}): Promise<Record<string, unknown>> {
  const [a] = await raw(sock, `${JSON.stringify({ id: 'x', cmd, args })}\n`, 1);
  return a;
}

/** Environment whose PATH puts the system's tools first: nbdsh runs `python3` from PATH and needs the system's python3-nbd. */
export const SYS_ENV = { ...process.env, PATH: `/usr/bin:/bin:${process.env.PATH ?? ''}` };

/**
 * Runs a system tool (nbdsh, ddrescue, ...) without blocking the event loop
 * (fault disks and the daemon write logs to pipes this process must keep
 * draining); resolves with its stdout, rejects naming the exit and stderr.
 */
export function runTool(cmd: string, args: string[], timeoutMs = 60_000): Promise<string> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { env: SYS_ENV, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    p.stdout.setEncoding('utf8').on('data', (c: string) => { out += c; });
    p.stderr.setEncoding('utf8').on('data', (c: string) => { err += c; });
    const timer = setTimeout(() => p.kill('SIGKILL'), timeoutMs);
    p.on('error', reject);
    p.on('close', (code, signal) => {
      clearTimeout(timer);
      if (code === 0) resolve(out);
      else reject(new Error(`${cmd} ${args.join(' ')}: exit ${code ?? signal}: ${err}`));
    });
  });
}
