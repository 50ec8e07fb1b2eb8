/**
 * Drives a BlockEngine from JS at a fixed queue depth: QD requests stay
 * outstanding through engine.submitCb() (the frontends' path), each completion issues the next.
 */
import { allocAligned } from '../src/native/backing.js';
import type { BlockEngine, EngineRequest } from '../src/engine/engine.js';
import type { RemapError } from '../src/errors.js';
import { sleep, xorshift32 } from './util.js';

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

/**
 * A closed loop of `w.qd` requests against one engine that can be started
 * and stopped again: each completion issues the next request until stop().
 * Counts completions and errors over its whole life; a request that fails
 * takes its slot out of the loop until the next start().
 */
export class EngineLoad {
  done = 0;
  errors = 0;
  firstError: string | null = null;
  private stopping = false;
  private outstanding = 0;
  private drained: (() => void) | null = null;
  private readonly issuers: Array<() => void>;

  constructor(
    engine: BlockEngine,
    readonly w: Workload,
    seed = 1,
  ) {
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
    this.issuers = Array.from({ length: w.qd }, (_, slot) => {
      const buffer = allocAligned(w.bs, 4096, true);
      if (w.op === 'write') {
        const r = xorshift32(seed * 7919 + slot + 1);
        const u32 = new Uint32Array(buffer.buffer, buffer.byteOffset, buffer.byteLength >>> 2);
        for (let i = 0; i < u32.length; i++) u32[i] = r();
      }
      // submitCb, as the frontends (NBD, ublk) drive the engine: no promise per request.
      const req: EngineRequest = { op: w.op, offset: 0, length: w.bs, buffer };
      const issue = (): void => {
        this.outstanding++;
        req.offset = nextOffset();
        engine.submitCb(req, onComplete);
      };
      const onComplete = (err: RemapError | null): void => {
        this.outstanding--;
        if (err === null) {
          this.done++;
          if (!this.stopping) return issue();
        } else {
          // A failed slot issues nothing more until the next start(): an
          // engine that fails at once would otherwise spin in microtasks.
          this.errors++;
          if (this.firstError === null) this.firstError = err.message;
        }
        if (this.outstanding === 0) this.drained?.();
      };
      return issue;
    });
  }

  /** Fills the queue; throws while requests from the last start() are still outstanding. */
  start(): void {
    if (this.outstanding > 0) throw new Error('EngineLoad.start: still running');
    this.stopping = false;
    for (const issue of this.issuers) issue();
  }

  /** Issues no more requests; resolves once every outstanding one has finished. */
  stop(): Promise<void> {
    this.stopping = true;
    if (this.outstanding === 0) return Promise.resolve();
    return new Promise<void>((r) => {
      this.drained = () => {
        this.drained = null;
        r();
      };
    });
  }
}

function loadResult(w: Workload, ios: number, secs: number, cpuUs: number, load: EngineLoad): LoadResult {
  return {
    ios,
    seconds: secs,
    iops: ios / secs,
    bytesPerSec: (ios * w.bs) / secs,
    cpuUsPerIo: ios > 0 ? cpuUs / ios : NaN,
    errors: load.errors,
    firstError: load.firstError,
  };
}

/** Runs `w` for warmupSeconds untimed, then seconds timed; resolves once every request has finished. */
export async function runEngineLoad(engine: BlockEngine, w: Workload, seconds: number, warmupSeconds: number, seed = 1): Promise<LoadResult> {
  const load = new EngineLoad(engine, w, seed);
  load.start();
  await sleep(warmupSeconds * 1000);
  const done0 = load.done;
  const cpu0 = process.cpuUsage();
  const t0 = process.hrtime.bigint();
  await sleep(seconds * 1000);
  const done1 = load.done;
  const cpu1 = process.cpuUsage(cpu0);
  const t1 = process.hrtime.bigint();
  await load.stop();
  return loadResult(w, done1 - done0, Number(t1 - t0) / 1e9, cpu1.user + cpu1.system, load);
}

/**
 * Two loads on the same disk in alternating slices (A B B A A B ...), so
 * that the disk's drift over seconds hits both alike. Each slice runs one
 * load for sliceSeconds; completions are counted from its start until it is
 * told to stop, and the drain that follows is not timed. Each load runs
 * `seconds` in all.
 */
export async function runSliced(a: EngineLoad, b: EngineLoad, seconds: number, sliceSeconds: number): Promise<{ a: LoadResult; b: LoadResult }> {
  const slices = Math.max(1, Math.round(seconds / sliceSeconds));
  const acc = new Map<EngineLoad, { ios: number; ns: bigint; cpuUs: number }>([
    [a, { ios: 0, ns: 0n, cpuUs: 0 }],
    [b, { ios: 0, ns: 0n, cpuUs: 0 }],
  ]);
  for (let i = 0; i < 2 * slices; i++) {
    // A B B A order: a drift that is linear in time costs both loads the same.
    const load = [a, b, b, a][i % 4];
    const s = acc.get(load)!;
    const done0 = load.done;
    const cpu0 = process.cpuUsage();
    const t0 = process.hrtime.bigint();
    load.start();
    await sleep(sliceSeconds * 1000);
    s.ios += load.done - done0;
    s.ns += process.hrtime.bigint() - t0;
    const cpu1 = process.cpuUsage(cpu0);
    s.cpuUs += cpu1.user + cpu1.system;
    await load.stop();
  }
  const result = (load: EngineLoad): LoadResult => {
    const s = acc.get(load)!;
    return loadResult(load.w, s.ios, Number(s.ns) / 1e9, s.cpuUs, load);
  };
  return { a: result(a), b: result(b) };
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
