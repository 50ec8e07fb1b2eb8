import type { Logger } from 'pino';
import { ERRNO, RemapError, errnoName } from '../errors.js';
import { BackingDevice, BackingOp, IO_FUA, allocAligned } from '../native/backing.js';
import { withReliableFua } from './fua-emulation.js';
import { RemapTable } from '../remap/remap-table.js';
import { BlockSet } from '../remap/block-set.js';
import { SparePool, LABEL_BYTES, encodeLabel, poolRoom, readLabel, storageClash, type PoolSpareInput, type SpareInfo } from './spare-pool.js';
import { MAX_SPARE_BLOCKS } from '../remap/spare-allocator.js';
import { planRange, type Extent } from '../remap/planner.js';
import { RecordType, type MetaRecord } from '../metadata/records.js';
import type { MetadataWriter } from '../metadata/writer.js';
import type { HistogramSnapshot } from '../metadata/histogram.js';
import { crc32c } from '../metadata/crc32c.js';
import { classifyErrno } from './classify.js';
import { RemapBreaker } from './breaker.js';
import { Deadline, within } from './deadline.js';

export type EngineOp = 'read' | 'write' | 'flush' | 'discard' | 'writeZeroes';

export interface EngineRequest {
  op: EngineOp;
  /** Bytes; a multiple of the block size (ignored for flush). */
  offset: number;
  /** Bytes; a multiple of the block size (ignored for flush). */
  length: number;
  /**
   * Data for write, destination for read. Must come from allocAligned() (or a
   * block-aligned subarray of such a buffer): backing I/O is O_DIRECT.
   */
  buffer?: Uint8Array;
  /** Force unit access: the write is durable when it is answered. */
  fua?: boolean;
}

/** Lifecycle state, as status shows it. */
export type EngineState = 'running' | 'failed' | 'stopping' | 'closed';

export interface EngineStats {
  reads: number;
  writes: number;
  flushes: number;
  discards: number;
  writeZeroes: number;
  bytesRead: number;
  bytesWritten: number;
  readErrors: number;
  writeErrors: number;
  autoRemaps: number;
  manualRemaps: number;
  commitFailures: number;
  /** Failed FLUSH requests (the first failure latches: every later flush fails too). */
  flushErrors: number;
  /** Failed reads and writes of spare blocks (the block is then marked bad). */
  spareErrors: number;
  /** Backing errors that are not media errors (vanished device, full host filesystem, EINVAL, ...). */
  otherErrors: number;
}

/**
 * A native fast path (the ublk queue threads, docs/UBLK.md "Fast path") that
 * serves plain reads and writes of blocks the engine has not marked, straight
 * on main. The engine stays the owner: it marks every block that needs it
 * (remapped, pending, being copied or retired) before that matters, and
 * waits for the fast I/O that may have missed a mark before it copies data.
 */
export interface FastPathMirror {
  /** These blocks go through the engine from now on (marks are never cleared). */
  mark(blocks: ArrayLike<number>): void;
  /** Resolves once every fast I/O checked before the call has completed. */
  drain(): Promise<void>;
  /** Which requests the fast path may take. */
  enable(reads: boolean, writes: boolean): void;
  /** What it served (counted into the engine's stats). */
  stats(): { reads: number; writes: number; bytesRead: number; bytesWritten: number; inFlight: number };
}

/** A read or write served straight on main (BlockEngine.fastPath), pooled. */
interface DirectOp {
  write: boolean;
  offset: number;
  length: number;
  buf: Uint8Array;
  fua: boolean;
  /** mainWriteStart() parity (writes). */
  gen: number;
  done: ((err: RemapError | null) => void) | null;
  /** Bound once per pooled object: the backing callback. */
  readonly onRes: (res: number) => void;
}

const EMPTY = new Uint8Array(0);

/** Adds what a fast path served to engine counters. */
function addServed(into: EngineStats, f: ReturnType<FastPathMirror['stats']>): void {
  into.reads += f.reads;
  into.writes += f.writes;
  into.bytesRead += f.bytesRead;
  into.bytesWritten += f.bytesWritten;
}

export interface EngineStatus {
  name: string;
  state: EngineState;
  failReason: string | null;
  sizeBytes: number;
  blockSize: number;
  openMode: 'direct' | 'buffered';
  remappedBlocks: number;
  pendingBlocks: number;
  badSpareBlocks: number;
  quarantinedSpareBlocks: number;
  spareBlocksTotal: number;
  spareBlocksUsed: number;
  spareExhausted: boolean;
  breakerTripped: boolean;
  metadataSeq: number;
  inFlight: number;
  stats: EngineStats;
}

export interface CloseReport {
  elapsedMs: number;
  /** Client requests still running when the deadline hit (answered ESHUTDOWN by the frontend). */
  requestsAbandoned: number;
  /** Backing I/O cancelled or abandoned by the rings. */
  ioCancelled: number;
  ioAbandoned: number;
  /** A metadata commit was still pending and got cancelled. */
  metadataAborted: boolean;
  /** The final fdatasync ran and succeeded. */
  synced: boolean;
}

export type ManualRemapResult =
  | { block: number; result: 'remapped'; spare: number }
  | { block: number; result: 'already-remapped'; spare: number }
  | { block: number; result: 'pending'; reason: string }
  | { block: number; result: 'failed'; errno: number; reason: string };

/** What unremapBlocks did with one block (retiring remaps). */
export type UnremapResult =
  | { block: number; result: 'unremapped'; spare: number }
  | { block: number; result: 'not-remapped' }
  | { block: number; result: 'failed'; errno: number; reason: string; spare?: number };

/** What the engine needs, already opened and loaded (see open.ts). */
export interface EngineParts {
  name: string;
  main: BackingDevice;
  /** May be the same object as main (spare in a tail region of main). */
  spare: BackingDevice;
  /** Exported size in bytes (main size, less the tail region if any). */
  sizeBytes: number;
  blockSize: number;
  /** Byte offset of spare data block 0 on the spare device. */
  spareDataOffset: number;
  spareDataBlocks: number;
  /** Spare pool: the extra spares (ordinal 1, 2, ...), opened and checked (open.ts). */
  extraSpares?: PoolSpareInput[];
  /** Device UUID of the metadata (labels of extra spares carry it). */
  deviceUuid?: string;
  /** How spare add opens a new spare (like the others). */
  spareOpen?: { direct: boolean; queueDepth?: number };
  /** Records one checkpoint holds: bounds the spare pool (poolRoom). Unlimited when absent. */
  checkpointCapacity?: number;
  table: RemapTable;
  pending: BlockSet;
  badSpare: BlockSet;
  quarantined: BlockSet;
  writer: MetadataWriter;
  logger: Logger;
  metadataTimeoutMs: number;
  readRetries?: number;
  spareWriteRetries?: number;
  breaker?: { maxRemaps: number; windowMs: number };
}

interface RemapItem {
  logical: number;
  data: Uint8Array;
  /**
   * The spare block (-1: main) the block was on when the caller decided to
   * remap it. If another remap moved it meanwhile, the data follows the new
   * mapping instead of burning (and condemning) another spare block.
   */
  seen?: number;
}

const MEDIA_RETRY_LIMIT_DEFAULT = 2;
/** Manual remaps share one data sync and one commit per group of this many blocks. */
const MANUAL_REMAP_GROUP = 256;

/** Anything thrown inside the engine, as the RemapError a client is answered with. */
function asRemapError(err: unknown, device: string): RemapError {
  if (err instanceof RemapError) return err;
  if (err instanceof RangeError) return new RemapError(ERRNO.EINVAL, err.message, { device });
  return new RemapError(ERRNO.EIO, `internal error: ${err instanceof Error ? err.message : String(err)}`, { device }, { cause: err });
}

/**
 * BlockEngine turns block requests into backing I/O, redirects bad blocks to
 * the spare and keeps the mapping durable. Every frontend (NBD, ublk) talks to
 * it through submit(). The pure parts (table, allocator, planner) live in
 * src/remap; the persistence in src/metadata; the I/O in src/native.
 */
export class BlockEngine {
  readonly name: string;
  readonly sizeBytes: number;
  readonly blockSize: number;
  readonly blocks: number;

  private readonly main: BackingDevice;
  private readonly spare: BackingDevice;
  private readonly spareIsMain: boolean;
  private readonly table: RemapTable;
  private readonly pending: BlockSet;
  private readonly badSpare: BlockSet;
  private readonly quarantined: BlockSet;
  /** Every spare's allocation over the global spare index space (spare-pool.ts). */
  private readonly allocator: SparePool;
  private readonly writer: MetadataWriter;
  private readonly log: Logger;
  private readonly metadataTimeoutMs: number;
  private readonly readRetries: number;
  private readonly spareWriteRetries: number;
  private readonly breaker: RemapBreaker;

  private stateValue: EngineState = 'running';
  private failReasonValue: string | null = null;
  /** errno of a failed FLUSH: latched, every later flush fails too. */
  private flushLatch = 0;
  private spareExhausted = false;
  private inFlightRequests = 0;
  private drainWaiters: Array<() => void> = [];
  /** Logical blocks with a remap in progress: a second remapper waits. */
  private readonly remapLocks = new Map<number, Promise<void>>();
  /**
   * Blocks whose data a manual remap is copying off main. A write to main
   * that lands between that copy's read and its commit would be lost (the
   * block is then served from the spare copy), so writes touching a fenced
   * block wait for the remap and are then planned again (to the spare).
   */
  private readonly copyFence = new Map<number, Promise<void>>();
  /**
   * Main writes in flight, counted by the parity of the generation they
   * started in: a fence bumps the generation and waits for the writes of
   * the previous one, i.e. for every write that may have passed the fence
   * check before the fence went up.
   */
  private writeGen = 0;
  private readonly mainWrites = new Int32Array(2);
  private genWaiter: (() => void) | null = null;
  private genWaiterParity = 0;
  private fenceChain: Promise<void> = Promise.resolve();
  /** Records that must ride along with the next commit (quarantine notes). */
  private carryRecords: MetaRecord[] = [];
  private zeroBlock: Buffer | null = null;

  private readonly st: EngineStats = {
    reads: 0, writes: 0, flushes: 0, discards: 0, writeZeroes: 0,
    bytesRead: 0, bytesWritten: 0, readErrors: 0, writeErrors: 0,
    autoRemaps: 0, manualRemaps: 0, commitFailures: 0,
    flushErrors: 0, spareErrors: 0, otherErrors: 0,
  };
  /** Native fast paths serving plain I/O of unmarked blocks (attachFastPath). */
  private readonly mirrors = new Set<FastPathMirror>();

  /** Request counters, including what attached fast paths served. */
  get stats(): EngineStats {
    if (this.mirrors.size === 0) return this.st;
    const out = { ...this.st };
    for (const m of this.mirrors) addServed(out, m.stats());
    return out;
  }

  constructor(p: EngineParts) {
    this.name = p.name;
    this.sizeBytes = p.sizeBytes;
    this.blockSize = p.blockSize;
    this.blocks = Math.floor(p.sizeBytes / p.blockSize);
    this.main = p.main;
    this.spare = p.spare;
    this.spareIsMain = p.spare === p.main;
    this.table = p.table;
    this.pending = p.pending;
    this.badSpare = p.badSpare;
    this.quarantined = p.quarantined;
    this.allocator = SparePool.derive(p.blockSize, [
      { ordinal: 0, dev: p.spare, path: p.spare.info.path, dataOffset: p.spareDataOffset, blocks: p.spareDataBlocks, labelCrc: 0 },
      ...(p.extraSpares ?? []),
    ], p.table, p.badSpare, p.quarantined);
    this.deviceUuid = p.deviceUuid ?? null;
    this.checkpointCapacity = p.checkpointCapacity ?? null;
    this.spareOpen = p.spareOpen ?? { direct: p.spare.info.openMode === 'direct' };
    this.writer = p.writer;
    this.log = p.logger.child({ device: p.name });
    this.metadataTimeoutMs = p.metadataTimeoutMs;
    this.readRetries = p.readRetries ?? MEDIA_RETRY_LIMIT_DEFAULT;
    this.spareWriteRetries = p.spareWriteRetries ?? 4;
    this.breaker = new RemapBreaker(p.breaker?.maxRemaps ?? 1024, p.breaker?.windowMs ?? 60_000);
    this.spareExhausted = this.allocator.free === 0;
  }

  /**
   * Attach a fast path: every block that needs the engine now is marked
   * first, then the fast path is switched on (writes only while the device
   * is writable and running). Returns the detach: switch off, wait for its
   * I/O, fold its counters into the engine's.
   */
  attachFastPath(m: FastPathMirror): () => Promise<void> {
    m.mark(this.table.copyEntries().keys); // hash order: no need to sort
    m.mark([...this.pending.values(), ...this.copyFence.keys(), ...this.retireFence]);
    this.mirrors.add(m);
    this.enableMirror(m);
    let detached: Promise<void> | null = null;
    return () => {
      detached ??= (async () => {
        m.enable(false, false);
        await m.drain();
        if (this.mirrors.delete(m)) addServed(this.st, m.stats());
      })();
      return detached;
    };
  }

  /** A new descriptor of main for a fast path (the caller owns it). */
  dupMainFd(): number {
    return this.main.dupFd();
  }

  private enableMirror(m: FastPathMirror): void {
    const running = this.stateValue === 'running';
    m.enable(running, running && !this.main.info.readOnly);
  }

  // ------------------------------------------ main liveness (no remap storm on a dead main)

  /** Byte offset of the last plain request that main served in full (-1: none yet). */
  private lastGoodMain = -1;
  private aliveCheck: { at: number; alive: Promise<boolean> } | null = null;

  /**
   * A media error on main remaps (or marks pending) only blocks of a main
   * that still answers. A device that fails everything (a dm table swapped
   * for `error` by `dmsetup remove --force`, a dead disk that still says EIO)
   * would otherwise burn the spare one block at a time. So before the first
   * remap of an error, main is probed: one-block reads at the last place that
   * worked, block 0 and the middle, skipping the failed blocks. If every
   * probe fails, the device fails (no remap, no pending mark) with the
   * blocks, the errno and the probes named. One probe serves the errors of
   * the next 250 ms.
   */
  private async requireMainAlive(op: 'read' | 'write', blocks: readonly number[], res: number): Promise<void> {
    if (this.stateValue === 'failed') {
      throw new RemapError(ERRNO.EIO, `device has failed (${this.failReasonValue ?? 'unknown'}); block ${blocks[0]} not remapped`,
        { device: this.name, op, block: blocks[0] });
    }
    const now = Date.now();
    if (this.aliveCheck === null || now - this.aliveCheck.at > 250) this.aliveCheck = { at: now, alive: this.probeMain(new Set(blocks), op, blocks[0], res) };
    if (await this.aliveCheck.alive) return;
    throw new RemapError(ERRNO.EIO, `${op} of block ${blocks[0]} failed (${errnoName(res)}) and main answers nothing else: not remapped`,
      { device: this.name, op, block: blocks[0] });
  }

  private async probeMain(failed: ReadonlySet<number>, op: string, block: number, res: number): Promise<boolean> {
    const bs = this.blockSize;
    const candidates = [this.lastGoodMain >= 0 ? Math.floor(this.lastGoodMain / bs) : -1, 0, Math.floor(this.blocks / 2)];
    const probes = [...new Set(candidates)].filter((b) => b >= 0 && b < this.blocks && !failed.has(b) && this.table.get(b) < 0 && !this.pending.has(b));
    if (probes.length === 0) return true; // nothing to compare with: treat as a media error
    const buf = allocAligned(bs);
    const results: string[] = [];
    for (const b of probes) {
      const r = await this.main.io(BackingOp.READ, buf, b * bs, bs);
      if (r === bs) return true;
      results.push(`block ${b}: ${r < 0 ? errnoName(r) : `short read ${r}`}`);
    }
    this.fail(`main ${this.main.info.path} failed a ${op} of block ${block} (${errnoName(res)}) and every probe read too (${results.join(', ')}): `
      + 'it looks dead or disconnected, so nothing is remapped');
    return false;
  }

  /** Blocks that must go through the engine from now on (see FastPathMirror). */
  private markSlow(blocks: ArrayLike<number>): void {
    for (const m of this.mirrors) m.mark(blocks);
  }

  private mirrorsInFlight(): number {
    let n = 0;
    for (const m of this.mirrors) n += m.stats().inFlight;
    return n;
  }

  /** Waits for every fast I/O that may have been checked before the marks made so far. */
  private drainMirrors(): Promise<unknown> {
    if (this.mirrors.size === 0) return Promise.resolve();
    return Promise.all([...this.mirrors].map((m) => m.drain()));
  }

  get state(): EngineState {
    return this.stateValue;
  }

  get openMode(): 'direct' | 'buffered' {
    return this.main.info.openMode === 'direct' && this.spare.info.openMode === 'direct'
      && this.allocator.extras().every((x) => x.dev.info.openMode === 'direct') ? 'direct' : 'buffered';
  }

  /** What the device can do, for frontends deriving their flags from it. */
  capabilities(): { flush: true; fua: true; discard: true; writeZeroes: true; readOnly: boolean } {
    return { flush: true, fua: true, discard: true, writeZeroes: true, readOnly: this.main.info.readOnly };
  }

  /**
   * Records describing the whole current state: the checkpoint snapshot.
   * The state is copied now (a few ms at 1M entries), so the records are a
   * point-in-time view that the writer may walk over later macrotasks.
   */
  snapshotRecords(): Iterable<MetaRecord> {
    const remaps = this.table.copyEntries();
    const pending = this.pending.copyKeys();
    const badSpare = this.badSpare.copyKeys();
    const quarantined = this.quarantined.copyKeys();
    const spares = this.allocator.extras().map((x) => ({ ordinal: x.ordinal, blocks: x.blocks, crc: x.labelCrc }));
    return {
      *[Symbol.iterator](): Iterator<MetaRecord> {
        for (const x of spares) yield { type: RecordType.SPARE_ADD, logical: x.ordinal, spare: x.blocks, dataCrc: x.crc };
        for (let i = 0; i < remaps.keys.length; i++) yield { type: RecordType.REMAP, logical: remaps.keys[i], spare: remaps.values[i], dataCrc: 0 };
        for (const l of pending) yield { type: RecordType.PENDING_ADD, logical: l, spare: 0, dataCrc: 0 };
        for (const s of badSpare) yield { type: RecordType.SPARE_BAD, logical: 0, spare: s, dataCrc: 0 };
        for (const s of quarantined) yield { type: RecordType.QUARANTINE, logical: 0, spare: s, dataCrc: 0 };
      },
    };
  }

  /** Spare index of a logical block, or -1. */
  lookup(logical: number): number {
    return this.table.get(logical);
  }

  isPending(logical: number): boolean {
    return this.pending.has(logical);
  }

  status(): EngineStatus {
    return {
      name: this.name,
      state: this.stateValue,
      failReason: this.failReasonValue,
      sizeBytes: this.sizeBytes,
      blockSize: this.blockSize,
      openMode: this.openMode,
      remappedBlocks: this.table.size,
      pendingBlocks: this.pending.size,
      badSpareBlocks: this.badSpare.size,
      quarantinedSpareBlocks: this.quarantined.size,
      spareBlocksTotal: this.allocator.total,
      spareBlocksUsed: this.allocator.used,
      spareExhausted: this.spareExhausted,
      breakerTripped: this.breaker.tripped,
      metadataSeq: this.writer.seq,
      inFlight: this.inFlightRequests + this.mirrorsInFlight(),
      stats: { ...this.stats },
    };
  }

  // ---------------------------------------------------------------- submit

  /**
   * Run one block request. Resolves when it is done (for writes: durable as
   * far as the request asked); rejects with a RemapError whose errno is what
   * the client gets on the wire.
   */
  submit(req: EngineRequest): Promise<void> {
    return new Promise((resolve, reject) => {
      this.submitCb(req, (err) => (err === null ? resolve() : reject(err)));
    });
  }

  /**
   * Callback form of submit(), for frontends on the hot path: a plain read
   * or write of blocks that are neither remapped nor pending costs one
   * backing I/O and no promise at all.
   */
  submitCb(req: EngineRequest, done: (err: RemapError | null) => void): void {
    let buf: Uint8Array | undefined;
    try {
      if (this.stateValue === 'stopping' || this.stateValue === 'closed') {
        throw new RemapError(ERRNO.ESHUTDOWN, 'device is being removed', { device: this.name, op: req.op });
      }
      if (req.op !== 'flush') this.validateRange(req);
      if (req.op === 'read' || req.op === 'write') {
        buf = this.requireBuffer(req);
        if (req.op === 'write') this.requireWritable('write');
      }
    } catch (err) {
      queueMicrotask(() => done(asRemapError(err, this.name)));
      return;
    }
    this.inFlightRequests++;
    if (buf !== undefined && this.directTarget(req)) {
      this.fastPath(req, buf, done);
      return;
    }
    this.slowPath(req, buf).then(() => this.endRequest(done, null), (err: unknown) => this.endRequest(done, asRemapError(err, this.name)));
  }

  /**
   * Whether a read/write can go straight to main: nothing in its range is
   * remapped (or, for writes, pending). Single blocks are checked with one
   * lookup; longer ranges with one range probe.
   */
  private directTarget(req: EngineRequest): boolean {
    if (this.copyFence.size > 0 && req.op === 'write' && this.fenced(req.offset / this.blockSize, (req.offset + req.length) / this.blockSize) !== null) return false;
    if (this.table.size === 0 && (req.op === 'read' || this.pending.size === 0)) return true;
    const first = req.offset / this.blockSize;
    const end = first + req.length / this.blockSize;
    if (this.table.size > 0 && (end - first === 1 ? this.table.get(first) >= 0 : this.table.nextInRange(first, end) >= 0)) return false;
    return req.op === 'read' || this.pending.size === 0 || this.pending.nextInRange(first, end) < 0;
  }

  /** Pooled state of direct requests in flight (the hot path allocates no closure per request). */
  private readonly directFree: DirectOp[] = [];

  private newDirectOp(): DirectOp {
    const op: DirectOp = {
      write: false, offset: 0, length: 0, buf: EMPTY, fua: false, gen: 0, done: null,
      onRes: (res: number) => this.directDone(op, res),
    };
    return op;
  }

  /** Ends a request counted in inFlightRequests. */
  private endRequest(done: (err: RemapError | null) => void, err: RemapError | null): void {
    if (--this.inFlightRequests === 0 && this.drainWaiters.length > 0) this.wakeDrainers();
    done(err);
  }

  private fastPath(req: EngineRequest, buf: Uint8Array, done: (err: RemapError | null) => void): void {
    const { offset, length } = req;
    const op = this.directFree.pop() ?? this.newDirectOp();
    op.write = req.op === 'write';
    op.offset = offset;
    op.length = length;
    op.buf = buf;
    op.fua = req.fua === true;
    op.done = done;
    const data = length === buf.byteLength ? buf : buf.subarray(0, length);
    if (!op.write) {
      this.st.reads++;
      this.main.submit(BackingOp.READ, data, offset, length, 0, op.onRes);
      return;
    }
    this.st.writes++;
    op.gen = this.mainWriteStart();
    this.main.submit(BackingOp.WRITE, data, offset, length, op.fua ? IO_FUA : 0, op.onRes);
  }

  private directDone(op: DirectOp, res: number): void {
    const { write, offset, length, buf, fua, gen } = op;
    const done = op.done as (err: RemapError | null) => void;
    op.buf = EMPTY;
    op.done = null;
    this.directFree.push(op);
    const bs = this.blockSize;
    if (!write) {
      if (res === length) {
        this.st.bytesRead += length;
        this.lastGoodMain = offset;
        this.endRequest(done, null);
        return;
      }
      this.recoverRead(offset / bs, length / bs, buf, 0, res, 'main')
        .then(() => { this.st.bytesRead += length; this.endRequest(done, null); },
          (err: unknown) => this.endRequest(done, asRemapError(err, this.name)));
      return;
    }
    if (res === length) {
      this.mainWriteEnd(gen);
      this.st.bytesWritten += length;
      this.lastGoodMain = offset;
      this.endRequest(done, null);
      return;
    }
    this.recoverMainWrite(offset / bs, length / bs, buf, 0, res, fua)
      .then(() => { this.mainWriteEnd(gen); this.st.bytesWritten += length; this.endRequest(done, null); },
        (err: unknown) => { this.mainWriteEnd(gen); this.endRequest(done, asRemapError(err, this.name)); });
  }

  private slowPath(req: EngineRequest, buf: Uint8Array | undefined): Promise<void> {
    // Requests touching a block being retired (unremapBlocks) wait at its
    // fence; the others are tracked so that a retirement can wait for them.
    if (this.retireFence.size > 0) return this.afterRetireFence(req, buf);
    return this.trackSlow(req, this.slowPathOp(req, buf));
  }

  private slowPathOp(req: EngineRequest, buf: Uint8Array | undefined): Promise<void> {
    switch (req.op) {
      case 'read':
        return this.doRead(req.offset, req.length, buf as Uint8Array);
      case 'write':
        return this.doWrite(req.offset, req.length, buf as Uint8Array, req.fua === true);
      case 'flush':
        return this.doFlush();
      case 'discard':
        return this.doDiscard(req.offset, req.length);
      case 'writeZeroes':
        return this.doWriteZeroes(req.offset, req.length, req.fua === true);
      default: {
        const op: never = req.op;
        return Promise.reject(new RemapError(ERRNO.EINVAL, `unknown operation ${String(op)}`, { device: this.name }));
      }
    }
  }

  private validateRange(req: EngineRequest): void {
    const { offset, length } = req;
    const bs = this.blockSize;
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length <= 0) {
      throw new RemapError(ERRNO.EINVAL, `invalid range offset=${offset} length=${length}`, { device: this.name, op: req.op });
    }
    if (offset % bs !== 0 || length % bs !== 0) {
      throw new RemapError(ERRNO.EINVAL, `range offset=${offset} length=${length} is not aligned to the ${bs}-byte block`, {
        device: this.name, op: req.op,
      });
    }
    if (offset + length > this.sizeBytes) {
      const errno = req.op === 'write' || req.op === 'writeZeroes' ? ERRNO.ENOSPC : ERRNO.EINVAL;
      throw new RemapError(errno, `range offset=${offset} length=${length} ends past the device size ${this.sizeBytes}`, {
        device: this.name, op: req.op,
      });
    }
  }

  private requireBuffer(req: EngineRequest): Uint8Array {
    const b = req.buffer;
    if (b === undefined || b.byteLength < req.length) {
      throw new RemapError(ERRNO.EINVAL, `${req.op} needs a buffer of ${req.length} bytes`, { device: this.name, op: req.op });
    }
    return b;
  }

  private requireWritable(op: string): void {
    if (this.main.info.readOnly) throw new RemapError(ERRNO.EROFS, 'device is read-only', { device: this.name, op });
    if (this.stateValue === 'failed') {
      throw new RemapError(ERRNO.EIO, `device has failed (${this.failReasonValue ?? 'unknown'}); writes are refused`, {
        device: this.name, op,
      });
    }
  }

  /** Byte offset of spare data block `spare` on the spare device that holds it (spare pool: see spareInfo). */
  spareOffset(spare: number): number {
    return this.allocator.offsetOf(spare);
  }

  /** Move the device to the failed state (once), loudly. */
  private fail(reason: string): void {
    if (this.stateValue === 'failed' || this.stateValue === 'closed') return;
    if (this.stateValue === 'running') this.stateValue = 'failed';
    this.failReasonValue = reason;
    for (const m of this.mirrors) this.enableMirror(m);
    this.log.error({ event: 'device-failed', reason }, `device ${this.name} failed: ${reason}`);
  }

  /**
   * A backing error that must not remap: fail the request and, for a vanished
   * device or a full host filesystem, the device.
   */
  private nonMediaError(res: number, op: string, ctx: { block?: number; target: 'main' | 'spare'; offset: number; spare?: number }): RemapError {
    const cls = classifyErrno(res);
    this.st.otherErrors++;
    const dev = ctx.target === 'main' ? this.main.info.path : this.sparePathFor(ctx);
    if (cls === 'gone') this.fail(`${ctx.target} ${dev} is unreachable (${errnoName(res)}) during ${op}`);
    else if (cls === 'nospace') this.fail(`host filesystem under ${ctx.target} ${dev} is full (${errnoName(res)})`);
    return new RemapError(-res, `${op} on ${ctx.target} ${dev} failed`, { device: this.name, op, block: ctx.block, offset: ctx.offset });
  }

  /** The path of the spare an error was on (spare pool: the spare holding `spare`, else the block's spare index). */
  private sparePathFor(ctx: { block?: number; spare?: number }): string {
    const s = ctx.spare ?? (ctx.block !== undefined ? this.table.get(ctx.block) : -1);
    return s >= 0 && s < this.allocator.total ? this.allocator.pathOf(s) : this.spare.info.path;
  }

  // ------------------------------------------------------------------ read

  private async doRead(offset: number, length: number, buf: Uint8Array): Promise<void> {
    this.st.reads++;
    const extents = planRange(this.table, offset, length, this.blockSize);
    if (extents.length === 1) await this.readExtent(extents[0], buf);
    else await Promise.all(extents.map((e) => this.readExtent(e, buf)));
    this.st.bytesRead += length;
  }

  private async readExtent(e: Extent, buf: Uint8Array): Promise<void> {
    const bs = this.blockSize;
    const len = e.blocks * bs;
    const dst = buf.subarray(e.bufOffset, e.bufOffset + len);
    if (e.target === 'spare' && this.pending.size > 0) this.refuseLostBlocks(e.logical, e.blocks);
    const res = e.target === 'main'
      ? await this.main.io(BackingOp.READ, dst, e.logical * bs, len)
      : await this.allocator.io(BackingOp.READ, dst, e.spare, len);
    if (res !== len) await this.recoverRead(e.logical, e.blocks, buf, e.bufOffset, res, e.target);
  }

  /**
   * A read failed: retry block by block (re-looking up each block, as a remap
   * may have landed meanwhile). Blocks that stay unreadable become pending
   * (and a failing spare block is marked bad); the client gets EIO, because
   * data that is gone must not be invented.
   */
  private async recoverRead(first: number, count: number, buf: Uint8Array, bufOffset: number, res: number, target: 'main' | 'spare'): Promise<void> {
    const bs = this.blockSize;
    if (res >= 0) res = -ERRNO.EIO; // short read inside the device: treat as a media error
    if (target === 'spare') this.st.spareErrors++;
    if (classifyErrno(res) !== 'media') {
      this.st.readErrors++;
      throw this.nonMediaError(res, 'read', { target, offset: first * bs, ...(target === 'spare' ? { spare: this.table.get(first) } : {}) });
    }
    const lost: number[] = [];
    const failedSpare = new Map<number, number>();
    const records: MetaRecord[] = [];
    for (let i = 0; i < count; i++) {
      const logical = first + i;
      const dst = buf.subarray(bufOffset + i * bs, bufOffset + (i + 1) * bs);
      let last = res;
      let ok = false;
      let spare = -1;
      for (let attempt = 0; attempt < this.readRetries && !ok; attempt++) {
        spare = this.table.get(logical);
        last = spare >= 0
          ? await this.allocator.io(BackingOp.READ, dst, spare, bs)
          : await this.main.io(BackingOp.READ, dst, logical * bs, bs);
        ok = last === bs;
        if (!ok && last < 0 && classifyErrno(last) !== 'media') {
          this.st.readErrors++;
          throw this.nonMediaError(last, 'read', { target: spare >= 0 ? 'spare' : 'main', block: logical, offset: logical * bs });
        }
      }
      if (ok) continue;
      lost.push(logical);
      failedSpare.set(logical, spare);
      if (spare >= 0 && !this.badSpare.has(spare)) {
        records.push({ type: RecordType.SPARE_BAD, logical: 0, spare, dataCrc: 0 });
      }
      if (!this.pending.has(logical)) records.push({ type: RecordType.PENDING_ADD, logical, spare: 0, dataCrc: 0 });
    }
    if (lost.length === 0) return; // the retries read everything: a transient error
    if (target === 'main') await this.requireMainAlive('read', lost, res);
    // A remap of these blocks may be under way (a concurrent writer): wait
    // for it, and re-read what moved, so a freshly remapped block is never
    // recorded as pending behind the remap's back.
    const unlock = await this.lockBlocks(lost);
    try {
      await this.recordLost(lost, failedSpare, records, buf, bufOffset, first, res);
    } finally {
      unlock();
    }
  }

  private async recordLost(lost: number[], failedSpare: Map<number, number>, records: MetaRecord[], buf: Uint8Array,
    bufOffset: number, first: number, res: number): Promise<void> {
    const bs = this.blockSize;
    for (let i = lost.length - 1; i >= 0; i--) {
      const logical = lost[i];
      const spare = this.table.get(logical);
      if (spare === failedSpare.get(logical)) continue;
      const dst = buf.subarray(bufOffset + (logical - first) * bs, bufOffset + (logical - first + 1) * bs);
      const r = spare >= 0
        ? await this.allocator.io(BackingOp.READ, dst, spare, bs)
        : await this.main.io(BackingOp.READ, dst, logical * bs, bs);
      if (r !== bs) continue;
      lost.splice(i, 1);
      const was = failedSpare.get(logical) as number;
      records = records.filter((rec) => !(rec.type === RecordType.PENDING_ADD && rec.logical === logical)
        && !(rec.type === RecordType.SPARE_BAD && was >= 0 && rec.spare === was));
    }
    if (lost.length === 0) return;
    this.st.readErrors++;
    if (records.length > 0) {
      try {
        await this.commit(records);
        for (const r of records) {
          if (r.type === RecordType.SPARE_BAD) this.badSpare.add(r.spare);
          else { this.markSlow([r.logical]); this.pending.add(r.logical); }
        }
        this.log.warn({ event: 'read-error', blocks: lost, errno: errnoName(res) },
          `unreadable block(s) ${lost.join(',')} marked pending; the next write remaps them`);
      } catch (err) {
        this.log.error({ event: 'read-error', blocks: lost, err: String(err) }, 'could not persist pending blocks');
      }
    }
    throw new RemapError(ERRNO.EIO, `unreadable block ${lost[0]}${lost.length > 1 ? ` (+${lost.length - 1} more)` : ''}`, {
      device: this.name, op: 'read', block: lost[0],
    });
  }

  // ----------------------------------------------------------------- write

  private async doWrite(offset: number, length: number, buf: Uint8Array, fua: boolean): Promise<void> {
    this.st.writes++;
    const gen = await this.passFence(offset, length);
    try {
      const extents = this.planWrite(offset, length);
      if (extents.length === 1) await this.writeExtent(extents[0], buf, fua);
      else await Promise.all(extents.map((e) => this.writeExtent(e, buf, fua)));
    } finally {
      this.mainWriteEnd(gen);
    }
    this.st.bytesWritten += length;
  }

  // ------------------------------------------------ copy fence (manual remap)

  /** Registers a main write in the current generation; returns its parity for mainWriteEnd(). */
  private mainWriteStart(): number {
    const p = this.writeGen & 1;
    this.mainWrites[p]++;
    return p;
  }

  private mainWriteEnd(p: number): void {
    if (--this.mainWrites[p] === 0 && this.genWaiter !== null && this.genWaiterParity === p) {
      const w = this.genWaiter;
      this.genWaiter = null;
      w();
    }
  }

  /** The fence of some block in [first, end), or null. */
  private fenced(first: number, end: number): Promise<void> | null {
    if (this.copyFence.size === 0) return null;
    if (end - first > this.copyFence.size) {
      for (const [b, p] of this.copyFence) if (b >= first && b < end) return p;
      return null;
    }
    for (let b = Math.floor(first); b < end; b++) {
      const p = this.copyFence.get(b);
      if (p !== undefined) return p;
    }
    return null;
  }

  /** Waits until no block of the range is fenced, then registers a main write (see mainWriteStart). */
  private async passFence(offset: number, length: number): Promise<number> {
    const first = offset / this.blockSize;
    const end = (offset + length) / this.blockSize;
    for (let f = this.fenced(first, end); f !== null; f = this.fenced(first, end)) await f;
    return this.mainWriteStart();
  }

  /**
   * Fences `blocks` against main writes: new writes to them wait, and the
   * writes already in flight (any block: they are not tracked per block)
   * finish first. Returns the release.
   */
  private async fenceMainWrites(blocks: readonly number[]): Promise<() => void> {
    for (;;) {
      const busy = blocks.map((b) => this.copyFence.get(b)).filter((p): p is Promise<void> => p !== undefined);
      if (busy.length === 0) break;
      await Promise.all(busy);
    }
    let release!: () => void;
    const p = new Promise<void>((r) => { release = r; });
    this.markSlow(blocks);
    for (const b of blocks) this.copyFence.set(b, p);
    const drained = this.fenceChain.then(() => {
      const old = this.writeGen & 1;
      this.writeGen++;
      const mirrors = this.drainMirrors(); // fast writes that missed the marks above
      if (this.mainWrites[old] === 0) return mirrors;
      return Promise.all([mirrors, new Promise<void>((r) => {
        this.genWaiter = r;
        this.genWaiterParity = old;
      })]);
    }).then(() => undefined);
    this.fenceChain = drained;
    await drained;
    return () => {
      for (const b of blocks) if (this.copyFence.get(b) === p) this.copyFence.delete(b);
      release();
    };
  }

  /**
   * Plan a write: like a read, but blocks that are pending (unreadable on
   * main, or mapped to a spare block that went bad) go straight to a new
   * spare block, as drive firmware does.
   */
  private planWrite(offset: number, length: number): Array<Extent | { target: 'remap'; logical: number; blocks: number; bufOffset: number }> {
    const bs = this.blockSize;
    const extents = planRange(this.table, offset, length, bs);
    if (this.pending.size === 0) return extents;
    const out: Array<Extent | { target: 'remap'; logical: number; blocks: number; bufOffset: number }> = [];
    for (const e of extents) {
      let start = e.logical;
      const end = e.logical + e.blocks;
      let p = this.pending.nextInRange(start, end);
      if (p < 0) { out.push(e); continue; }
      while (start < end) {
        if (p < 0) p = end;
        if (p > start) {
          out.push({ ...e, logical: start, blocks: p - start, bufOffset: e.bufOffset + (start - e.logical) * bs,
            spare: e.target === 'spare' ? e.spare + (start - e.logical) : -1 });
        }
        if (p < end) out.push({ target: 'remap', logical: p, blocks: 1, bufOffset: e.bufOffset + (p - e.logical) * bs });
        start = p + 1;
        p = start < end ? this.pending.nextInRange(start, end) : -1;
      }
    }
    return out;
  }

  private async writeExtent(e: Extent | { target: 'remap'; logical: number; blocks: number; bufOffset: number }, buf: Uint8Array, fua: boolean): Promise<void> {
    const bs = this.blockSize;
    const len = e.blocks * bs;
    const src = buf.subarray(e.bufOffset, e.bufOffset + len);
    if (e.target === 'remap') {
      await this.remapWithData([{ logical: e.logical, data: src }], 'pending-write');
      return;
    }
    if (e.target === 'main') {
      const res = await this.main.io(BackingOp.WRITE, src, e.logical * bs, len, fua ? IO_FUA : 0);
      if (res !== len) await this.recoverMainWrite(e.logical, e.blocks, buf, e.bufOffset, res, fua);
      return;
    }
    const res = await this.allocator.io(BackingOp.WRITE, src, e.spare, len, fua ? IO_FUA : 0);
    if (res !== len) await this.recoverSpareWrite(e.logical, e.blocks, buf, e.bufOffset, res, fua);
  }

  /**
   * A write to main failed. Find the bad blocks by writing block by block;
   * move each bad block's data to a spare block (data durable first, then
   * the mapping); only then is the client answered, with success.
   */
  private async recoverMainWrite(first: number, count: number, buf: Uint8Array, bufOffset: number, res: number, fua: boolean): Promise<void> {
    const bs = this.blockSize;
    this.countWriteError(res, { target: 'main', offset: first * bs });
    const bad: RemapItem[] = [];
    for (let i = 0; i < count; i++) {
      const logical = first + i;
      const data = buf.subarray(bufOffset + i * bs, bufOffset + (i + 1) * bs);
      const spare = this.table.get(logical);
      if (spare >= 0) {
        // Remapped meanwhile (a concurrent writer of the same block): follow it.
        const r = await this.allocator.io(BackingOp.WRITE, data, spare, bs, fua ? IO_FUA : 0);
        if (r !== bs) await this.recoverSpareWrite(logical, 1, buf, bufOffset + i * bs, r, fua);
        continue;
      }
      const r = await this.main.io(BackingOp.WRITE, data, logical * bs, bs, fua ? IO_FUA : 0);
      if (r === bs) continue;
      const cls = classifyErrno(r < 0 ? r : -ERRNO.EIO);
      if (cls !== 'media') throw this.nonMediaError(r < 0 ? r : -ERRNO.EIO, 'write', { target: 'main', block: logical, offset: logical * bs });
      bad.push({ logical, data, seen: -1 });
    }
    if (bad.length === 0) return;
    await this.requireMainAlive('write', bad.map((b) => b.logical), res < 0 ? res : -ERRNO.EIO);
    await this.remapWithData(bad, 'write-error');
  }

  /**
   * Count a failed write; anything but a media error (a short write counts
   * as one) fails the request here, without remapping.
   */
  private countWriteError(res: number, ctx: { block?: number; target: 'main' | 'spare'; offset: number }): void {
    this.st.writeErrors++;
    if (ctx.target === 'spare') this.st.spareErrors++;
    const errno = res >= 0 ? -ERRNO.EIO : res;
    if (classifyErrno(errno) !== 'media') throw this.nonMediaError(errno, 'write', ctx);
  }

  /** A write to a spare-mapped block failed: mark that spare block bad and move the data on. */
  private async recoverSpareWrite(first: number, count: number, buf: Uint8Array, bufOffset: number, res: number, fua: boolean): Promise<void> {
    const bs = this.blockSize;
    this.countWriteError(res, { target: 'spare', block: first, offset: this.spareOffset(this.table.get(first)) });
    const bad: RemapItem[] = [];
    for (let i = 0; i < count; i++) {
      const logical = first + i;
      const data = buf.subarray(bufOffset + i * bs, bufOffset + (i + 1) * bs);
      const spare = this.table.get(logical);
      const r = spare >= 0 ? await this.allocator.io(BackingOp.WRITE, data, spare, bs, fua ? IO_FUA : 0) : -ERRNO.EIO;
      if (r === bs) continue;
      if (r < 0 && classifyErrno(r) !== 'media') throw this.nonMediaError(r, 'write', { target: 'spare', block: logical, offset: this.spareOffset(spare) });
      bad.push({ logical, data, seen: spare });
    }
    if (bad.length > 0) await this.remapWithData(bad, 'spare-write-error');
  }

  // ----------------------------------------------------------------- remap

  /** Serialize remaps of the same logical block; different blocks run (and group-commit) together. */
  private async lockBlocks(requested: readonly number[]): Promise<() => void> {
    // A copy: callers may change their array while holding the lock, and a
    // lock left behind (resolved, never deleted) would spin every later waiter.
    const blocks = [...requested];
    for (;;) {
      const busy = blocks.map((b) => this.remapLocks.get(b)).filter((p): p is Promise<void> => p !== undefined);
      if (busy.length === 0) break;
      await Promise.all(busy);
    }
    let release!: () => void;
    const p = new Promise<void>((r) => { release = r; });
    for (const b of blocks) this.remapLocks.set(b, p);
    return () => {
      for (const b of blocks) if (this.remapLocks.get(b) === p) this.remapLocks.delete(b);
      release();
    };
  }

  private allocateSpare(logical: number, why: string): number {
    const s = this.allocator.allocate();
    if (s < 0) {
      if (!this.spareExhausted) {
        this.spareExhausted = true;
        this.log.error({ event: 'spare-exhausted', block: logical, spareBlocksTotal: this.allocator.total },
          `spare of ${this.name} is exhausted: block ${logical} cannot be remapped (${why})`);
      }
      throw new RemapError(ERRNO.ENOSPC, `spare exhausted (${this.allocator.total} blocks in use); cannot remap`, {
        device: this.name, op: why, block: logical,
      });
    }
    return s;
  }

  /**
   * Move blocks to the spare with the given data: allocate, write, make the
   * data durable, commit the mapping durably, and only then update the table.
   * `why` is 'write-error' | 'spare-write-error' | 'pending-write' | 'manual' | ...
   */
  private async remapWithData(items: RemapItem[], why: string): Promise<Array<{ logical: number; spare: number }>> {
    const automatic = why !== 'manual';
    if (automatic && !this.breaker.admit(items.length)) {
      this.fail(`remap rate over ${this.breaker.maxRemaps} per ${this.breaker.windowMs} ms: the disk is failing faster than remapping can help`);
      throw new RemapError(ERRNO.EIO, 'remap circuit breaker is open; device failed', { device: this.name, op: why, block: items[0].logical });
    }
    const unlock = await this.lockBlocks(items.map((i) => i.logical));
    const allocated: number[] = [];
    // One bound for the whole remap (data write, sync, commit): a hung spare
    // fails the request after the metadata timeout instead of hanging it.
    const dl = new Deadline(this.metadataTimeoutMs);
    const bounded = async (p: Promise<number>, what: string, block: number): Promise<number> => {
      const r = await within(p, dl.remaining());
      if (r.done) return r.value;
      throw new RemapError(ERRNO.EIO, `${what} timed out after ${this.metadataTimeoutMs} ms`, { device: this.name, op: why, block });
    };
    try {
      const followed: Array<{ logical: number; spare: number }> = [];
      const fresh: RemapItem[] = [];
      for (const item of items) {
        const now = this.table.get(item.logical);
        if (item.seen === undefined || now === item.seen || now < 0 || this.badSpare.has(now) || this.pending.has(item.logical)) {
          fresh.push(item);
          continue;
        }
        if (why === 'manual') {
          followed.push({ logical: item.logical, spare: now }); // already moved: never copy stale data over it
          continue;
        }
        const r = await bounded(this.allocator.io(BackingOp.WRITE, item.data, now, this.blockSize), 'spare data write', item.logical);
        if (r === this.blockSize) followed.push({ logical: item.logical, spare: now });
        else fresh.push({ logical: item.logical, data: item.data });
      }
      if (fresh.length === 0) return followed;
      items = fresh;
      const records: MetaRecord[] = [];
      const newlyBad: number[] = [];
      const placed: Array<{ logical: number; spare: number; old: number }> = [];
      // Write every block's data to a fresh spare block at once; the ones
      // whose spare block fails go round again with another spare block.
      let todo = items.map((item) => ({ item, old: this.table.get(item.logical), tries: 0 }));
      while (todo.length > 0) {
        const attempts = todo.map((t) => {
          const spare = this.allocateSpare(t.item.logical, why);
          allocated.push(spare);
          return { ...t, spare };
        });
        const results = await Promise.all(attempts.map((a) =>
          bounded(this.allocator.io(BackingOp.WRITE, a.item.data, a.spare, this.blockSize), 'spare data write', a.item.logical)));
        const again: typeof todo = [];
        attempts.forEach((a, i) => {
          const r = results[i];
          if (r === this.blockSize) {
            records.push({ type: RecordType.REMAP, logical: a.item.logical, spare: a.spare, dataCrc: crc32c(a.item.data) });
            placed.push({ logical: a.item.logical, spare: a.spare, old: a.old });
            return;
          }
          if (r < 0 && classifyErrno(r) !== 'media') {
            throw this.nonMediaError(r, why, { target: 'spare', block: a.item.logical, offset: this.spareOffset(a.spare), spare: a.spare });
          }
          records.push({ type: RecordType.SPARE_BAD, logical: 0, spare: a.spare, dataCrc: 0 });
          newlyBad.push(a.spare);
          this.st.spareErrors++;
          this.log.warn({ event: 'spare-bad', block: a.item.logical, spare: a.spare, errno: errnoName(r < 0 ? r : -ERRNO.EIO) },
            `spare block ${a.spare} failed a write; trying another`);
          if (a.tries + 1 > this.spareWriteRetries) {
            throw new RemapError(ERRNO.EIO, `spare write failed ${a.tries + 1} times in a row`, { device: this.name, op: why, block: a.item.logical });
          }
          again.push({ item: a.item, old: a.old, tries: a.tries + 1 });
        });
        todo = again;
      }
      for (const p of placed) {
        if (p.old >= 0 && !this.badSpare.has(p.old) && !newlyBad.includes(p.old)) {
          // The old spare block of a re-remapped block failed us: never use it again.
          records.push({ type: RecordType.SPARE_BAD, logical: 0, spare: p.old, dataCrc: 0 });
          newlyBad.push(p.old);
        }
      }
      // The spares that got data (spare pool: only those).
      const sync = await bounded(this.allocator.sync([...placed, ...followed].map((x) => x.spare)), 'spare fdatasync', items[0].logical);
      if (sync < 0) {
        this.latchFlushFailure(sync, 'spare');
        throw new RemapError(-sync, 'fdatasync of the spare failed before committing a remap', { device: this.name, op: why, block: items[0].logical });
      }
      await this.commit(records, Math.max(1, dl.remaining()));
      for (const p of placed) {
        this.markSlow([p.logical]);
        this.table.set(p.logical, p.spare);
        this.pending.delete(p.logical);
      }
      for (const s of newlyBad) this.badSpare.add(s);
      if (automatic) this.st.autoRemaps += placed.length;
      else this.st.manualRemaps += placed.length;
      for (const p of placed) {
        this.log.warn({ event: 'remap', reason: why, block: p.logical, spare: p.spare, oldSpare: p.old >= 0 ? p.old : undefined },
          `block ${p.logical} remapped to spare block ${p.spare} (${why})`);
      }
      allocated.length = 0;
      return [...followed, ...placed.map(({ logical, spare }) => ({ logical, spare }))];
    } catch (err) {
      this.quarantine(allocated);
      throw err;
    } finally {
      unlock();
    }
  }

  /**
   * Spare blocks whose commit failed: their data write (or the commit itself)
   * may still land, so they are never handed out again in this run, and the
   * quarantine is persisted with the next commit.
   */
  private quarantine(spares: number[]): void {
    for (const s of spares) {
      if (this.badSpare.has(s) || this.quarantined.has(s)) continue;
      this.quarantined.add(s);
      this.carryRecords.push({ type: RecordType.QUARANTINE, logical: 0, spare: s, dataCrc: 0 });
    }
  }

  private async commit(records: MetaRecord[], timeoutMs = this.metadataTimeoutMs): Promise<number> {
    const carried = this.carryRecords;
    this.carryRecords = [];
    try {
      return await this.writer.commit(carried.length > 0 ? [...carried, ...records] : records, { timeoutMs });
    } catch (err) {
      this.st.commitFailures++;
      this.carryRecords.push(...carried);
      const errno = err instanceof RemapError ? err.errno : ERRNO.EIO;
      this.log.error({ event: 'metadata-commit-failed', errno: errnoName(errno), err: String(err) }, `metadata commit of ${this.name} failed`);
      throw new RemapError(ERRNO.EIO, `metadata commit failed (${errnoName(errno)})`, { device: this.name, op: 'metadata-commit' }, { cause: err });
    }
  }

  /**
   * Operator-requested remap: copy the block's data to the spare while it is
   * still readable, commit, and serve it from the spare from then on. An
   * unreadable block is not invented: it becomes pending instead. Blocks are
   * read concurrently and remapped in groups that share one data sync and
   * one metadata commit.
   */
  async remapBlocks(blocks: number[]): Promise<ManualRemapResult[]> {
    if (this.stateValue === 'stopping' || this.stateValue === 'closed') {
      throw new RemapError(ERRNO.ESHUTDOWN, 'device is being removed', { device: this.name, op: 'remap' });
    }
    this.requireWritable('remap');
    const out = new Array<ManualRemapResult>(blocks.length);
    const firstIndex = new Map<number, number>();
    this.inFlightRequests++;
    try {
      for (let i = 0; i < blocks.length; i += MANUAL_REMAP_GROUP) {
        const group: Array<{ index: number; block: number }> = [];
        for (let j = i; j < Math.min(blocks.length, i + MANUAL_REMAP_GROUP); j++) {
          const block = blocks[j];
          if (!Number.isSafeInteger(block) || block < 0 || block >= this.blocks) {
            out[j] = { block, result: 'failed', errno: ERRNO.EINVAL, reason: `block ${block} is outside the device (0..${this.blocks - 1})` };
          } else if (firstIndex.has(block)) {
            continue; // a repeat: answered from the first occurrence below
          } else {
            firstIndex.set(block, j);
            group.push({ index: j, block });
          }
        }
        await this.remapGroup(group, out);
      }
    } finally {
      if (--this.inFlightRequests === 0) this.wakeDrainers();
    }
    for (let j = 0; j < blocks.length; j++) {
      if (out[j] !== undefined) continue;
      const first = out[firstIndex.get(blocks[j]) as number];
      out[j] = first.result === 'remapped' ? { block: blocks[j], result: 'already-remapped', spare: first.spare } : { ...first };
    }
    return out;
  }

  private async remapGroup(group: Array<{ index: number; block: number }>, out: ManualRemapResult[]): Promise<void> {
    // No client write may land on main between the copy's read and its commit.
    const release = await this.fenceMainWrites(group.map((g) => g.block));
    try {
      await this.remapGroupFenced(group, out);
    } finally {
      release();
    }
  }

  private async remapGroupFenced(group: Array<{ index: number; block: number }>, out: ManualRemapResult[]): Promise<void> {
    const bs = this.blockSize;
    const readable: Array<{ index: number; block: number; data: Buffer; seen: number }> = [];
    const unreadable: Array<{ index: number; block: number; errno: number }> = [];
    await Promise.all(group.map(async ({ index, block }) => {
      const existing = this.table.get(block);
      if (existing >= 0 && !this.badSpare.has(existing)) {
        out[index] = { block, result: 'already-remapped', spare: existing };
        return;
      }
      if (existing >= 0 && this.pending.has(block)) {
        unreadable.push({ index, block, errno: ERRNO.EIO }); // lost: unreadable until rewritten (refuseLostBlocks)
        return;
      }
      const data = allocAligned(bs);
      let last = 0;
      for (let attempt = 0; attempt < this.readRetries; attempt++) {
        last = existing >= 0
          ? await this.allocator.io(BackingOp.READ, data, existing, bs)
          : await this.main.io(BackingOp.READ, data, block * bs, bs);
        if (last === bs) {
          readable.push({ index, block, data, seen: existing });
          return;
        }
      }
      const errno = last < 0 ? -last : ERRNO.EIO;
      if (classifyErrno(-errno) !== 'media') {
        out[index] = { block, result: 'failed', errno, reason: `reading block ${block} failed: ${errnoName(errno)}` };
      } else {
        unreadable.push({ index, block, errno });
      }
    }));
    if (unreadable.length > 0) {
      const records: MetaRecord[] = unreadable.filter((u) => !this.pending.has(u.block))
        .map((u) => ({ type: RecordType.PENDING_ADD, logical: u.block, spare: 0, dataCrc: 0 }));
      try {
        if (records.length > 0) await this.commit(records);
        for (const u of unreadable) {
          this.markSlow([u.block]);
          this.pending.add(u.block);
          out[u.index] = { block: u.block, result: 'pending', reason: `block ${u.block} is unreadable (${errnoName(u.errno)}); it is remapped on its next write` };
        }
      } catch (err) {
        for (const u of unreadable) out[u.index] = { block: u.block, result: 'failed', errno: ERRNO.EIO, reason: String(err) };
      }
    }
    // Never start a group the spare cannot hold: the blocks past the free
    // count fail alone with ENOSPC instead of failing the whole group.
    const fits = readable.slice(0, this.allocator.free);
    for (const r of readable.slice(fits.length)) {
      this.spareExhausted = true;
      out[r.index] = { block: r.block, result: 'failed', errno: ERRNO.ENOSPC, reason: `spare exhausted (${this.allocator.total} blocks in use); cannot remap block ${r.block}` };
    }
    if (fits.length === 0) return;
    try {
      const placed = await this.remapWithData(fits.map((r) => ({ logical: r.block, data: r.data, seen: r.seen })), 'manual');
      const spareOf = new Map(placed.map((p) => [p.logical, p.spare]));
      for (const r of fits) out[r.index] = { block: r.block, result: 'remapped', spare: spareOf.get(r.block) as number };
    } catch (err) {
      const errno = err instanceof RemapError ? err.errno : ERRNO.EIO;
      for (const r of fits) out[r.index] = { block: r.block, result: 'failed', errno, reason: err instanceof Error ? err.message : String(err) };
    }
  }

  private wakeDrainers(): void {
    const waiters = this.drainWaiters;
    this.drainWaiters = [];
    for (const w of waiters) w();
  }

  // ----------------------------------------------------------------- flush

  private latchFlushFailure(res: number, target: 'main' | 'spare'): void {
    if (this.flushLatch === 0) this.flushLatch = -res;
    this.fail(`fdatasync of ${target} failed (${errnoName(res)}); later flushes cannot prove durability`);
  }

  private async doFlush(): Promise<void> {
    this.st.flushes++;
    if (this.flushLatch !== 0) {
      this.st.flushErrors++;
      throw new RemapError(ERRNO.EIO, `an earlier flush failed (${errnoName(this.flushLatch)}); the device stays failed`, { device: this.name, op: 'flush' });
    }
    const [m, s] = await Promise.all([
      this.main.io(BackingOp.FDATASYNC, null, 0, 0),
      this.allocator.sync(undefined, this.spareIsMain ? this.main : undefined), // every spare of the pool
    ]);
    if (m < 0) this.latchFlushFailure(m, 'main');
    if (s < 0) this.latchFlushFailure(s, 'spare');
    if (m < 0 || s < 0) {
      this.st.flushErrors++;
      throw new RemapError(ERRNO.EIO, `flush failed (${errnoName(m < 0 ? m : s)})`, { device: this.name, op: 'flush' });
    }
  }

  // ------------------------------------------------------ discard / zeroes

  private async doDiscard(offset: number, length: number): Promise<void> {
    this.st.discards++;
    this.requireWritable('discard');
    const bs = this.blockSize;
    // DISCARD is advisory: an unsupported discard is a success. It does not
    // clear pending blocks (their data is still unknown).
    const extents = planRange(this.table, offset, length, bs);
    await Promise.all(extents.map(async (e) => {
      const len = e.blocks * bs;
      const at = e.target === 'main' ? e.logical * bs : this.spareOffset(e.spare);
      const res = e.target === 'main' ? await this.main.io(BackingOp.DISCARD, null, at, len) : await this.allocator.io(BackingOp.DISCARD, null, e.spare, len);
      if (res < 0 && classifyErrno(res) !== 'unsupported') {
        if (classifyErrno(res) === 'media') throw new RemapError(-res, `discard failed`, { device: this.name, op: 'discard', block: e.logical });
        throw this.nonMediaError(res, 'discard', { target: e.target, block: e.logical, offset: at });
      }
    }));
  }

  private zeroes(): Buffer {
    if (this.zeroBlock === null) this.zeroBlock = allocAligned(Math.max(this.blockSize, 256 * 1024));
    return this.zeroBlock;
  }

  private async doWriteZeroes(offset: number, length: number, fua: boolean): Promise<void> {
    this.st.writeZeroes++;
    this.requireWritable('writeZeroes');
    const gen = await this.passFence(offset, length);
    try {
      await this.writeZeroExtents(offset, length, fua);
    } finally {
      this.mainWriteEnd(gen);
    }
  }

  private async writeZeroExtents(offset: number, length: number, fua: boolean): Promise<void> {
    const bs = this.blockSize;
    const extents = this.planWrite(offset, length);
    await Promise.all(extents.map(async (e) => {
      if (e.target === 'remap') {
        await this.remapWithData([{ logical: e.logical, data: this.zeroes().subarray(0, bs) }], 'pending-write');
        return;
      }
      const len = e.blocks * bs;
      let res = e.target === 'main'
        ? await this.main.io(BackingOp.WRITE_ZEROES, null, e.logical * bs, len)
        : await this.allocator.io(BackingOp.WRITE_ZEROES, null, e.spare, len);
      if (res >= 0 && fua) {
        res = e.target === 'main' ? await this.main.io(BackingOp.FDATASYNC, null, 0, 0) : await this.allocator.sync(this.allocator.rangeIndices(e.spare, e.blocks));
      }
      if (res >= 0) return;
      // Not offered, or failed: write real zeroes, which runs the full write
      // error policy (so a bad block under WRITE_ZEROES is remapped too).
      const z = this.zeroes();
      for (let done = 0; done < len;) {
        const n = Math.min(z.length - (z.length % bs), len - done);
        const blockOff = done / bs;
        const sub: Extent = { ...e, logical: e.logical + blockOff, blocks: n / bs, bufOffset: 0,
          spare: e.target === 'spare' ? e.spare + blockOff : -1 } as Extent;
        await this.writeExtent(sub, z, fua);
        done += n;
      }
    }));
  }

  // ----------------------------------------------------------------- close

  private drain(): Promise<void> {
    if (this.inFlightRequests === 0) return Promise.resolve();
    return new Promise((resolve) => this.drainWaiters.push(resolve));
  }

  /**
   * Remove the device within one deadline: refuse new requests (ESHUTDOWN),
   * drain what runs, abort the pending commit, sync (graceful), close rings.
   * A hung disk delays this by at most the deadline.
   */
  async close(timeoutMs = this.metadataTimeoutMs, opts: { graceful?: boolean } = {}): Promise<CloseReport> {
    const started = Date.now();
    const deadline = new Deadline(timeoutMs);
    const graceful = opts.graceful ?? true;
    if (this.stateValue === 'closed') {
      return { elapsedMs: 0, requestsAbandoned: 0, ioCancelled: 0, ioAbandoned: 0, metadataAborted: false, synced: false };
    }
    this.stateValue = 'stopping';
    for (const m of this.mirrors) this.enableMirror(m);
    const drained = await within(Promise.all([this.drain(), this.drainMirrors()]), deadline.remaining());
    const requestsAbandoned = drained.done ? 0 : this.inFlightRequests;
    // Metadata writes still in the kernel (a commit that timed out, or one
    // cut short by this close) are what "aborted" reports; a stuck data
    // request alone is requestsAbandoned.
    const metadataAborted = this.writer.stats().outstandingWrites > 0;
    if (graceful && drained.done && this.carryRecords.length > 0 && !deadline.expired) {
      // Quarantine notes of failed commits: persist them if the disk lets us.
      await this.commit([], Math.max(1, deadline.remaining())).catch(() => undefined);
    }
    await within(this.writer.close(deadline.remaining()), deadline.remaining());
    let synced = false;
    if (graceful && drained.done && this.flushLatch === 0 && !deadline.expired) {
      const r = await within(Promise.all([
        this.main.io(BackingOp.FDATASYNC, null, 0, 0),
        this.allocator.sync(undefined, this.spareIsMain ? this.main : undefined), // every spare of the pool
      ]), deadline.remaining());
      synced = r.done && r.value[0] >= 0 && r.value[1] >= 0;
    }
    const ringBudget = deadline.remaining();
    const [m, s, ...extra] = await Promise.all([
      this.main.close(ringBudget),
      this.spareIsMain ? Promise.resolve({ cancelled: 0, abandoned: 0 }) : this.spare.close(ringBudget),
      ...this.allocator.extras().map((x) => x.dev.close(ringBudget)),
    ]);
    for (const x of extra) {
      s.cancelled += x.cancelled;
      s.abandoned += x.abandoned;
    }
    this.stateValue = 'closed';
    this.wakeDrainers();
    const report: CloseReport = {
      elapsedMs: Date.now() - started,
      requestsAbandoned,
      ioCancelled: m.cancelled + s.cancelled,
      ioAbandoned: m.abandoned + s.abandoned,
      metadataAborted,
      synced,
    };
    this.log.info({ event: 'closed', ...report }, `device ${this.name} closed`);
    return report;
  }

  // ------------------------------------------------- health and metrics (issue 6)

  /** Latency histogram of the metadata writer's completed disk commits. */
  metadataCommitLatency(): HistogramSnapshot {
    return this.writer.commitLatency();
  }

  // ------------------------------------------ unremap (retiring remaps, issue 6)

  /** Logical blocks being retired now: slow-path requests touching them wait for the fence. */
  private readonly retireFence = new Set<number>();
  private retireFenceReleased: Promise<void> = Promise.resolve();
  /** Slow-path requests in flight and their block ranges (every remapped block is served by the slow path). */
  private readonly slowActive = new Map<Promise<void>, { first: number; end: number }>();
  /** One unremapBlocks() at a time. */
  private retireChain: Promise<unknown> = Promise.resolve();

  /** Every remapped logical block, ascending (a copy). */
  remappedBlockList(): number[] {
    return Array.from(this.table.copyEntries().keys.sort());
  }

  private async afterRetireFence(req: EngineRequest, buf: Uint8Array | undefined): Promise<void> {
    if (req.op !== 'flush') {
      const first = req.offset / this.blockSize;
      const end = first + req.length / this.blockSize;
      const touches = (): boolean => {
        for (const b of this.retireFence) if (b >= first && b < end) return true;
        return false;
      };
      while (this.retireFence.size > 0 && touches()) await this.retireFenceReleased;
    }
    // Tracked only from here: a request parked at a fence has touched
    // nothing, and a retirement waiting for it would wait for itself.
    return this.trackSlow(req, this.slowPathOp(req, buf));
  }

  private trackSlow(req: EngineRequest, p: Promise<void>): Promise<void> {
    if (req.op === 'flush') return p;
    const first = req.offset / this.blockSize;
    this.slowActive.set(p, { first, end: first + req.length / this.blockSize });
    p.then(() => this.slowActive.delete(p), () => this.slowActive.delete(p));
    return p;
  }

  /**
   * Retire remaps after the main disk was replaced or repaired: copy each
   * block back from its spare block to main, make main durable, commit UNMAP
   * durably, and only then serve the block from main and free the spare
   * block. A crash at any point leaves either the remap (the spare still
   * holds the data; the copy on main is unused) or the unmap (main holds the
   * data), so running it again finishes the job. Client I/O to a block being
   * retired waits (the fence) until the block has moved. A block whose main
   * write fails stays remapped and is reported with the errno.
   */
  unremapBlocks(blocks: number[] | 'all', opts: { groupSize?: number } = {}): Promise<UnremapResult[]> {
    const run = this.retireChain.then(() => this.unremapNow(blocks, opts.groupSize ?? 128));
    this.retireChain = run.catch(() => undefined);
    return run;
  }

  private async unremapNow(blocks: number[] | 'all', groupSize: number): Promise<UnremapResult[]> {
    if (this.stateValue === 'stopping' || this.stateValue === 'closed') {
      throw new RemapError(ERRNO.ESHUTDOWN, 'device is being removed', { device: this.name, op: 'unremap' });
    }
    this.requireWritable('unremap');
    const list = blocks === 'all' ? this.remappedBlockList() : blocks;
    const out = new Array<UnremapResult>(list.length);
    const seen = new Map<number, number>();
    const todo: Array<{ index: number; block: number }> = [];
    list.forEach((block, index) => {
      if (!Number.isSafeInteger(block) || block < 0 || block >= this.blocks) {
        out[index] = { block, result: 'failed', errno: ERRNO.EINVAL, reason: `block ${block} is outside the device (0..${this.blocks - 1})` };
      } else if (!seen.has(block)) {
        seen.set(block, index);
        todo.push({ index, block });
      }
    });
    this.inFlightRequests++;
    try {
      for (let i = 0; i < todo.length; i += groupSize) {
        const group = todo.slice(i, i + groupSize);
        if (this.stateValue !== 'running') {
          const errno = this.stateValue === 'failed' ? ERRNO.EIO : ERRNO.ESHUTDOWN;
          for (const g of group) out[g.index] = { block: g.block, result: 'failed', errno, reason: `device is ${this.stateValue}; block ${g.block} stays remapped` };
          continue;
        }
        await this.retireGroup(group, out);
      }
    } finally {
      if (--this.inFlightRequests === 0) this.wakeDrainers();
    }
    list.forEach((block, index) => {
      if (out[index] === undefined) out[index] = { ...out[seen.get(block) as number] };
    });
    return out;
  }

  private async retireGroup(group: Array<{ index: number; block: number }>, out: UnremapResult[]): Promise<void> {
    const fenced = group.filter((g) => this.table.get(g.block) >= 0);
    for (const g of group) if (this.table.get(g.block) < 0) out[g.index] = { block: g.block, result: 'not-remapped' };
    if (fenced.length === 0) return;
    // Fence: new requests touching these blocks wait; wait for those already under way.
    let release!: () => void;
    this.retireFenceReleased = new Promise<void>((r) => { release = r; });
    this.markSlow(fenced.map((g) => g.block));
    for (const g of fenced) this.retireFence.add(g.block);
    // Only the requests touching the group: one hung elsewhere must not stall it.
    const running: Array<Promise<void>> = [];
    for (const [p, r] of this.slowActive) if (fenced.some((g) => g.block >= r.first && g.block < r.end)) running.push(p);
    try {
      await Promise.allSettled(running);
      const unlock = await this.lockBlocks(fenced.map((g) => g.block));
      try {
        await this.retireLocked(fenced, out);
      } finally {
        unlock();
      }
    } finally {
      for (const g of fenced) this.retireFence.delete(g.block);
      release();
    }
  }

  private async retireLocked(group: Array<{ index: number; block: number }>, out: UnremapResult[]): Promise<void> {
    const bs = this.blockSize;
    const fail = (g: { index: number; block: number }, errno: number, reason: string, spare?: number): void => {
      out[g.index] = { block: g.block, result: 'failed', errno, reason, spare };
    };
    // Read each block from its spare block.
    const copied: Array<{ index: number; block: number; spare: number; data: Buffer }> = [];
    await Promise.all(group.map(async (g) => {
      const spare = this.table.get(g.block);
      if (spare < 0) {
        out[g.index] = { block: g.block, result: 'not-remapped' };
        return;
      }
      if (this.badSpare.has(spare) || this.pending.has(g.block)) {
        fail(g, ERRNO.EIO, `block ${g.block}: its spare block ${spare} is bad and the block is pending (unreadable until rewritten); it stays remapped`, spare);
        return;
      }
      const data = allocAligned(bs);
      let r = 0;
      for (let attempt = 0; attempt < this.readRetries && r !== bs; attempt++) r = await this.allocator.io(BackingOp.READ, data, spare, bs);
      if (r !== bs) {
        const errno = r < 0 ? -r : ERRNO.EIO;
        fail(g, errno, `block ${g.block}: reading spare block ${spare} failed (${errnoName(errno)}); it stays remapped`, spare);
        return;
      }
      copied.push({ ...g, spare, data });
    }));
    // Write it to main. No timeout: a write given up on could land after a
    // later, successful retirement and overwrite newer data on main.
    const written: typeof copied = [];
    await Promise.all(copied.map(async (c) => {
      const r = await this.main.io(BackingOp.WRITE, c.data, c.block * bs, bs);
      if (r === bs) {
        written.push(c);
        return;
      }
      const errno = r < 0 ? -r : ERRNO.EIO;
      this.log.warn({ event: 'unremap-failed', block: c.block, spare: c.spare, errno: errnoName(errno) },
        `block ${c.block}: writing it back to main failed (${errnoName(errno)}); it stays remapped`);
      fail(c, errno, `block ${c.block}: writing it back to main ${this.main.info.path} failed (${errnoName(errno)}); it stays remapped`, c.spare);
    }));
    if (written.length === 0) return;
    written.sort((a, b) => a.block - b.block);
    // Main durable before the unmap can be committed.
    const sync = await this.main.io(BackingOp.FDATASYNC, null, 0, 0);
    if (sync < 0) {
      this.latchFlushFailure(sync, 'main');
      for (const c of written) fail(c, -sync, `block ${c.block}: fdatasync of main failed (${errnoName(sync)}); it stays remapped`, c.spare);
      return;
    }
    try {
      await this.commit(written.map((c) => ({ type: RecordType.UNMAP, logical: c.block, spare: 0, dataCrc: 0 })));
    } catch (err) {
      // The failed commit may still land later: assert the remaps again so
      // that a later seq wins; if that fails too, the state is unknown.
      const errno = err instanceof RemapError ? err.errno : ERRNO.EIO;
      try {
        await this.commit(written.map((c) => ({ type: RecordType.REMAP, logical: c.block, spare: c.spare, dataCrc: crc32c(c.data) })));
      } catch {
        this.fail(`an UNMAP commit failed and the remaps could not be re-asserted; blocks ${written.map((c) => c.block).join(',')} may read from main after a restart`);
      }
      for (const c of written) fail(c, errno, `block ${c.block}: committing the unmap failed (${err instanceof Error ? err.message : String(err)}); it stays remapped`, c.spare);
      return;
    }
    // Committed: serve from main (in this continuation, for the checkpoint snapshot), free the spare blocks.
    for (const c of written) {
      this.table.delete(c.block);
      if (!this.badSpare.has(c.spare) && !this.quarantined.has(c.spare)) this.allocator.release(c.spare);
      out[c.index] = { block: c.block, result: 'unremapped', spare: c.spare };
    }
    if (this.allocator.free > 0) this.spareExhausted = false;
    this.log.info({ event: 'unremap', blocks: written.length, first: written[0].block, last: written[written.length - 1].block },
      `${written.length} block(s) copied back to main and unmapped`);
  }

  // --------------------------------- scan: remap blocks with given data (issue 6)

  /**
   * Remaps each given block with the given data (its first block-size
   * bytes), durably, as any remap: the data is written to a fresh spare
   * block and synced, then the mapping is committed, and only then served.
   * For data known from elsewhere: zeroes for blocks a scan found
   * unreadable (`remapctl scan --remap-unreadable --zero`), or data copied
   * from another source by an import. `seen` is the block's spare block
   * (-1: main) when the caller decided; if the block moved since (a client
   * wrote it), its newer data is kept and the block answers
   * 'already-remapped'. Blocks go in groups that share one data sync and
   * one commit; blocks past the spare's free count fail alone with ENOSPC.
   * Meant for blocks on main or pending: a block still remapped to a healthy
   * spare block is moved to a new one and its old spare block retired.
   */
  async remapBlocksWithData(items: ReadonlyArray<{ block: number; data: Uint8Array; seen?: number }>): Promise<ManualRemapResult[]> {
    if (this.stateValue === 'stopping' || this.stateValue === 'closed') {
      throw new RemapError(ERRNO.ESHUTDOWN, 'device is being removed', { device: this.name, op: 'remap' });
    }
    this.requireWritable('remap');
    const bs = this.blockSize;
    const out = new Array<ManualRemapResult>(items.length);
    const firstIndex = new Map<number, number>();
    this.inFlightRequests++;
    try {
      for (let i = 0; i < items.length; i += MANUAL_REMAP_GROUP) {
        const group: Array<{ index: number; item: RemapItem }> = [];
        for (let j = i; j < Math.min(items.length, i + MANUAL_REMAP_GROUP); j++) {
          const { block, data, seen } = items[j];
          if (!Number.isSafeInteger(block) || block < 0 || block >= this.blocks) {
            out[j] = { block, result: 'failed', errno: ERRNO.EINVAL, reason: `block ${block} is outside the device (0..${this.blocks - 1})` };
          } else if (data.byteLength < bs) {
            out[j] = { block, result: 'failed', errno: ERRNO.EINVAL, reason: `data for block ${block} is ${data.byteLength} bytes, less than the ${bs}-byte block` };
          } else if (firstIndex.has(block)) {
            continue; // a repeat: answered from the first occurrence below
          } else {
            firstIndex.set(block, j);
            const now = this.table.get(block);
            if (seen !== undefined && now !== seen && now >= 0 && !this.badSpare.has(now) && !this.pending.has(block)) {
              out[j] = { block, result: 'already-remapped', spare: now };
              continue;
            }
            const copy = allocAligned(bs); // O_DIRECT needs an aligned buffer; the caller's may not be
            copy.set(data.subarray(0, bs));
            group.push({ index: j, item: { logical: block, data: copy, seen } });
          }
        }
        const fits = group.slice(0, this.allocator.free);
        for (const g of group.slice(fits.length)) {
          this.spareExhausted = true;
          out[g.index] = { block: g.item.logical, result: 'failed', errno: ERRNO.ENOSPC,
            reason: `spare exhausted (${this.allocator.total} blocks in use); cannot remap block ${g.item.logical}` };
        }
        if (fits.length === 0) continue;
        try {
          const placed = await this.remapWithData(fits.map((g) => g.item), 'manual');
          const spareOf = new Map(placed.map((p) => [p.logical, p.spare]));
          for (const g of fits) out[g.index] = { block: g.item.logical, result: 'remapped', spare: spareOf.get(g.item.logical) as number };
        } catch (err) {
          const errno = err instanceof RemapError ? err.errno : ERRNO.EIO;
          for (const g of fits) out[g.index] = { block: g.item.logical, result: 'failed', errno, reason: err instanceof Error ? err.message : String(err) };
        }
      }
    } finally {
      if (--this.inFlightRequests === 0) this.wakeDrainers();
    }
    for (let j = 0; j < items.length; j++) {
      if (out[j] !== undefined) continue;
      const first = out[firstIndex.get(items[j].block) as number];
      out[j] = first.result === 'remapped' ? { block: items[j].block, result: 'already-remapped', spare: first.spare } : { ...first };
    }
    return out;
  }

  // ------------------------------------------ import (DMR4 migration, issue 6)

  /**
   * A pending block whose spare block is bad is lost: it reads as EIO until
   * it is rewritten, without reading the bad spare block again. (A read error
   * on a spare block leaves a block in that state; so does markLost().)
   */
  private refuseLostBlocks(first: number, count: number): void {
    const end = first + count;
    for (let p = this.pending.nextInRange(first, end); p >= 0; p = this.pending.nextInRange(p + 1, end)) {
      const spare = this.table.get(p);
      if (spare >= 0 && this.badSpare.has(spare)) {
        this.st.readErrors++;
        throw new RemapError(ERRNO.EIO, `block ${p} is unreadable until it is rewritten (pending; its spare block ${spare} is bad)`, {
          device: this.name, op: 'read', block: p,
        });
      }
    }
  }

  private checkLostable(blocks: readonly number[], op: string): void {
    if (this.stateValue === 'stopping' || this.stateValue === 'closed') {
      throw new RemapError(ERRNO.ESHUTDOWN, 'device is being removed', { device: this.name, op });
    }
    this.requireWritable(op);
    const seen = new Set<number>();
    for (const b of blocks) {
      if (!Number.isSafeInteger(b) || b < 0 || b >= this.blocks) {
        throw new RemapError(ERRNO.EINVAL, `block ${b} is outside the device (0..${this.blocks - 1})`, { device: this.name, op, block: b });
      }
      if (seen.has(b)) throw new RemapError(ERRNO.EINVAL, `block ${b} is given twice`, { device: this.name, op, block: b });
      seen.add(b);
      if (this.table.get(b) >= 0) throw new RemapError(ERRNO.EEXIST, `block ${b} is already remapped`, { device: this.name, op, block: b });
    }
  }

  /**
   * Marks blocks lost, durably: they read as EIO until they are rewritten
   * (a write remaps them with the new data). Each takes one spare block,
   * recorded bad and never written, so that reads of the block leave the
   * fast path (see refuseLostBlocks). Used by import-dmr4 for entries whose
   * data cannot be trusted (data it can trust goes through
   * remapBlocksWithData). One commit per group of `groupSize`. Blocks must
   * not be remapped already (EEXIST).
   */
  async markLost(blocks: readonly number[], opts: { groupSize?: number } = {}): Promise<Array<{ block: number; spare: number }>> {
    this.checkLostable(blocks, 'mark-lost');
    if (blocks.length > this.allocator.free) {
      throw new RemapError(ERRNO.ENOSPC, `marking ${blocks.length} block(s) lost needs more than the ${this.allocator.free} free spare block(s)`, {
        device: this.name, op: 'mark-lost',
      });
    }
    const group = opts.groupSize ?? MANUAL_REMAP_GROUP;
    const out: Array<{ block: number; spare: number }> = [];
    this.inFlightRequests++;
    try {
      for (let i = 0; i < blocks.length; i += group) {
        const part = blocks.slice(i, i + group);
        const unlock = await this.lockBlocks(part);
        const allocated: number[] = [];
        try {
          const placed = part.map((block) => {
            const spare = this.allocateSpare(block, 'mark-lost');
            allocated.push(spare);
            return { block, spare };
          });
          // REMAP clears pending, so PENDING_ADD comes after it.
          await this.commit(placed.flatMap(({ block, spare }) => [
            { type: RecordType.SPARE_BAD, logical: 0, spare, dataCrc: 0 },
            { type: RecordType.REMAP, logical: block, spare, dataCrc: 0 },
            { type: RecordType.PENDING_ADD, logical: block, spare: 0, dataCrc: 0 },
          ]));
          for (const { block, spare } of placed) {
            this.badSpare.add(spare);
            this.markSlow([block]);
            this.table.set(block, spare);
            this.pending.add(block);
            out.push({ block, spare });
          }
          allocated.length = 0;
          this.log.warn({ event: 'mark-lost', blocks: part.length, first: part[0] }, `${part.length} block(s) marked lost: unreadable until rewritten`);
        } catch (err) {
          this.quarantine(allocated);
          throw err;
        } finally {
          unlock();
        }
      }
    } finally {
      if (--this.inFlightRequests === 0) this.wakeDrainers();
    }
    return out;
  }

  // ------------------------------------------------------- spare pool (issue 6)

  /** Device UUID of the metadata; extra spares' labels carry it. */
  private readonly deviceUuid: string | null;
  /** How spare add opens a new spare (O_DIRECT like the others). */
  private readonly spareOpen: { direct: boolean; queueDepth?: number };
  /** Records one checkpoint holds (null: unlimited). */
  private readonly checkpointCapacity: number | null;
  /** One addSpare() at a time. */
  private spareAddChain: Promise<unknown> = Promise.resolve();

  /**
   * How many more spare blocks the metadata can describe (in a next extra
   * spare); null when unlimited. See poolRoom().
   */
  spareRoom(): number | null {
    if (this.checkpointCapacity === null) return null;
    const primary = this.allocator.info()[0].blocks;
    return Math.max(0, poolRoom(this.checkpointCapacity, primary, this.allocator.count) - (this.allocator.total - primary));
  }

  /** Every spare of the pool: spare 0 is the primary (it holds the metadata). */
  spareInfo(): SpareInfo[] {
    return this.allocator.info();
  }

  /**
   * Adds an extra spare online: opens `path` (exclusively, O_DIRECT like the
   * others), refuses one that shares storage with main or another spare of
   * this device, writes its label (a blank spare only with `format`; never
   * over the label of another device, a damaged label, or dm-remapd
   * metadata), syncs it, commits SPARE_ADD durably, and only then lets the
   * allocator hand out its blocks. A label of this device with the next
   * ordinal, left by an add whose commit never landed, is reused.
   */
  addSpare(path: string, opts: { format?: boolean } = {}): Promise<SpareInfo> {
    const run = this.spareAddChain.then(() => this.addSpareNow(path, opts.format === true));
    this.spareAddChain = run.catch(() => undefined);
    return run;
  }

  private async addSpareNow(path: string, format: boolean): Promise<SpareInfo> {
    const op = 'spare-add';
    if (this.stateValue === 'stopping' || this.stateValue === 'closed') {
      throw new RemapError(ERRNO.ESHUTDOWN, 'device is being removed', { device: this.name, op });
    }
    this.requireWritable(op);
    if (this.deviceUuid === null) throw new RemapError(ERRNO.EINVAL, 'the device UUID is unknown; cannot label a spare', { device: this.name, op });
    const ordinal = this.allocator.count;
    const bs = this.blockSize;
    let dev: BackingDevice;
    try {
      dev = withReliableFua(BackingDevice.open(path, { direct: this.spareOpen.direct, exclusive: true, queueDepth: this.spareOpen.queueDepth }));
    } catch (err) {
      const errno = err instanceof RemapError ? err.errno : ERRNO.EIO;
      throw new RemapError(errno, `spare ${path} cannot be opened`, { device: this.name, op }, { cause: err });
    }
    try {
      const others: Array<[string, BackingDevice]> = [['main', this.main], ['spare 0', this.spare],
        ...this.allocator.extras().map((x): [string, BackingDevice] => [`spare ${x.ordinal}`, x.dev])];
      for (const [role, other] of others) {
        const clash = storageClash(other.info, dev.info);
        if (clash !== null) throw new RemapError(ERRNO.EBUSY, `spare ${path} is already used as ${role} of this device (${clash})`, { device: this.name, op });
      }
      if (dev.info.logicalBlockSize > bs) {
        throw new RemapError(ERRNO.EINVAL, `spare ${path} has ${dev.info.logicalBlockSize}-byte sectors, more than the ${bs}-byte block`, { device: this.name, op });
      }
      const found = await readLabel(dev);
      if (found.ok) {
        const l = found.label;
        if (l.deviceUuid !== this.deviceUuid) {
          throw new RemapError(ERRNO.EEXIST, `spare ${path} is spare ${l.ordinal} of another device (UUID ${l.deviceUuid}); refusing to overwrite its label`, { device: this.name, op });
        }
        if (l.ordinal !== ordinal) {
          throw new RemapError(ERRNO.EEXIST, `spare ${path} carries the label of spare ${l.ordinal} of this device, not of the next spare ${ordinal}; refusing to overwrite it`, {
            device: this.name, op,
          });
        }
        this.log.warn({ event: 'spare-label-reused', spare: path, ordinal }, `spare ${path}: reusing the label of spare ${ordinal} left by an add that was not committed`);
      } else if (found.metadata) {
        throw new RemapError(ERRNO.EEXIST, `spare ${path} holds dm-remapd metadata (the primary spare of a device); refusing to overwrite it`, { device: this.name, op });
      } else if (found.magic) {
        throw new RemapError(ERRNO.EBADMSG, `spare ${path} holds a damaged spare label (${found.reason}); refusing to overwrite it (wipe its first 4 KiB to reuse it)`, {
          device: this.name, op,
        });
      } else if (!format) {
        throw new RemapError(ERRNO.ENODATA, `spare ${path} has no spare label; pass --format to label it (its first ${LABEL_BYTES} bytes are overwritten)`, {
          device: this.name, op,
        });
      }
      const physical = Math.min(MAX_SPARE_BLOCKS, Math.floor((dev.info.sizeBytes - LABEL_BYTES) / bs));
      if (!(physical >= 1)) {
        throw new RemapError(ERRNO.ENOSPC, `spare ${path} (${dev.info.sizeBytes} bytes) is too small for its ${LABEL_BYTES}-byte label and one ${bs}-byte block`, {
          device: this.name, op,
        });
      }
      const room = this.spareRoom();
      const blocks = room === null ? physical : Math.min(physical, room);
      if (blocks < 1) {
        const primary = this.allocator.info()[0].blocks;
        throw new RemapError(ERRNO.ENOSPC, `the metadata has no room for more spare blocks: a checkpoint holds ${this.checkpointCapacity} records, `
          + `sized at format for the ${primary} blocks of the primary spare${this.allocator.count > 1 ? ` and ${this.allocator.total - primary} extra ones` : ''}; `
          + `format the primary spare with a pool reserve (add --format --pool-reserve SIZE) to add spares`, { device: this.name, op });
      }
      if (blocks < physical) {
        this.log.warn({ event: 'spare-truncated', spare: path, blocks, physicalBlocks: physical },
          `spare ${path}: only ${blocks} of its ${physical} blocks are used: the metadata has room for no more (pool reserve)`);
      }
      const label = allocAligned(LABEL_BYTES);
      label.set(encodeLabel({ deviceUuid: this.deviceUuid, ordinal, blockSize: bs, dataOffset: LABEL_BYTES, dataBlocks: blocks, createdAtMs: Date.now() }));
      const labelCrc = new DataView(label.buffer, label.byteOffset, LABEL_BYTES).getUint32(LABEL_BYTES - 4, true);
      let r = await dev.io(BackingOp.WRITE, label, 0, LABEL_BYTES);
      if (r === LABEL_BYTES) r = await dev.io(BackingOp.FDATASYNC, null, 0, 0);
      if (r < 0 || (r > 0 && r !== LABEL_BYTES)) {
        const errno = r < 0 ? -r : ERRNO.EIO;
        throw new RemapError(errno, `writing the label of spare ${path} failed (${errnoName(errno)})`, { device: this.name, op });
      }
      await this.commit([{ type: RecordType.SPARE_ADD, logical: ordinal, spare: blocks, dataCrc: labelCrc }]);
      // Committed: hand out its blocks (in this continuation, for the checkpoint snapshot).
      const info = this.allocator.add({ ordinal, dev, path, dataOffset: LABEL_BYTES, blocks, labelCrc });
      if (this.allocator.free > 0) this.spareExhausted = false;
      this.log.info({ event: 'spare-added', spare: path, ordinal, blocks, spareBlocksTotal: this.allocator.total },
        `spare ${ordinal} (${path}, ${blocks} blocks) added to ${this.name}`);
      return info;
    } catch (err) {
      await dev.close(1000).catch(() => undefined);
      throw err;
    }
  }
}
