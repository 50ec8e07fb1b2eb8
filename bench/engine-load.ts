/**
 * Drives a BlockEngine from JS at a fixed queue depth: QD requests stay
 * outstanding through engine.submitCb() (the frontends' path), each completion issues the next.
 */
import { allocAligned } from '../src/native/backing.js';
import type { BlockEngine, EngineRequest } from '../src/engine/engine.js';
import type { RemapError } from '../src/errors.js';
import { xorshift32 } from './util.js';

export interface Workload {
  /** Short label, e.g. "randread 4k QD32". */
  label: string;
  op: 'read' | 'write';
  pattern: 'random' | 'sequential';
  bs: number;
  qd: number;
}

export interface LoadResult {
  ios: number;
  seconds: number;
  iops: number;
  bytesPerSec: number;
  /** Process CPU (usr + sys, all threads) per I/O in µs. */
  cpuUsPerIo: number;
  errors: number;
  firstError: string | null;
}

/** Runs `w` for warmupSeconds untimed, then seconds timed; resolves once every request has finished. */
export async function runEngineLoad(engine: BlockEngine, w: Workload, seconds: number, warmupSeconds: number, seed = 1): Promise<LoadResult> {
  const blocks = Math.floor(engine.sizeBytes / w.bs);
  if (blocks < 1) throw new Error(`device of ${engine.sizeBytes} bytes is smaller than one ${w.bs}-byte request`);
  const rand = xorshift32(seed);
  let cursor = 0;
  const nextOffset =
    w.pattern === 'random'
      ? (): number => (rand() % blocks) * w.bs
      : (): number => {
          const o = cursor * w.bs;
          cursor = cursor + 1 === blocks ? 0 : cursor + 1;
          return o;
        };

  let done = 0;
  let errors = 0;
  let firstError: string | null = null;
  let stop = false;
  let outstanding = 0;
  let drained: () => void = () => {};
  const allDone = new Promise<void>((r) => (drained = r));

  const slots = Array.from({ length: w.qd }, (_, slot) => {
    const buffer = allocAligned(w.bs, 4096, true);
    if (w.op === 'write') {
      const r = xorshift32(seed * 7919 + slot + 1);
      const u32 = new Uint32Array(buffer.buffer, buffer.byteOffset, buffer.byteLength >>> 2);
      for (let i = 0; i < u32.length; i++) u32[i] = r();
    }
    // submitCb, as the frontends (NBD, ublk) drive the engine: no promise per request.
    const req: EngineRequest = { op: w.op, offset: 0, length: w.bs, buffer };
    const onComplete = (err: RemapError | null): void => (err === null ? onDone() : onError(err));
    const issue = (): void => {
      outstanding++;
      req.offset = nextOffset();
      engine.submitCb(req, onComplete);
    };
    const after = (): void => {
      outstanding--;
      if (!stop) issue();
      else if (outstanding === 0) drained();
    };
    const onDone = (): void => {
      done++;
      after();
    };
    const onError = (e: unknown): void => {
      errors++;
      if (firstError === null) firstError = e instanceof Error ? e.message : String(e);
      after();
    };
    return issue;
  });

  for (const issue of slots) issue();
  await new Promise((r) => setTimeout(r, warmupSeconds * 1000));
  const done0 = done;
  const cpu0 = process.cpuUsage();
  const t0 = process.hrtime.bigint();
  await new Promise((r) => setTimeout(r, seconds * 1000));
  const done1 = done;
  const cpu1 = process.cpuUsage(cpu0);
  const t1 = process.hrtime.bigint();
  stop = true;
  await allDone;
  const secs = Number(t1 - t0) / 1e9;
  const ios = done1 - done0;
  return {
    ios,
    seconds: secs,
    iops: ios / secs,
    bytesPerSec: (ios * w.bs) / secs,
    cpuUsPerIo: ios > 0 ? (cpu1.user + cpu1.system) / ios : NaN,
    errors,
    firstError,
  };
}

export interface RemapRun {
  requested: number;
  remapped: number;
  other: Record<string, number>;
  ms: number;
  calls: number;
  /** Metadata sequence numbers used: one per disk commit. */
  diskCommits: number;
  firstFailure: string | null;
}

/**
 * Remaps `count` distinct scattered blocks with `calls` concurrent
 * remapBlocks() calls (each handles its share one block at a time, so the
 * calls' commits meet in the metadata writer and group-commit).
 */
export async function remapScattered(engine: BlockEngine, count: number, calls: number, seed = 42): Promise<RemapRun> {
  const rand = xorshift32(seed);
  const chosen = new Set<number>();
  if (count > engine.blocks) throw new Error(`cannot remap ${count} of ${engine.blocks} blocks`);
  while (chosen.size < count) chosen.add(rand() % engine.blocks);
  const all = [...chosen];
  const shares: number[][] = Array.from({ length: calls }, () => []);
  all.forEach((b, i) => shares[i % calls].push(b));
  const seq0 = engine.status().metadataSeq;
  const t0 = performance.now();
  const results = (await Promise.all(shares.map((s) => engine.remapBlocks(s)))).flat();
  const ms = performance.now() - t0;
  const other: Record<string, number> = {};
  let remapped = 0;
  let firstFailure: string | null = null;
  for (const r of results) {
    if (r.result === 'remapped') remapped++;
    else {
      other[r.result] = (other[r.result] ?? 0) + 1;
      if (firstFailure === null) firstFailure = 'reason' in r ? r.reason : r.result;
    }
  }
  return { requested: count, remapped, other, ms, calls, diskCommits: engine.status().metadataSeq - seq0, firstFailure };
}
