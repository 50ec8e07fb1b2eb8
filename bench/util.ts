/**
 * Shared helpers of the benchmarks: a temp folder that is removed on exit
 * (also on Ctrl-C and errors), child processes to kill then, number
 * formatting, percentiles and a small table printer.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import type { ChildProcess } from 'node:child_process';

const children = new Set<ChildProcess>();
const tempDirs = new Set<string>();
let handlersInstalled = false;

/** Synchronous last-resort cleanup: kill our children (their process groups), remove our temp folders. */
export function cleanupNow(): void {
  for (const c of children) {
    if (c.exitCode === null && c.pid !== undefined) {
      try {
        process.kill(-c.pid, 'SIGKILL'); // its process group (fio's job processes too)
      } catch {
        // already gone
      }
    }
  }
  children.clear();
  for (const d of tempDirs) rmSync(d, { recursive: true, force: true });
  tempDirs.clear();
}

function installHandlers(): void {
  if (handlersInstalled) return;
  handlersInstalled = true;
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.on(sig, () => {
      process.stderr.write(`\n${sig}: removing temp files and stopping\n`);
      cleanupNow();
      process.exit(sig === 'SIGINT' ? 130 : 143);
    });
  }
  process.on('exit', cleanupNow);
}

/** A fresh folder under /var/tmp (a real disk, not tmpfs), removed at exit. */
export function makeTempDir(prefix: string): string {
  installHandlers();
  const dir = mkdtempSync(join('/var/tmp', `${prefix}-`));
  tempDirs.add(dir);
  return dir;
}

export function removeTempDir(dir: string): void {
  rmSync(dir, { recursive: true, force: true });
  tempDirs.delete(dir);
}

export function trackChild(c: ChildProcess): void {
  installHandlers();
  children.add(c);
  c.once('exit', () => children.delete(c));
}

/** Value at quantile q (0..1) of an ascending array (nearest rank). */
export function quantile(sorted: ArrayLike<number>, q: number): number {
  const n = sorted.length;
  if (n === 0) return NaN;
  return sorted[Math.min(n - 1, Math.max(0, Math.ceil(q * n) - 1))];
}

export function sortedCopy(xs: ArrayLike<number>): Float64Array {
  return Float64Array.from(xs).sort();
}

export function fmtInt(n: number): string {
  if (!Number.isFinite(n)) return '-';
  return Math.round(n).toLocaleString('en-US');
}

export function fmt(n: number, digits = 1): string {
  if (!Number.isFinite(n)) return '-';
  return n.toFixed(digits);
}

export function fmtRatio(n: number): string {
  return Number.isFinite(n) ? `${n.toFixed(3)}x` : '-';
}

export function verdict(ok: boolean): 'PASS' | 'MISS' {
  return ok ? 'PASS' : 'MISS';
}

/** Prints rows as an aligned text table; numbers-looking cells are right-aligned. */
export function table(header: string[], rows: string[][]): string {
  const all = [header, ...rows];
  const widths = header.map((_, i) => Math.max(...all.map((r) => (r[i] ?? '').length)));
  const numeric = header.map((_, i) => rows.every((r) => /^[-+]?[\d,.]+(x| ms| ns| µs|%)?$|^-$/.test(r[i] ?? '')));
  const line = (r: string[]): string =>
    r.map((c, i) => (numeric[i] ? (c ?? '').padStart(widths[i]) : (c ?? '').padEnd(widths[i]))).join('  ').trimEnd();
  return [line(header), widths.map((w) => '-'.repeat(w)).join('  '), ...rows.map(line)].join('\n');
}

/** xorshift32: cheap, deterministic pseudo-random u32s (Math.random would cost more per I/O). */
export function xorshift32(seed: number): () => number {
  let x = seed >>> 0 || 0x9e3779b9;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

export const MiB = 1024 * 1024;
export const GiB = 1024 * MiB;

/** A numeric setting from the environment (BENCH_SECONDS, ...), with a default and a floor. */
export function envNumber(name: string, def: number, min: number): number {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return def;
  const v = Number(raw);
  if (!Number.isFinite(v) || v < min) throw new Error(`${name}=${raw}: expected a number >= ${min}`);
  return v;
}
