/**
 * MetadataWriter figures over O_DIRECT (BackingMetaIO on a BackingDevice,
 * as the engine uses it): single-commit latency with a small and a large
 * state, and group commit of many concurrent callers.
 */
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { BackingDevice } from '../src/native/backing.js';
import { BackingMetaIO } from '../src/engine/meta-io.js';
import { defaultJournalBytes } from '../src/engine/open.js';
import { formatSpare, loadSpare } from '../src/metadata/store.js';
import { MetadataWriter, type WriterStats } from '../src/metadata/writer.js';
import { RecordType, validateRecord, type MetaRecord } from '../src/metadata/records.js';
import { CHECKPOINT_MAGIC, encodeBlocks, formatIdOf } from '../src/metadata/format.js';
import { quantile, sortedCopy } from './util.js';

/** The writer's state as the snapshot callback sees it: committed REMAPs only. */
class RemapState {
  private logical = new Float64Array(1024);
  private spare = new Float64Array(1024);
  n = 0;

  push(logical: number, spare: number): void {
    if (this.n === this.logical.length) {
      const l = new Float64Array(this.n * 2);
      l.set(this.logical);
      this.logical = l;
      const s = new Float64Array(this.n * 2);
      s.set(this.spare);
      this.spare = s;
    }
    this.logical[this.n] = logical;
    this.spare[this.n] = spare;
    this.n++;
  }

  apply(records: readonly MetaRecord[]): void {
    for (const r of records) this.push(r.logical, r.spare);
  }

  *records(): Iterable<MetaRecord> {
    const n = this.n;
    for (let i = 0; i < n; i++) yield { type: RecordType.REMAP, logical: this.logical[i], spare: this.spare[i], dataCrc: 0 };
  }
}

const remap = (i: number): MetaRecord => ({ type: RecordType.REMAP, logical: i * 3 + 1, spare: i, dataCrc: i >>> 0 });

interface Spare {
  dev: BackingDevice;
  writer: MetadataWriter;
  state: RemapState;
  dataBlocks: number;
  journalBlocks: number;
  close(): Promise<void>;
}

/** A sparse file of `bytes`, formatted, loaded, with a writer on it (O_DIRECT). */
async function openSpare(path: string, bytes: number): Promise<Spare> {
  const fh = await open(path, 'w');
  await fh.truncate(bytes);
  await fh.close();
  const dev = BackingDevice.open(path, { direct: true });
  const io = new BackingMetaIO(dev);
  await formatSpare(io, {
    areaOffset: 0,
    areaBytes: bytes,
    blockSize: 4096,
    journalBytes: defaultJournalBytes(bytes),
    identity: { main: { kind: 'file', sizeBytes: bytes, dev: 0, ino: 0, stableId: '' }, name: 'bench' },
  });
  const loaded = await loadSpare(io, { areaOffset: 0, areaBytes: bytes });
  const state = new RemapState();
  // Generous timeouts: a 1M-record checkpoint is tens of MiB; the figures, not the timeouts, are under test.
  const writer = new MetadataWriter(io, loaded, { snapshot: () => state.records(), timeoutMs: 120_000 });
  return {
    dev, writer, state, dataBlocks: loaded.layout.dataBlocks, journalBlocks: loaded.layout.journalBlocks,
    close: async () => {
      await writer.close(10_000);
      await dev.close(5000);
    },
  };
}

/** Commits records sequentially in the largest batches the writer takes until the state holds `target`. */
async function fill(s: Spare, target: number): Promise<void> {
  const max = s.writer.maxRecordsPerCommit;
  while (s.state.n < target) {
    const n = Math.min(max, target - s.state.n);
    const batch: MetaRecord[] = new Array<MetaRecord>(n);
    for (let i = 0; i < n; i++) batch[i] = remap(s.state.n + i);
    await s.writer.commit(batch);
    s.state.apply(batch);
  }
}

function ckpts(st: WriterStats): number {
  return st.checkpoints + st.failedCheckpoints;
}

export interface LatencyFigures {
  entries: number;
  commits: number;
  p50Ms: number;
  p99Ms: number;
  maxMs: number;
  checkpointsDuringWindow: number;
  journalBlocksInUseAtStart: number;
  journalBlocks: number;
}

export interface DuringCheckpointFigures {
  entries: number;
  checkpointMs: number;
  commits: number;
  p50Ms: number;
  p99Ms: number;
  maxMs: number;
  /** Longest event-loop stall seen while the checkpoint ran (every request of the process waits that long). */
  maxEventLoopDelayMs: number;
}

export interface CommitLatencyResult {
  fillMs: number[];
  steady: LatencyFigures[];
  duringCheckpoint: DuringCheckpointFigures[];
  /** CPU of a checkpoint's synchronous part (snapshot + validate, then encode with CRC32C), timed apart. */
  checkpointCpu: Array<{ entries: number; snapshotMs: number; encodeMs: number; bytes: number }>;
  spareBytes: number;
  dataBlocks: number;
}

/** One single-record commit, timed from the call to the resolution. */
async function timedCommit(s: Spare): Promise<number> {
  const r = [remap(s.state.n)];
  const t0 = performance.now();
  await s.writer.commit(r);
  const ms = performance.now() - t0;
  s.state.apply(r);
  return ms;
}

/** Sequential single-record commits while an explicit checkpoint of the whole state runs. */
async function timedDuringCheckpoint(s: Spare, maxCommits: number): Promise<DuringCheckpointFigures> {
  const entries = s.state.n;
  let settled = false;
  // Longest gap between ticks of a 1 ms interval: how long the event loop was blocked.
  let last = performance.now();
  let maxGap = 0;
  const ticker = setInterval(() => {
    const now = performance.now();
    maxGap = Math.max(maxGap, now - last);
    last = now;
  }, 1);
  const t0 = performance.now();
  let ckMs = NaN;
  const ck = s.writer.checkpoint().then(
    () => {
      settled = true;
      ckMs = performance.now() - t0;
    },
    (e: unknown) => {
      settled = true;
      throw e;
    },
  );
  const lat: number[] = [];
  while (!settled && lat.length < maxCommits) lat.push(await timedCommit(s));
  await ck;
  clearInterval(ticker);
  const sorted = sortedCopy(lat);
  return {
    entries, checkpointMs: ckMs, commits: lat.length, p50Ms: quantile(sorted, 0.5), p99Ms: quantile(sorted, 0.99),
    maxMs: sorted[sorted.length - 1] ?? NaN, maxEventLoopDelayMs: maxGap,
  };
}

/**
 * Two spares of the same size and layout (5 GiB, sparse), one holding 1k
 * entries and one 1M. After an explicit checkpoint on each (so both journals
 * start empty), `commits` single-record commits per spare are timed in
 * alternating rounds of `round` (the state that goes first alternates too),
 * so that drift of the shared disk hits both sides alike. Eight windows:
 * a p99 of sub-millisecond commits on this shared disk needs the samples
 * (with 4 windows the ratio ranged 0.83-1.57 over seven runs). Whether a
 * checkpoint ran inside the windows is reported; a separate measurement
 * times commits while a checkpoint runs.
 */
export async function benchCommitLatency(dir: string, progress: (m: string) => void, commits = 1000, round = 50, windows = 8): Promise<CommitLatencyResult> {
  const bytes = 5 * 1024 ** 3;
  const sizes = [1000, 1_000_000];
  const spares: Spare[] = [];
  try {
    for (const n of sizes) spares.push(await openSpare(join(dir, `spare-${n}.img`), bytes));
    const out: CommitLatencyResult = { fillMs: [], steady: [], duringCheckpoint: [], checkpointCpu: [], spareBytes: bytes, dataBlocks: spares[0].dataBlocks };
    for (const [i, s] of spares.entries()) {
      if (s.dataBlocks < sizes[i] + (windows + 3) * commits) throw new Error(`spare has only ${s.dataBlocks} data blocks`);
      progress(`metadata: filling a state of ${sizes[i]} entries`);
      const t0 = performance.now();
      await fill(s, sizes[i]);
      await s.writer.checkpoint();
      out.fillMs.push(performance.now() - t0);
    }
    progress(`metadata: ${windows} windows of ${commits} sequential single-record commits on each, in alternating rounds of ${round}`);
    const lat = spares.map(() => new Float64Array(commits * windows));
    const inWindow = spares.map(() => 0);
    let startJournal = spares.map(() => 0);
    for (let w = 0; w < windows; w++) {
      // Every window starts right after a checkpoint, so both journals start empty.
      if (w > 0) for (const s of spares) await s.writer.checkpoint();
      const st0 = spares.map((s) => s.writer.stats());
      if (w === 0) startJournal = st0.map((st) => st.journalBlocksInUse);
      for (let done = 0, r = 0; done < commits; done += round, r++) {
        // Which state goes first alternates by round, so neither always
        // follows the other's I/O.
        for (let j = 0; j < spares.length; j++) {
          const i = (j + r) % spares.length;
          const s = spares[i];
          for (let k = done; k < Math.min(commits, done + round); k++) lat[i][w * commits + k] = await timedCommit(s);
        }
      }
      for (const [i, s] of spares.entries()) inWindow[i] += ckpts(s.writer.stats()) - ckpts(st0[i]);
    }
    for (const [i, s] of spares.entries()) {
      const sorted = sortedCopy(lat[i]);
      out.steady.push({
        entries: sizes[i], commits: commits * windows, p50Ms: quantile(sorted, 0.5), p99Ms: quantile(sorted, 0.99), maxMs: sorted[sorted.length - 1],
        checkpointsDuringWindow: inWindow[i], journalBlocksInUseAtStart: startJournal[i], journalBlocks: s.writer.stats().journalBlocks,
      });
    }
    for (const s of spares) {
      // The total CPU of a checkpoint: snapshot, validate, encode (CRC32C). The
      // writer does the same work in ~4 ms slices; this measures the sum.
      const t0 = performance.now();
      const records: MetaRecord[] = [];
      for (const r of s.state.records()) {
        validateRecord(r);
        records.push(r);
      }
      const t1 = performance.now();
      const buf = encodeBlocks(CHECKPOINT_MAGIC, formatIdOf('00000000-0000-4000-8000-000000000000'), 1, records);
      const t2 = performance.now();
      out.checkpointCpu.push({ entries: records.length, snapshotMs: t1 - t0, encodeMs: t2 - t1, bytes: buf.byteLength });
    }
    for (const s of spares) {
      progress(`metadata: commits during a checkpoint of ${s.state.n} entries`);
      out.duringCheckpoint.push(await timedDuringCheckpoint(s, commits));
    }
    return out;
  } finally {
    for (const s of spares) await s.close();
  }
}

export interface GroupCommitResult {
  calls: number;
  ms: number;
  remapsPerSec: number;
  diskCommits: number;
  journalBlocksWritten: number;
  failures: number;
  checkpoints: number;
}

/** `calls` concurrent single-record commit() calls on a fresh spare of `bytes`. */
export async function benchGroupCommit(path: string, calls = 10_000, bytes = 1024 ** 3): Promise<GroupCommitResult> {
  const s = await openSpare(path, bytes);
  try {
    const st0 = s.writer.stats();
    let failures = 0;
    const t0 = performance.now();
    await Promise.all(
      Array.from({ length: calls }, (_, i) => {
        const r = [remap(i)];
        return s.writer.commit(r, { timeoutMs: 60_000 }).then(
          () => s.state.apply(r),
          () => {
            failures++;
          },
        );
      }),
    );
    const ms = performance.now() - t0;
    const st1 = s.writer.stats();
    return {
      calls,
      ms,
      remapsPerSec: ((calls - failures) / ms) * 1000,
      diskCommits: st1.commits - st0.commits,
      journalBlocksWritten: st1.journalBlocksWritten - st0.journalBlocksWritten,
      failures,
      checkpoints: ckpts(st1) - ckpts(st0),
    };
  } finally {
    await s.close();
  }
}
