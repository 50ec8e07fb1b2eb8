/**
 * Runs fio with --output-format=json --output=FILE and reads the figures
 * back (fio may print other things on stdout, so the JSON goes to a file).
 */
import { spawn } from 'node:child_process';
import { readFile, rm } from 'node:fs/promises';
import { trackChild } from './util.js';

export interface FioJob {
  /** The file (io_uring engine); unused with the nbd engine, which takes `uri`. */
  filename?: string;
  /** fio ioengine (default io_uring with O_DIRECT). */
  ioengine?: 'io_uring' | 'nbd';
  /** NBD URI for the nbd engine, e.g. nbd+unix:///?socket=PATH. */
  uri?: string;
  /** O_DIRECT (default true for io_uring; not passed to the nbd engine). */
  direct?: boolean;
  /** Jobs (threads), each with its own iodepth (and, with the nbd engine, its own connection); reported as one group. Default 1. */
  numjobs?: number;
  rw: 'randread' | 'randwrite' | 'read' | 'write';
  bs: number;
  iodepth: number;
  /** Bytes of the file the job covers. */
  sizeBytes: number;
  /** time_based runtime; omitted: one pass over sizeBytes. */
  seconds?: number;
  rampSeconds?: number;
  extra?: string[];
}

export interface FioResult {
  ios: number;
  runtimeMs: number;
  iops: number;
  bytesPerSec: number;
  /** usr + sys CPU of the fio job per I/O, in µs. */
  cpuUsPerIo: number;
  clatP50Us: number;
  clatP99Us: number;
  version: string;
}

function run(cmd: string, args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    // Own process group: fio forks its job processes, and cleanup kills the whole group.
    const c = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    trackChild(c);
    let stdout = '';
    let stderr = '';
    c.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    c.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    c.once('error', reject);
    c.once('close', (code, signal) => resolve({ code: code ?? (signal ? 128 : 1), stdout, stderr }));
  });
}

export async function fioVersion(): Promise<string> {
  const r = await run('fio', ['--version']);
  if (r.code !== 0) throw new Error(`fio --version failed: ${r.stderr.trim()}`);
  return r.stdout.trim();
}

function field(obj: unknown, ...path: string[]): unknown {
  let cur: unknown = obj;
  for (const p of path) {
    if (typeof cur !== 'object' || cur === null) return undefined;
    cur = (cur as Record<string, unknown>)[p];
  }
  return cur;
}

function num(obj: unknown, ...path: string[]): number {
  const v = field(obj, ...path);
  if (typeof v === 'number') return v;
  if (typeof v === 'string' && v !== '' && Number.isFinite(Number(v))) return Number(v);
  return NaN;
}

export async function runFio(job: FioJob, outFile: string): Promise<FioResult> {
  const engine = job.ioengine ?? 'io_uring';
  const numjobs = job.numjobs ?? 1;
  const target: string[] = [];
  if (engine === 'nbd') {
    if (job.uri === undefined) throw new Error('fio: the nbd engine needs a uri');
    target.push('--ioengine=nbd', `--uri=${job.uri}`); // engine options must follow --ioengine
    if (job.direct === true) target.push('--direct=1');
  } else {
    if (job.filename === undefined) throw new Error('fio: the io_uring engine needs a filename');
    target.push(`--filename=${job.filename}`, '--ioengine=io_uring');
    if (job.direct !== false) target.push('--direct=1');
  }
  const args = [
    '--name=bench',
    ...target,
    `--rw=${job.rw}`,
    `--bs=${job.bs}`,
    `--iodepth=${job.iodepth}`,
    `--size=${job.sizeBytes}`,
    `--numjobs=${numjobs}`,
    ...(numjobs > 1 ? ['--group_reporting'] : []),
    // One process (the job is a thread): fio's forked job processes call setsid and can outlive a killed parent.
    '--thread',
    '--norandommap',
    '--randrepeat=0',
    '--output-format=json',
    `--output=${outFile}`,
  ];
  if (job.seconds !== undefined) args.push('--time_based', `--runtime=${job.seconds}`);
  if (job.rampSeconds !== undefined && job.rampSeconds > 0) args.push(`--ramp_time=${job.rampSeconds}`);
  if (job.extra) args.push(...job.extra);
  const r = await run('fio', args);
  if (r.code !== 0) throw new Error(`fio ${job.rw} failed (exit ${r.code}): ${r.stderr.trim() || r.stdout.trim()}`);
  let parsed: unknown;
  try {
    // The nbd engine writes "fio: connected to NBD server" into the output file before the JSON.
    const text = await readFile(outFile, 'utf8');
    const start = text.indexOf('{');
    parsed = JSON.parse(start > 0 ? text.slice(start) : text);
  } finally {
    await rm(outFile, { force: true });
  }
  const jobs = field(parsed, 'jobs');
  if (!Array.isArray(jobs) || jobs.length === 0) throw new Error('fio JSON output has no jobs');
  const j: unknown = jobs[0];
  if (num(j, 'error') > 0) throw new Error(`fio job reported error ${num(j, 'error')}`);
  const dir = job.rw === 'randread' || job.rw === 'read' ? 'read' : 'write';
  const ios = num(j, dir, 'total_ios');
  const runtimeMs = num(j, dir, 'runtime');
  const cpuPct = num(j, 'usr_cpu') + num(j, 'sys_cpu');
  return {
    ios,
    runtimeMs,
    iops: num(j, dir, 'iops'),
    bytesPerSec: num(j, dir, 'bw_bytes'),
    // With group_reporting fio gives the CPU % averaged over the jobs' summed runtimes: scale by the job count.
    cpuUsPerIo: ios > 0 ? ((cpuPct / 100) * runtimeMs * 1000 * numjobs) / ios : NaN,
    clatP50Us: num(j, dir, 'clat_ns', 'percentile', '50.000000') / 1000,
    clatP99Us: num(j, dir, 'clat_ns', 'percentile', '99.000000') / 1000,
    version: String(field(parsed, 'fio version') ?? ''),
  };
}

/** Writes the whole file once, sequentially with O_DIRECT, so that reads hit real blocks. */
export async function fillFile(filename: string, sizeBytes: number, outFile: string, zero = false): Promise<FioResult> {
  return runFio(
    { filename, rw: 'write', bs: 1 << 20, iodepth: 16, sizeBytes, extra: ['--fallocate=native', ...(zero ? ['--zero_buffers'] : [])] },
    outFile,
  );
}
