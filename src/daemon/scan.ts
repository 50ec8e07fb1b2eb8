/**
 * A surface read scan of a device through its engine: reads [startBlock,
 * endBlock) in chunks, and a chunk that fails block by block, so that each
 * unreadable block is found. The engine's read-error policy does the rest:
 * an unreadable block becomes pending, a remapped block is read from the
 * spare. Optionally each unreadable (pending) block is then remapped with
 * zeroed data. Used by `remapctl scan` (one job per device) and by the
 * background scrub (scrub.ts), which pauses it while clients are busy.
 *
 * No timer outlives the run: waits are abortable sleeps, and cancel()
 * (device removal, scanCancel) ends the run at the next chunk boundary.
 */
import type { Logger } from 'pino';
import type { BlockEngine, ManualRemapResult } from '../engine/engine.js';
import { ERRNO, RemapError, errnoName } from '../errors.js';
import { allocAligned } from '../native/backing.js';
import { errorBody, type ControlErrorBody } from './protocol.js';
import { TokenBucket } from './token-bucket.js';

export type ScanKind = 'scan' | 'scrub';
export type ScanState = 'running' | 'paused' | 'done' | 'cancelled' | 'failed';

/** Blocks listed by number in a snapshot; the count goes on past it. */
export const MAX_LISTED_BLOCKS = 10_000;
export const DEFAULT_CHUNK_BYTES = 1024 * 1024;
const PROGRESS_LOG_MS = 5000;

export interface ScanSnapshot {
  jobId: string;
  kind: ScanKind;
  device: string;
  state: ScanState;
  /** Why a running scrub waits (client I/O, a manual scan); null when not paused. */
  pauseReason: string | null;
  blockSize: number;
  startBlock: number;
  /** Exclusive. */
  endBlock: number;
  /** The first block not yet scanned. */
  nextBlock: number;
  blocksDone: number;
  blocksTotal: number;
  bytesDone: number;
  /** 0..100, one decimal. */
  percent: number;
  startedAt: string;
  finishedAt: string | null;
  elapsedMs: number;
  /** Time spent paused (scrub); not counted in the measured rate. */
  pausedMs: number;
  /** Bytes per second over the time not paused (rate-limit waits included). */
  rateBytesPerSec: number;
  etaMs: number | null;
  /** The --rate / rateMBps limit in bytes per second; null: unlimited. */
  limitBytesPerSec: number | null;
  /** The rate limiter's own accounting: time it made the scan wait, and how often. */
  throttledMs: number;
  throttledChunks: number;
  /** Unreadable blocks found (count) and the first MAX_LISTED_BLOCKS of them. */
  unreadable: number;
  unreadableBlocks: number[];
  /** Of those, how many the engine holds as pending at the moment of finding. */
  pending: number;
  remapUnreadable: 'zero' | null;
  /** Unreadable blocks remapped with zeroed data (--remap-unreadable --zero). */
  zeroed: number;
  remapFailed: Array<{ block: number; errno: number; reason: string }>;
  cancelReason: string | null;
  error: ControlErrorBody | null;
}

export interface ScanOptions {
  kind: ScanKind;
  jobId: string;
  engine: BlockEngine;
  startBlock: number;
  endBlock: number;
  /** Bytes per second; undefined: unlimited. */
  rateBytesPerSec?: number;
  chunkBytes?: number;
  remapUnreadable?: 'zero';
  logger: Logger;
  /** Awaited before each chunk (the scrub pauses here while clients are busy). */
  gate?: (run: ScanRun, signal: AbortSignal) => Promise<void>;
  /** Called once per engine request the scan issued (so client activity can be told from the scan's own). */
  onOwnRequest?: () => void;
}

/** A timer-backed wait that an abort ends at once (and clears). */
export function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted || ms <= 0) {
      resolve();
      return;
    }
    const done = (): void => {
      clearTimeout(timer);
      signal.removeEventListener('abort', done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    timer.unref();
    signal.addEventListener('abort', done, { once: true });
  });
}

function unreadable(err: unknown): boolean {
  return err instanceof RemapError && err.errno === ERRNO.EIO;
}

export class ScanRun {
  readonly jobId: string;
  readonly kind: ScanKind;
  readonly device: string;
  readonly startBlock: number;
  readonly endBlock: number;
  private readonly engine: BlockEngine;
  private readonly log: Logger;
  private readonly chunkBlocks: number;
  private readonly bucket: TokenBucket | null;
  private readonly abort = new AbortController();
  private readonly started = Date.now();
  private finished: number | null = null;
  private stateValue: ScanState = 'running';
  private pauseReasonValue: string | null = null;
  private pauseStart = 0;
  private pausedMs = 0;
  private next: number;
  private found = 0;
  private readonly listed: number[] = [];
  private pendingFound = 0;
  private zeroed = 0;
  private readonly remapFailed: ScanSnapshot['remapFailed'] = [];
  private cancelReason: string | null = null;
  private error: ControlErrorBody | null = null;
  private lastLogAt = Date.now();
  private lastLogTenth = 0;
  private zeroBlock: Buffer | null = null;

  constructor(private readonly o: ScanOptions) {
    this.jobId = o.jobId;
    this.kind = o.kind;
    this.engine = o.engine;
    this.device = o.engine.name;
    this.startBlock = o.startBlock;
    this.endBlock = o.endBlock;
    this.next = o.startBlock;
    this.log = o.logger.child({ device: this.device, jobId: o.jobId });
    const bs = o.engine.blockSize;
    this.chunkBlocks = Math.max(1, Math.floor((o.chunkBytes ?? DEFAULT_CHUNK_BYTES) / bs));
    this.bucket = o.rateBytesPerSec === undefined ? null : new TokenBucket(o.rateBytesPerSec, this.chunkBlocks * bs, Date.now());
  }

  get state(): ScanState {
    return this.stateValue;
  }

  get active(): boolean {
    return this.stateValue === 'running' || this.stateValue === 'paused';
  }

  /** The first block not yet scanned (where a stopped run resumes). */
  get nextBlock(): number {
    return this.next;
  }

  get signal(): AbortSignal {
    return this.abort.signal;
  }

  /** Stops the run at the next chunk boundary (a wait in progress ends at once). */
  cancel(reason: string): void {
    if (!this.active || this.abort.signal.aborted) return;
    this.cancelReason = reason;
    this.abort.abort();
  }

  /** The gate holds the run: counted as paused time, logged once per pause. */
  pause(reason: string): void {
    if (this.stateValue === 'paused') {
      this.pauseReasonValue = reason; // still paused: no new log line
      return;
    }
    if (this.stateValue !== 'running') return;
    this.pauseStart = Date.now();
    this.stateValue = 'paused';
    this.pauseReasonValue = reason;
    this.log.info({ event: `${this.kind}-paused`, reason, nextBlock: this.next }, `${this.kind} of ${this.device} paused at block ${this.next}: ${reason}`);
  }

  resume(): void {
    if (this.stateValue !== 'paused') return;
    const ms = Date.now() - this.pauseStart;
    this.pausedMs += ms;
    this.stateValue = 'running';
    this.pauseReasonValue = null;
    this.log.info({ event: `${this.kind}-resumed`, nextBlock: this.next, pausedMs: ms }, `${this.kind} of ${this.device} resumed at block ${this.next} after ${ms} ms`);
  }

  /** A run that ends while paused: the pause counts, without a resumed line. */
  private endPause(): void {
    if (this.stateValue !== 'paused') return;
    this.pausedMs += Date.now() - this.pauseStart;
    this.stateValue = 'running';
    this.pauseReasonValue = null;
  }

  snapshot(): ScanSnapshot {
    const bs = this.engine.blockSize;
    const now = this.finished ?? Date.now();
    const pausedMs = this.pausedMs + (this.stateValue === 'paused' ? now - this.pauseStart : 0);
    const blocksTotal = this.endBlock - this.startBlock;
    const blocksDone = this.next - this.startBlock;
    const activeMs = Math.max(1, now - this.started - pausedMs);
    const rate = Math.round((blocksDone * bs * 1000) / activeMs);
    return {
      jobId: this.jobId,
      kind: this.kind,
      device: this.device,
      state: this.stateValue,
      pauseReason: this.pauseReasonValue,
      blockSize: bs,
      startBlock: this.startBlock,
      endBlock: this.endBlock,
      nextBlock: this.next,
      blocksDone,
      blocksTotal,
      bytesDone: blocksDone * bs,
      percent: Math.floor((blocksDone * 1000) / blocksTotal) / 10,
      startedAt: new Date(this.started).toISOString(),
      finishedAt: this.finished === null ? null : new Date(this.finished).toISOString(),
      elapsedMs: now - this.started,
      pausedMs,
      rateBytesPerSec: rate,
      etaMs: !this.active ? 0 : rate > 0 ? Math.round(((blocksTotal - blocksDone) * bs * 1000) / rate) : null,
      limitBytesPerSec: this.bucket?.rate ?? null,
      throttledMs: this.bucket?.waitedMs ?? 0,
      throttledChunks: this.bucket?.throttled ?? 0,
      unreadable: this.found,
      unreadableBlocks: [...this.listed],
      pending: this.pendingFound,
      remapUnreadable: this.o.remapUnreadable ?? null,
      zeroed: this.zeroed,
      remapFailed: this.remapFailed.slice(0, MAX_LISTED_BLOCKS),
      cancelReason: this.cancelReason,
      error: this.error,
    };
  }

  /** Runs to the end (or cancel, or a non-media error). Never rejects. */
  async run(): Promise<ScanSnapshot> {
    const bs = this.engine.blockSize;
    const buf = allocAligned(this.chunkBlocks * bs, 4096, true);
    const signal = this.abort.signal;
    this.log.info({
      event: `${this.kind}-started`, startBlock: this.startBlock, endBlock: this.endBlock, blockSize: bs,
      limitBytesPerSec: this.bucket?.rate ?? null, remapUnreadable: this.o.remapUnreadable ?? null,
    }, `${this.kind} of ${this.device} started: blocks ${this.startBlock}..${this.endBlock - 1}`);
    try {
      while (this.next < this.endBlock && !signal.aborted) {
        if (this.o.gate !== undefined) {
          await this.o.gate(this, signal);
          if (signal.aborted) break;
        }
        const n = Math.min(this.chunkBlocks, this.endBlock - this.next);
        if (this.bucket !== null) {
          await sleep(this.bucket.take(n * bs, Date.now()), signal);
          if (signal.aborted) break;
        }
        if (!(await this.scanChunk(this.next, n, buf, signal))) break;
        this.next += n;
        this.progressLog();
      }
      this.endPause();
      this.stateValue = signal.aborted ? 'cancelled' : 'done';
    } catch (err) {
      this.endPause();
      if (signal.aborted) {
        this.stateValue = 'cancelled';
      } else {
        this.stateValue = 'failed';
        const body = errorBody(err);
        this.error = { ...body, message: `${this.kind} of ${this.device} stopped at block ${this.next}: ${body.message}` };
      }
    }
    this.finished = Date.now();
    const s = this.snapshot();
    const summary = {
      event: `${this.kind}-finished`, state: s.state, blocksDone: s.blocksDone, blocksTotal: s.blocksTotal, nextBlock: s.nextBlock,
      elapsedMs: s.elapsedMs, pausedMs: s.pausedMs, rateBytesPerSec: s.rateBytesPerSec, throttledMs: s.throttledMs,
      unreadable: s.unreadable, unreadableBlocks: s.unreadableBlocks.slice(0, 100), zeroed: s.zeroed, remapFailed: s.remapFailed.length,
      cancelReason: s.cancelReason, error: s.error,
    };
    const text = `${this.kind} of ${this.device} ${s.state}: ${s.blocksDone}/${s.blocksTotal} blocks, ${s.unreadable} unreadable`
      + `${s.zeroed > 0 ? `, ${s.zeroed} remapped with zeroes` : ''}${s.cancelReason !== null ? ` (${s.cancelReason})` : ''}${s.error !== null ? `: ${s.error.message}` : ''}`;
    if (s.state === 'failed' || s.remapFailed.length > 0) this.log.error(summary, text);
    else if (s.unreadable > 0) this.log.warn(summary, text);
    else this.log.info(summary, text);
    return s;
  }

  /** One engine read, counted as the scan's own request. */
  private async read(first: number, blocks: number, buf: Buffer): Promise<void> {
    const bs = this.engine.blockSize;
    try {
      await this.engine.submit({ op: 'read', offset: first * bs, length: blocks * bs, buffer: buf });
    } catch (err) {
      // A request refused at the door (device stopping) never reached the counters.
      if (!(err instanceof RemapError && err.errno === ERRNO.ESHUTDOWN)) this.o.onOwnRequest?.();
      throw err;
    }
    this.o.onOwnRequest?.();
  }

  /** Reads one chunk; on a media error, block by block. False: cancelled mid-chunk. */
  private async scanChunk(first: number, n: number, buf: Buffer, signal: AbortSignal): Promise<boolean> {
    try {
      await this.read(first, n, buf);
      return true;
    } catch (err) {
      if (!unreadable(err)) throw err;
    }
    const found: number[] = [];
    for (let b = first; b < first + n; b++) {
      if (signal.aborted) return false;
      try {
        await this.read(b, 1, buf);
      } catch (err) {
        if (!unreadable(err)) throw err;
        found.push(b);
      }
    }
    for (const b of found) {
      const pending = this.engine.isPending(b);
      this.found++;
      if (pending) this.pendingFound++;
      if (this.listed.length < MAX_LISTED_BLOCKS) this.listed.push(b);
      this.log.warn({ event: `${this.kind}-unreadable`, block: b, errno: errnoName(ERRNO.EIO), pending },
        `${this.kind} of ${this.device}: block ${b} is unreadable (EIO)${pending ? '; it is pending (remapped on its next write)' : ''}`);
    }
    if (found.length > 0 && this.o.remapUnreadable === 'zero') await this.remapZeroed(found);
    return true;
  }

  /**
   * Remaps the found blocks with zeroed data. Only blocks the engine holds as
   * pending: a pending block cannot be written on main behind our back (its
   * next write is a remap), so a client's newer data is never zeroed.
   */
  private async remapZeroed(blocks: number[]): Promise<void> {
    const bs = this.engine.blockSize;
    if (this.zeroBlock === null) this.zeroBlock = allocAligned(bs).fill(0);
    const items: Array<{ block: number; data: Uint8Array; seen: number }> = [];
    for (const b of blocks) {
      if (this.engine.isPending(b)) {
        items.push({ block: b, data: this.zeroBlock, seen: this.engine.lookup(b) });
      } else {
        this.remapFailed.push({ block: b, errno: ERRNO.EIO, reason: `block ${b} is unreadable but could not be recorded as pending; not zeroed` });
      }
    }
    if (items.length === 0) return;
    let results: ManualRemapResult[];
    try {
      results = await this.engine.remapBlocksWithData(items);
    } catch (err) {
      const body = errorBody(err);
      for (const it of items) this.remapFailed.push({ block: it.block, errno: body.errno ?? ERRNO.EIO, reason: body.message });
      return;
    }
    for (const r of results) {
      if (r.result === 'remapped') {
        this.zeroed++;
        this.log.warn({ event: `${this.kind}-zeroed`, block: r.block, spare: r.spare },
          `${this.kind} of ${this.device}: unreadable block ${r.block} remapped to spare block ${r.spare} with zeroed data`);
      } else if (r.result === 'already-remapped') {
        this.log.info({ event: `${this.kind}-zero-skipped`, block: r.block, spare: r.spare },
          `${this.kind} of ${this.device}: block ${r.block} was written meanwhile (spare block ${r.spare}); not zeroed`);
      } else {
        const errno = r.result === 'failed' ? r.errno : ERRNO.EIO;
        this.remapFailed.push({ block: r.block, errno, reason: r.reason });
      }
    }
  }

  private progressLog(): void {
    const now = Date.now();
    const total = this.endBlock - this.startBlock;
    const tenth = Math.floor(((this.next - this.startBlock) * 10) / total);
    if (now - this.lastLogAt < PROGRESS_LOG_MS && tenth <= this.lastLogTenth) return;
    if (this.next >= this.endBlock) return; // the finish line says it
    this.lastLogAt = now;
    this.lastLogTenth = tenth;
    const s = this.snapshot();
    this.log.info({
      event: `${this.kind}-progress`, percent: s.percent, blocksDone: s.blocksDone, blocksTotal: s.blocksTotal, nextBlock: s.nextBlock,
      rateBytesPerSec: s.rateBytesPerSec, etaMs: s.etaMs, unreadable: s.unreadable, throttledMs: s.throttledMs,
    }, `${this.kind} of ${this.device}: ${s.percent}% (${s.blocksDone}/${s.blocksTotal} blocks), ${s.unreadable} unreadable`);
  }
}
