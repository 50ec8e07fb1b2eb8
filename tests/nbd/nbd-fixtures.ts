/**
 * Shared setup for the NBD tests: a real engine on temp files under /var/tmp,
 * exported over a unix socket (and optionally TCP), plus runners for the real
 * clients (nbdinfo, nbdsh, nbdcopy, qemu-io, qemu-img, fio).
 */
import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import pino from 'pino';
import { openEngine } from '../../src/engine/open.js';
import type { BlockEngine } from '../../src/engine/engine.js';
import { NbdExport, type NbdBackend, type NbdExportOptions } from '../../src/frontends/nbd/index.js';

/** Debian's python3 has the libnbd bindings (the first python3 on PATH may not). */
export const SYSTEM_PYTHON = '/usr/bin/python3';

export function have(tool: string): boolean {
  return ['/usr/bin', '/usr/local/bin', '/bin'].some((d) => existsSync(join(d, tool)));
}

export interface LogLine { level: number; msg: string; [k: string]: unknown }

export interface Fixture {
  dir: string;
  engine: BlockEngine;
  nbd: NbdExport;
  sock: string;
  /** nbd+unix URI of the export. */
  uri: string;
  logs: LogLine[];
  close(): Promise<void>;
}

export interface FixtureOptions {
  sizeMiB?: number;
  name?: string;
  readOnly?: boolean;
  tcp?: boolean;
  description?: string;
  blockSize?: number;
  /** Wrap the engine in a test backend. */
  wrap?: (engine: BlockEngine) => NbdBackend;
}

export async function startFixture(o: FixtureOptions = {}): Promise<Fixture> {
  const dir = mkdtempSync(join('/var/tmp', 'dmr-nbd-'));
  const mainPath = join(dir, 'main.img');
  const sparePath = join(dir, 'spare.img');
  writeFileSync(mainPath, '');
  truncateSync(mainPath, (o.sizeMiB ?? 64) * 1024 * 1024);
  writeFileSync(sparePath, '');
  truncateSync(sparePath, 8 * 1024 * 1024);
  const logs: LogLine[] = [];
  const logger = pino({ level: 'debug' }, { write: (s: string) => { logs.push(JSON.parse(s) as LogLine); } });
  const engine = await openEngine({
    name: o.name ?? 'disk0', mainPath, sparePath, format: true, logger, metadataTimeoutMs: 2000,
    ...(o.blockSize !== undefined ? { blockSize: o.blockSize } : {}),
  });
  const sock = join(dir, 'nbd.sock');
  const opts: NbdExportOptions = {
    backend: o.wrap !== undefined ? o.wrap(engine) : engine,
    unixPath: sock,
    logger,
    ...(o.readOnly !== undefined ? { readOnly: o.readOnly } : {}),
    ...(o.description !== undefined ? { description: o.description } : {}),
    ...(o.tcp === true ? { tcp: { host: '127.0.0.1', port: 0 } } : {}),
  };
  const nbd = await NbdExport.start(opts);
  return {
    dir, engine, nbd, sock, logs,
    uri: nbd.endpoints[0],
    async close() {
      await nbd.close(2000);
      await engine.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

export interface RunResult { code: number; stdout: string; stderr: string }

/** Run a client process; never throws on a nonzero exit. */
export function run(cmd: string, args: string[], opts: { timeoutMs?: number; input?: string } = {}): Promise<RunResult> {
  return new Promise((resolve) => {
    const child = execFile(cmd, args, { timeout: opts.timeoutMs ?? 30_000, maxBuffer: 64 * 1024 * 1024, encoding: 'utf8' }, (err, stdout, stderr) => {
      const code = err === null ? 0 : typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : 1;
      resolve({ code, stdout, stderr });
    });
    if (opts.input !== undefined) child.stdin?.end(opts.input);
  });
}

/**
 * Run a python script with the libnbd bindings. The script gets SOCK and URI
 * in its globals; it should print one JSON line (the last line is parsed).
 */
export async function nbdPython(script: string, env: { sock: string; uri: string; name?: string }): Promise<unknown> {
  const prelude = [
    'import nbd, json, sys, os, time, errno',
    `SOCK = ${JSON.stringify(env.sock)}`,
    `URI = ${JSON.stringify(env.uri)}`,
    `NAME = ${JSON.stringify(env.name ?? 'disk0')}`,
    'def err_of(fn, *a, **kw):',
    '    try:',
    '        fn(*a, **kw)',
    '        return None',
    '    except nbd.Error as e:',
    '        return errno.errorcode.get(e.errnum, str(e.errnum)) if e.errnum else "ERR:" + str(e.string)',
    '',
  ].join('\n');
  const r = await run(SYSTEM_PYTHON, ['-c', `${prelude}\n${script}`]);
  if (r.code !== 0) throw new Error(`python failed (${r.code}): ${r.stderr}\n${r.stdout}`);
  const lines = r.stdout.trim().split('\n');
  return JSON.parse(lines[lines.length - 1]);
}
