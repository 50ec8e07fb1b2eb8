/**
 * Asynchronous group-committing metadata writer: appends journal commits to
 * both copies, checkpoints the full state in the background, and never
 * reuses a sequence number or a journal slot while an abandoned write may
 * still land. See docs/FORMAT.md ("Writer").
 */
import { setImmediate as nextMacrotask } from 'node:timers/promises';
import { ERRNO, RemapError, errnoOf } from '../errors.js';
import { CHECKPOINT_MAGIC, JOURNAL_MAGIC, blocksForRecords, encodeBlocks, formatIdOf, recordOffsetInBlocks, sealBlocks } from './format.js';
import { META_BLOCK, type MetaIO } from './io.js';
import { RECORDS_PER_BLOCK, type Layout } from './layout.js';
import { encodeRecord, validateRecord, type MetaRecord } from './records.js';
import type { LoadedMetadata } from './store.js';
import { COMMIT_LATENCY_BUCKETS_MS, LatencyHistogram, type HistogramSnapshot } from './histogram.js';

export interface MetaLogger {
  info(obj: object, msg?: string): void;
  warn(obj: object, msg?: string): void;
  error(obj: object, msg?: string): void;
}

const NOOP_LOGGER: MetaLogger = { info() {}, warn() {}, error() {} };

export interface WriterOptions {
  /** Default per-commit timeout (ms). Default 5000. */
  timeoutMs?: number;
  /**
   * Full state as records, for checkpoints. Called synchronously, from a
   * fresh macrotask. It must include the effects of every commit whose
   * promise has resolved (apply a commit's records in the continuation of
   * `await commit()`, before any other await); it may also include effects
   * of commits still in flight. It must not include records of commits
   * that failed.
   *
   * The returned iterable is consumed in slices over later macrotasks (the
   * writer yields to the event loop every few ms, and commits go on
   * meanwhile), so it must be a point-in-time view: take copies of the
   * state when called (e.g. RemapTable.copyEntries()) and iterate those,
   * not structures that later commits change. Its first element is
   * requested in the same macrotask as the call.
   */
  snapshot: () => Iterable<MetaRecord>;
  /** Journal fill ratio that starts a background checkpoint. Default 0.7. */
  checkpointThreshold?: number;
  /** Upper bound of blocks per disk commit. Default min(256, journalBlocks / 4). */
  maxCommitBlocks?: number;
  logger?: MetaLogger;
}

export interface CommitOptions {
  signal?: AbortSignal;
  timeoutMs?: number;
}

export interface WriterStats {
  seq: number;
  /** Disk commits that completed (written to both copies and synced). */
  commits: number;
  failedCommits: number;
  /** Disk commits whose every waiter gave up (timeout/abort) before the disk answered. */
  abandonedCommits: number;
  /** Records in completed commits. */
  records: number;
  /** commit() calls that resolved. */
  commitCalls: number;
  timeouts: number;
  cancellations: number;
  journalBlocks: number;
  journalBlocksInUse: number;
  journalBlocksWritten: number;
  checkpoints: number;
  failedCheckpoints: number;
  checkpointSeq: number;
  /** Writes issued and not settled yet (a hung disk keeps them here). */
  outstandingWrites: number;
  lastCommitMs: number;
  p50CommitMs: number;
  p99CommitMs: number;
}

interface Waiter {
  records: readonly MetaRecord[];
  resolve: (seq: number) => void;
  reject: (err: RemapError) => void;
  settled: boolean;
  timer: NodeJS.Timeout | undefined;
  cleanup: () => void;
  /** Set once its records are issued to disk. */
  seq: number | undefined;
}

const LAT_SAMPLES = 1024;

/**
 * A checkpoint's CPU work (validating, encoding with CRC32C) runs in slices
 * of about this many ms, with a yield to the event loop between them, so a
 * checkpoint of a large table never stalls I/O and commits for long.
 */
const CKPT_SLICE_MS = 4;
/** Records pulled from the snapshot, validated and encoded between two clock checks. */
const CKPT_RECORD_STEP = 1024;
/** Blocks sealed (header + CRC32C) between two clock checks (~0.1-0.3 ms). */
const CKPT_BLOCK_STEP = 8;
/** Blocks per checkpoint piece (1 MiB): the unit of encoding buffers and of writes. */
const CKPT_WRITE_BLOCKS = 256;
const CKPT_PIECE_RECORDS = CKPT_WRITE_BLOCKS * RECORDS_PER_BLOCK;

export class MetadataWriter {
  private readonly layout: Layout;
  private readonly formatId: Uint8Array;
  private readonly J: number;
  private readonly dev: string;
  private readonly timeoutMs: number;
  private readonly snapshot: () => Iterable<MetaRecord>;
  private readonly threshold: number;
  private readonly maxCommitRecords: number;
  private readonly log: MetaLogger;

  private readonly slotSeq: Float64Array;
  private readonly slotBusy: Uint32Array;
  private head: number;
  private nextSeq: number;
  /** Every commit <= this is finished: durable, or failed/abandoned (its callers were told). */
  private finishedSeq: number;
  private ckptSeq: number;
  private ckptSlot: 0 | 1;
  private readonly ckptSlotBusy: [number, number] = [0, 0];

  private queue: Waiter[] = [];
  private current: Waiter[] = [];
  private currentIssued = false;
  private running = false;
  private ckptRun: Promise<void> | undefined;
  private ckptFailures = 0;
  private closed = false;
  private closePromise: Promise<void> | undefined;
  /** Aborted when close() gives up: every internal wait stops. */
  private readonly stopCtl = new AbortController();
  private wakers: (() => void)[] = [];
  private outstanding = 0;

  private readonly st = {
    commits: 0,
    failedCommits: 0,
    abandonedCommits: 0,
    records: 0,
    commitCalls: 0,
    timeouts: 0,
    cancellations: 0,
    journalBlocksWritten: 0,
    checkpoints: 0,
    failedCheckpoints: 0,
    lastCommitMs: 0,
  };
  private readonly lat = new Float64Array(LAT_SAMPLES);
  private latN = 0;
  /** Latency of completed disk commits (both copies written and synced), for metrics. */
  private readonly latHist = new LatencyHistogram(COMMIT_LATENCY_BUCKETS_MS);

  constructor(
    private readonly io: MetaIO,
    loaded: LoadedMetadata,
    opts: WriterOptions,
  ) {
    this.layout = loaded.layout;
    this.J = loaded.layout.journalBlocks;
    this.formatId = formatIdOf(loaded.identity.deviceUuid);
    this.dev = io.describe();
    this.timeoutMs = opts.timeoutMs ?? 5000;
    this.snapshot = opts.snapshot;
    this.threshold = opts.checkpointThreshold ?? 0.7;
    const maxBlocks = Math.max(1, Math.min(opts.maxCommitBlocks ?? 256, Math.floor(this.J / 4)));
    this.maxCommitRecords = maxBlocks * RECORDS_PER_BLOCK;
    this.log = opts.logger ?? NOOP_LOGGER;
    if (loaded.journal.slotSeqs.length !== this.J) throw new RemapError(ERRNO.EINVAL, 'loaded journal does not match the layout');
    this.slotSeq = Float64Array.from(loaded.journal.slotSeqs);
    this.slotBusy = new Uint32Array(this.J);
    this.head = loaded.journal.head;
    this.nextSeq = loaded.seq + 1;
    this.finishedSeq = loaded.seq;
    this.ckptSeq = loaded.checkpoint.seq;
    this.ckptSlot = loaded.checkpoint.slot;
  }

  /** Highest sequence number used (issued) so far. */
  get seq(): number {
    return this.nextSeq - 1;
  }

  /** Most records one commit() call may carry. */
  get maxRecordsPerCommit(): number {
    return this.maxCommitRecords;
  }

  /**
   * Appends `records` durably. Resolves with the commit's seq once its
   * journal blocks are on both copies and synced. Rejects with ETIMEDOUT /
   * ECANCELED (timeout, abort, close), EINVAL, or the I/O errno.
   */
  commit(records: readonly MetaRecord[], opts: CommitOptions = {}): Promise<number> {
    const ctx = { device: this.dev, op: 'metadata-commit' };
    if (this.closed) return Promise.reject(new RemapError(ERRNO.ECANCELED, `metadata writer of ${this.dev} is closed`, ctx));
    try {
      for (const r of records) validateRecord(r);
    } catch (e) {
      return Promise.reject(e);
    }
    if (records.length > this.maxCommitRecords)
      return Promise.reject(new RemapError(ERRNO.EINVAL, `one commit carries at most ${this.maxCommitRecords} records, got ${records.length}`, ctx));
    const signal = opts.signal;
    if (signal?.aborted) return Promise.reject(new RemapError(ERRNO.ECANCELED, `metadata commit on ${this.dev} aborted before it was queued`, ctx));
    const timeoutMs = opts.timeoutMs ?? this.timeoutMs;
    return new Promise<number>((resolve, reject) => {
      const w: Waiter = {
        records,
        settled: false,
        timer: undefined,
        seq: undefined,
        cleanup: () => {},
        resolve: (seq) => {
          if (w.settled) return;
          w.settled = true;
          w.cleanup();
          this.st.commitCalls++;
          resolve(seq);
        },
        reject: (err) => {
          if (w.settled) return;
          w.settled = true;
          w.cleanup();
          reject(err);
          this.wake();
        },
      };
      const where = (): string =>
        w.seq !== undefined
          ? `commit seq ${w.seq} on ${this.dev} (already issued: it may still land; its journal slots stay reserved)`
          : `commit on ${this.dev} (not issued yet: its records are dropped)`;
      const onAbort = (): void => {
        this.st.cancellations++;
        w.reject(new RemapError(ERRNO.ECANCELED, `metadata ${where()} aborted`, ctx, { cause: signal?.reason }));
      };
      w.timer = setTimeout(() => {
        this.st.timeouts++;
        w.reject(new RemapError(ERRNO.ETIMEDOUT, `metadata ${where()} timed out after ${timeoutMs} ms`, ctx));
      }, timeoutMs);
      signal?.addEventListener('abort', onAbort, { once: true });
      w.cleanup = () => {
        if (w.timer) clearTimeout(w.timer);
        w.timer = undefined;
        signal?.removeEventListener('abort', onAbort);
      };
      this.queue.push(w);
      void this.run();
    });
  }

  /** Writes a checkpoint of snapshot() now (after any running one). */
  async checkpoint(): Promise<void> {
    while (this.ckptRun) await this.ckptRun.catch(() => {});
    await this.startCheckpoint('explicit');
  }

  /** Journal slots that may not be overwritten yet. */
  journalBlocksInUse(): number {
    let n = 0;
    for (let i = 0; i < this.J; i++) if (!this.free(i)) n++;
    return n;
  }

  /** Histogram of completed disk commits' latency (issue + both copies + sync). */
  commitLatency(): HistogramSnapshot {
    return this.latHist.snapshot();
  }

  stats(): WriterStats {
    const n = Math.min(this.latN, LAT_SAMPLES);
    const sorted = Array.from(this.lat.subarray(0, n)).sort((a, b) => a - b);
    const pct = (p: number): number => (n === 0 ? 0 : sorted[Math.min(n - 1, Math.floor(p * n))]);
    return {
      seq: this.seq,
      ...this.st,
      journalBlocks: this.J,
      journalBlocksInUse: this.journalBlocksInUse(),
      checkpointSeq: this.ckptSeq,
      outstandingWrites: this.outstanding,
      p50CommitMs: pct(0.5),
      p99CommitMs: pct(0.99),
    };
  }

  /**
   * Stops the writer. Queued commits fail at once with ECANCELED; the
   * commit and checkpoint in flight get until the deadline, then their
   * waiters fail with ECANCELED. Resolves within `timeoutMs` even when the
   * disk hangs, and leaves no timer or listener behind (writes the disk
   * never answers stay pending in the I/O layer).
   */
  close(timeoutMs = this.timeoutMs): Promise<void> {
    if (this.closePromise) return this.closePromise;
    this.closed = true;
    const ctx = { device: this.dev, op: 'metadata-commit' };
    const q = this.queue;
    this.queue = [];
    const notIssued = this.currentIssued ? [] : this.current;
    for (const w of [...q, ...notIssued])
      w.reject(new RemapError(ERRNO.ECANCELED, `metadata writer of ${this.dev} closed before the commit was issued`, ctx));
    this.closePromise = (async () => {
      let timer: NodeJS.Timeout | undefined;
      let expired = false;
      timer = setTimeout(() => {
        expired = true;
        this.wake();
      }, Math.max(0, timeoutMs));
      try {
        while (!expired && (this.running || this.ckptRun)) await this.waitWake();
      } finally {
        clearTimeout(timer);
        timer = undefined;
      }
      if (expired) {
        for (const w of this.current)
          w.reject(new RemapError(ERRNO.ECANCELED, `metadata writer of ${this.dev} closed while commit seq ${w.seq ?? '?'} was in flight (it may still land)`, ctx));
        this.stopCtl.abort();
        this.wake();
        this.log.warn({ event: 'metadata-close-timeout', device: this.dev, outstandingWrites: this.outstanding }, 'metadata writer closed with I/O outstanding');
      }
    })();
    return this.closePromise;
  }

  // ------------------------------------------------------------ internals

  private wake(): void {
    const w = this.wakers;
    this.wakers = [];
    for (const f of w) f();
  }

  private waitWake(): Promise<void> {
    return new Promise<void>((r) => this.wakers.push(r));
  }

  private free(i: number): boolean {
    return this.slotSeq[i] <= this.ckptSeq && this.slotBusy[i] === 0;
  }

  /**
   * First run of `n` free slots at or after the head (wrapping; a commit
   * never wraps inside itself). Slots still held by an outstanding write
   * are skipped, so one hung write never blocks the ring.
   */
  private alloc(n: number): number {
    const J = this.J;
    let scanned = 0;
    let at = this.head + n > J ? 0 : this.head;
    while (scanned < J + n) {
      let run = 0;
      while (run < n && this.free(at + run)) run++;
      if (run === n) return at;
      scanned += run + 1;
      at += run + 1;
      if (at + n > J) {
        scanned += J - at;
        at = 0;
      }
    }
    return -1;
  }

  /** Runs `p` but gives up when close() expires. */
  private untilStopped<T>(p: Promise<T>): Promise<T> {
    const sig = this.stopCtl.signal;
    if (sig.aborted) return Promise.reject(new RemapError(ERRNO.ECANCELED, `metadata writer of ${this.dev} closed`, { device: this.dev }));
    return new Promise<T>((resolve, reject) => {
      const onStop = (): void => reject(new RemapError(ERRNO.ECANCELED, `metadata writer of ${this.dev} closed`, { device: this.dev }));
      sig.addEventListener('abort', onStop, { once: true });
      p.then(
        (v) => {
          sig.removeEventListener('abort', onStop);
          resolve(v);
        },
        (e: unknown) => {
          sig.removeEventListener('abort', onStop);
          reject(e);
        },
      );
    });
  }

  /** Issues one write and tracks it until it settles, whatever the callers do. */
  private trackedWrite(offset: number, data: Uint8Array, onSettle: () => void): Promise<void> {
    this.outstanding++;
    let p: Promise<void>;
    try {
      p = this.io.write(offset, data);
    } catch (e) {
      p = Promise.reject(e);
    }
    const settle = (): void => {
      this.outstanding--;
      onSettle();
      this.wake();
    };
    p.then(settle, settle);
    return p;
  }

  private async run(): Promise<void> {
    if (this.running) return;
    this.running = true;
    try {
      while (this.queue.length > 0 && !this.closed) {
        const batch: Waiter[] = [];
        let n = 0;
        while (this.queue.length > 0) {
          const w = this.queue[0];
          if (w.settled) {
            this.queue.shift();
            continue;
          }
          if (batch.length > 0 && n + w.records.length > this.maxCommitRecords) break;
          this.queue.shift();
          batch.push(w);
          n += w.records.length;
        }
        if (batch.length === 0) continue;
        this.current = batch;
        this.currentIssued = false;
        try {
          await this.runBatch(batch);
        } catch (e) {
          const err = e instanceof RemapError ? e : new RemapError(errnoOf(e), String(e), { device: this.dev, op: 'metadata-commit' });
          for (const w of batch) w.reject(err);
        } finally {
          this.current = [];
          this.currentIssued = false;
        }
      }
    } finally {
      this.running = false;
      this.wake();
    }
  }

  private async runBatch(batch: Waiter[]): Promise<void> {
    const ctx = { device: this.dev, op: 'metadata-commit' };
    // 1. Journal space. Waiters that give up meanwhile are dropped unissued.
    let at = -1;
    let live: Waiter[] = [];
    let blocks = 0;
    let ckptFailuresSeen = this.ckptFailures;
    let triggered = false;
    for (;;) {
      live = batch.filter((w) => !w.settled);
      if (live.length === 0 || this.closed) return;
      blocks = blocksForRecords(live.reduce((s, w) => s + w.records.length, 0));
      at = this.alloc(blocks);
      if (at >= 0) break;
      if (triggered && this.ckptFailures !== ckptFailuresSeen && !this.ckptRun) {
        const err = new RemapError(ERRNO.ENOSPC, `metadata journal of ${this.dev} is full and the checkpoint that would free it failed`, ctx);
        for (const w of live) w.reject(err);
        return;
      }
      if (!this.ckptRun && this.finishedSeq > this.ckptSeq) {
        triggered = true;
        ckptFailuresSeen = this.ckptFailures;
        this.backgroundCheckpoint('journal full');
      }
      // Otherwise: slots held by writes still outstanding; wait for them (or for the waiters' deadlines).
      await this.waitWake();
    }

    // 2. Issue: both copies, then one sync.
    const seq = this.nextSeq++;
    const records: MetaRecord[] = [];
    for (const w of live) {
      w.seq = seq;
      for (const r of w.records) records.push(r);
    }
    this.currentIssued = true;
    const buf = encodeBlocks(JOURNAL_MAGIC, this.formatId, seq, records);
    for (let i = at; i < at + blocks; i++) {
      this.slotSeq[i] = seq;
      this.slotBusy[i] += 2;
    }
    this.head = (at + blocks) % this.J;
    const release = (): void => {
      for (let i = at; i < at + blocks; i++) this.slotBusy[i]--;
    };
    const t0 = performance.now();
    const writes = [0, 1].map((c) => this.trackedWrite(this.layout.copies[c].journal + at * META_BLOCK, buf, release));
    let outcome: { ok: true } | { ok: false; err: unknown } | undefined;
    void (async () => {
      await Promise.all(writes);
      await this.io.sync();
    })().then(
      () => {
        outcome = { ok: true };
        this.wake();
      },
      (err: unknown) => {
        outcome = { ok: false, err };
        this.wake();
      },
    );

    // 3. Wait for the disk, or until every waiter has given up.
    while (outcome === undefined && live.some((w) => !w.settled) && !this.stopCtl.signal.aborted) await this.waitWake();
    this.finishedSeq = Math.max(this.finishedSeq, seq);
    if (outcome?.ok) {
      const ms = performance.now() - t0;
      this.st.commits++;
      this.st.records += records.length;
      this.st.journalBlocksWritten += blocks;
      this.st.lastCommitMs = ms;
      this.lat[this.latN++ % LAT_SAMPLES] = ms;
      this.latHist.observe(ms);
      for (const w of live) w.resolve(seq);
    } else if (outcome) {
      this.st.failedCommits++;
      const err = outcome.err;
      const e = new RemapError(errnoOf(err), `metadata commit seq ${seq} on ${this.dev} failed: ${err instanceof Error ? err.message : String(err)}`, ctx, { cause: err });
      this.log.error({ event: 'metadata-commit-failed', device: this.dev, seq, err: e.message }, 'metadata commit failed');
      for (const w of live) w.reject(e);
    } else {
      this.st.abandonedCommits++;
      this.log.warn({ event: 'metadata-commit-abandoned', device: this.dev, seq }, 'metadata commit abandoned by its callers; its write may still land');
    }
    if (!this.closed && !this.ckptRun && this.finishedSeq > this.ckptSeq && this.journalBlocksInUse() >= this.threshold * this.J)
      this.backgroundCheckpoint('journal threshold');
  }

  private backgroundCheckpoint(reason: string): void {
    this.startCheckpoint(reason).catch((e: unknown) => {
      this.log.warn({ event: 'metadata-checkpoint-failed', device: this.dev, reason, err: e instanceof Error ? e.message : String(e) }, 'metadata checkpoint failed');
    });
  }

  private startCheckpoint(reason: string): Promise<void> {
    const p = this.doCheckpoint(reason).finally(() => {
      if (this.ckptRun === p) this.ckptRun = undefined;
      this.wake();
    });
    this.ckptRun = p;
    return p;
  }

  /** Waits until `writes` settle, the checkpoint timeout passes or close() gives up; never rejects. */
  private async settleOrGiveUp(writes: Promise<void>[]): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<void>((r) => {
      timer = setTimeout(r, this.timeoutMs);
    });
    try {
      await this.untilStopped(Promise.race([Promise.allSettled(writes), timeout]));
    } catch {
      // close() gave up
    } finally {
      clearTimeout(timer);
    }
  }

  /** Ends a slice of checkpoint work: yields to the event loop, then stops if the writer was closed meanwhile. */
  private async checkpointYield(ctx: { device: string; op: string }): Promise<void> {
    await nextMacrotask();
    if (this.closed) throw new RemapError(ERRNO.ECANCELED, `metadata writer of ${this.dev} closed during a checkpoint`, ctx);
  }

  private async doCheckpoint(reason: string): Promise<void> {
    const ctx = { device: this.dev, op: 'metadata-checkpoint' };
    const writes: Promise<void>[] = [];
    let issuing = true;
    try {
      if (this.closed) throw new RemapError(ERRNO.ECANCELED, `metadata writer of ${this.dev} is closed`, ctx);
      const slot = (1 - this.ckptSlot) as 0 | 1;
      if (this.ckptSlotBusy[slot] > 0)
        throw new RemapError(ERRNO.EBUSY, `an earlier checkpoint write to slot ${slot} of ${this.dev} is still outstanding`, ctx);
      const covered = this.finishedSeq;
      // Let the continuations of resolved commits apply their records first.
      await nextMacrotask();

      // 1. Snapshot, validate and encode each record straight to its place
      //    in 1 MiB pieces of the encoding, in slices. No record object is
      //    kept (a million of them would cost long GC pauses later). The
      //    snapshot is a point-in-time view (see WriterOptions.snapshot);
      //    its first element is pulled in this macrotask.
      const capacity = this.layout.checkpointCapacity;
      const pieces: Uint8Array[] = [];
      let view: DataView | undefined;
      let total = 0;
      const it = this.snapshot()[Symbol.iterator]();
      let sliceStart = performance.now();
      try {
        for (;;) {
          const r = it.next();
          if (r.done) break;
          validateRecord(r.value);
          if (total === capacity)
            throw new RemapError(ERRNO.ENOSPC, `checkpoint of more than ${capacity} records exceeds the capacity of ${this.dev}`, ctx);
          const inPiece = total % CKPT_PIECE_RECORDS;
          if (inPiece === 0) {
            const piece = new Uint8Array(CKPT_WRITE_BLOCKS * META_BLOCK);
            pieces.push(piece);
            view = new DataView(piece.buffer);
          }
          encodeRecord(view as DataView, recordOffsetInBlocks(inPiece), r.value);
          total++;
          if (total % CKPT_RECORD_STEP === 0 && performance.now() - sliceStart >= CKPT_SLICE_MS) {
            await this.checkpointYield(ctx);
            sliceStart = performance.now();
          }
        }
      } catch (e) {
        it.return?.();
        throw e;
      }

      // 2. Seal the blocks (headers + CRC32C), in slices; each piece goes to
      //    both copies of the slot as soon as it is sealed. The slot does not
      //    hold the current checkpoint, and the new one counts only once
      //    every piece is written and synced, so stopping half-way loses
      //    nothing.
      const count = blocksForRecords(total);
      if (pieces.length === 0) pieces.push(new Uint8Array(META_BLOCK));
      let writeErr: { e: unknown } | undefined;
      for (let p = 0; p < pieces.length; p++) {
        const first = p * CKPT_WRITE_BLOCKS;
        const n = Math.min(CKPT_WRITE_BLOCKS, count - first);
        const buf = pieces[p].subarray(0, n * META_BLOCK);
        for (let b = 0; b < n; ) {
          const k = Math.min(CKPT_BLOCK_STEP, n - b);
          sealBlocks(buf, b * META_BLOCK, CHECKPOINT_MAGIC, this.formatId, covered, total, first + b, k);
          b += k;
          if (performance.now() - sliceStart >= CKPT_SLICE_MS) {
            await this.checkpointYield(ctx);
            if (writeErr) throw writeErr.e;
            sliceStart = performance.now();
          }
        }
        pieces[p] = new Uint8Array(0); // let it go once written: the write holds it meanwhile
        for (const c of [0, 1]) {
          this.ckptSlotBusy[slot]++;
          const w = this.trackedWrite(this.layout.copies[c].checkpointSlots[slot] + first * META_BLOCK, buf, () => {
            this.ckptSlotBusy[slot]--;
          });
          w.catch((e: unknown) => {
            writeErr ??= { e };
          });
          writes.push(w);
        }
      }

      // 3. Wait for every piece, then one sync.
      issuing = false;
      let timer: NodeJS.Timeout | undefined;
      const timeout = new Promise<never>((_, reject) => {
        timer = setTimeout(
          () => reject(new RemapError(ERRNO.ETIMEDOUT, `metadata checkpoint seq ${covered} on ${this.dev} timed out after ${this.timeoutMs} ms`, ctx)),
          this.timeoutMs,
        );
      });
      try {
        await this.untilStopped(
          Promise.race([
            (async () => {
              await Promise.all(writes);
              await this.io.sync();
            })(),
            timeout,
          ]),
        );
      } finally {
        clearTimeout(timer);
      }
      this.ckptSeq = Math.max(this.ckptSeq, covered);
      this.ckptSlot = slot;
      this.st.checkpoints++;
      this.log.info({ event: 'metadata-checkpoint', device: this.dev, seq: covered, records: total, slot, reason }, 'metadata checkpoint written');
    } catch (e) {
      this.ckptFailures++;
      this.st.failedCheckpoints++;
      // Stopped while issuing (closed, or a piece failed): pieces already
      // issued stay tracked (the slot is not reused until they settle);
      // give them the time a whole checkpoint write would get (the
      // checkpoint timeout, cut short when close() gives up).
      if (issuing && writes.length > 0) await this.settleOrGiveUp(writes);
      throw e;
    }
  }
}
