/**
 * The background scrub of one device: every `intervalHours` a rate-limited
 * scan pass (scan.ts) over the whole device, paused while clients are busy.
 * Client activity is read from the engine's own counters: requests the
 * engine counted that the scans did not issue, or any request in flight.
 * A pass that stops (a paused daemon is not a stop; a failure is) resumes
 * at the block where it stopped. The timer is unref'd and cleared by stop()
 * (device removal, daemon stop).
 */
import { readFileSync, renameSync, writeFileSync } from 'node:fs';
import type { Logger } from 'pino';
import type { BlockEngine, EngineStats } from '../engine/engine.js';
import type { ScrubConfig } from './config.js';
import { ScanRun, sleep, type ScanSnapshot } from './scan.js';

/** Requests a client can send: every one is counted once by the engine. */
export function engineRequests(s: EngineStats): number {
  return s.reads + s.writes + s.flushes + s.discards + s.writeZeroes;
}

/** What a device's scrub remembers across daemon restarts. */
export interface ScrubRecord {
  /** The device's size in blocks when saved: a record of another size is ignored. */
  blocks: number;
  nextBlock: number;
  passesDone: number;
  /** ms since the epoch; null: no pass completed yet. */
  lastPassEndedAt: number | null;
}

/**
 * `<stateDir>/scrub.json`: each device's scrub position, so that a restart
 * neither starts a pass over nor postpones a due pass by a whole interval.
 * Written (temp file, rename) at most every few seconds during a pass and
 * when a pass ends or stops. Losing it costs only a repeated or early pass:
 * no fsync.
 */
export class ScrubStore {
  private readonly recs = new Map<string, ScrubRecord>();
  private warned = false;

  constructor(private readonly path: string | null, private readonly log: Logger) {
    if (path === null) return;
    let text: string;
    try {
      text = readFileSync(path, 'utf8');
    } catch {
      return; // none yet
    }
    try {
      const v = JSON.parse(text) as { version?: unknown; devices?: unknown };
      if (v.version !== 1 || typeof v.devices !== 'object' || v.devices === null) throw new Error('not a version 1 scrub state');
      for (const [name, r] of Object.entries(v.devices as Record<string, unknown>)) {
        const x = r as Partial<ScrubRecord> | null;
        const nat = (n: unknown): n is number => typeof n === 'number' && Number.isSafeInteger(n) && n >= 0;
        if (x !== null && nat(x.blocks) && nat(x.nextBlock) && nat(x.passesDone) && (x.lastPassEndedAt === null || nat(x.lastPassEndedAt))) {
          this.recs.set(name, { blocks: x.blocks, nextBlock: x.nextBlock, passesDone: x.passesDone, lastPassEndedAt: x.lastPassEndedAt });
        }
      }
    } catch (err) {
      log.warn({ event: 'scrub-state-unreadable', path, err: String(err) }, `${path} is unreadable; scrubs start afresh`);
    }
  }

  get(name: string): ScrubRecord | undefined {
    return this.recs.get(name);
  }

  set(name: string, rec: ScrubRecord): void {
    this.recs.set(name, rec);
    if (this.path === null) return;
    const tmp = `${this.path}.tmp-${process.pid}`;
    try {
      writeFileSync(tmp, `${JSON.stringify({ version: 1, devices: Object.fromEntries(this.recs) })}\n`, { mode: 0o644 });
      renameSync(tmp, this.path);
    } catch (err) {
      if (!this.warned) this.log.warn({ event: 'scrub-state-write-failed', path: this.path, err: String(err) }, `cannot write ${this.path}; scrub positions are kept in memory only`);
      this.warned = true;
    }
  }
}

export interface ScrubStatus {
  state: 'waiting' | 'running' | 'paused' | 'stopped';
  pauseReason: string | null;
  intervalMs: number;
  limitBytesPerSec: number;
  idleMs: number;
  /** Where the next (or current) pass goes on from. */
  nextBlock: number;
  passesDone: number;
  lastPassEndedAt: string | null;
  /** When the next pass starts (state 'waiting'). */
  nextPassAt: string | null;
  /** Pauses for client activity or a manual scan, over all passes. */
  pauses: number;
  /** Unreadable blocks found, over all passes. */
  unreadable: number;
  current: ScanSnapshot | null;
  last: ScanSnapshot | null;
}

export interface ScrubberOptions {
  engine: BlockEngine;
  config: ScrubConfig;
  logger: Logger;
  /** Engine requests issued by scans of this device so far (scrub and manual). */
  ownRequests: () => number;
  countOwnRequest: () => void;
  /** A manual scan of the device runs: the scrub waits for it. */
  manualScanRunning: () => boolean;
  newJobId: () => string;
  /** Where positions survive a restart (none: memory only). */
  store?: ScrubStore;
}

/** Position saves during a pass, at most this often. */
const SAVE_EVERY_MS = 5000;

/** Longest single wait of a paused scrub before it looks again. */
const RECHECK_MAX_MS = 1000;
const RECHECK_MIN_MS = 20;

export class Scrubber {
  readonly device: string;
  private readonly intervalMs: number;
  private readonly rate: number;
  private timer: NodeJS.Timeout | null = null;
  private nextPassAt: number | null = null;
  private run: ScanRun | null = null;
  private stopped = false;
  private position = 0;
  private passes = 0;
  private pauses = 0;
  private found = 0;
  private last: ScanSnapshot | null = null;
  private lastPassEndedAt: number | null = null;
  private savedAt = 0;
  private lastClientRequests: number;
  private lastActive = Date.now();
  private readonly log: Logger;

  constructor(private readonly o: ScrubberOptions) {
    this.device = o.engine.name;
    this.intervalMs = Math.max(1, Math.round(o.config.intervalHours * 3_600_000));
    this.rate = Math.max(1, Math.round(o.config.rateMBps * 1024 * 1024));
    this.log = o.logger.child({ device: this.device });
    this.lastClientRequests = this.clientRequests();
  }

  private clientRequests(): number {
    return engineRequests(this.o.engine.stats) - this.o.ownRequests();
  }

  /**
   * Arms the first pass: one interval after the last completed pass (at
   * once, give or take a second, if that is past, and a pass stopped
   * midway resumes at its block), or one interval from now for a device
   * never scrubbed.
   */
  start(): void {
    const rec = this.o.store?.get(this.device);
    let delay = this.intervalMs;
    if (rec !== undefined && rec.blocks === this.o.engine.blocks) {
      this.position = rec.nextBlock < rec.blocks ? rec.nextBlock : 0;
      this.passes = rec.passesDone;
      this.lastPassEndedAt = rec.lastPassEndedAt;
      if (rec.lastPassEndedAt !== null) delay = Math.max(Math.min(1000, this.intervalMs), rec.lastPassEndedAt + this.intervalMs - Date.now());
      else if (this.position > 0) delay = Math.min(1000, this.intervalMs);
    }
    this.log.info({ event: 'scrub-scheduled', intervalMs: this.intervalMs, limitBytesPerSec: this.rate, idleMs: this.o.config.idleMs,
      nextBlock: this.position, passesDone: this.passes, firstPassInMs: delay },
    `scrub of ${this.device} every ${this.o.config.intervalHours} h at ${this.o.config.rateMBps} MiB/s; next pass in ${Math.round(delay / 1000)} s from block ${this.position}`);
    this.schedule(delay);
  }

  private save(nextBlock: number): void {
    this.savedAt = Date.now();
    this.o.store?.set(this.device, { blocks: this.o.engine.blocks, nextBlock, passesDone: this.passes, lastPassEndedAt: this.lastPassEndedAt });
  }

  /** Clears the timer and cancels a running pass (it ends at its next chunk boundary). */
  stop(reason: string): void {
    if (this.stopped) return;
    this.stopped = true;
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
    this.nextPassAt = null;
    if (this.run !== null) {
      this.save(this.run.nextBlock); // the chunk in flight is not done: resume at it
      this.run.cancel(reason);
    }
  }

  private schedule(ms: number): void {
    if (this.stopped) return;
    this.nextPassAt = Date.now() + ms;
    this.timer = setTimeout(() => {
      this.timer = null;
      this.nextPassAt = null;
      void this.pass();
    }, ms);
    this.timer.unref();
  }

  private async pass(): Promise<void> {
    if (this.stopped) return;
    const blocks = this.o.engine.blocks;
    if (this.position >= blocks) this.position = 0;
    const run = new ScanRun({
      kind: 'scrub', jobId: this.o.newJobId(), engine: this.o.engine, startBlock: this.position, endBlock: blocks,
      rateBytesPerSec: this.rate, logger: this.o.logger, gate: (r, signal) => this.gate(r, signal), onOwnRequest: this.o.countOwnRequest,
    });
    this.run = run;
    const s = await run.run();
    this.run = null;
    this.last = s;
    this.found += s.unreadable;
    if (s.state === 'done') {
      this.passes++;
      this.position = 0;
      this.lastPassEndedAt = Date.now();
    } else {
      this.position = s.nextBlock; // resume there
    }
    if (this.stopped) return; // stop() saved the position
    this.save(this.position);
    this.schedule(this.intervalMs);
  }

  /** Holds the pass while clients are busy or a manual scan runs. */
  private async gate(run: ScanRun, signal: AbortSignal): Promise<void> {
    if (Date.now() - this.savedAt >= SAVE_EVERY_MS) this.save(run.nextBlock);
    for (;;) {
      if (signal.aborted) return;
      const now = Date.now();
      const client = this.clientRequests();
      if (client !== this.lastClientRequests) {
        this.lastClientRequests = client;
        this.lastActive = now;
      }
      const idleFor = now - this.lastActive;
      let reason: string | null = null;
      let wait = RECHECK_MAX_MS;
      if (this.o.manualScanRunning()) {
        reason = 'a manual scan of the device is running';
      } else if (this.o.engine.status().inFlight > 0) {
        reason = 'client I/O in flight';
        wait = 50;
      } else if (idleFor < this.o.config.idleMs) {
        reason = `client I/O within the last ${this.o.config.idleMs} ms`;
        wait = this.o.config.idleMs - idleFor;
      }
      if (reason === null) {
        run.resume();
        return;
      }
      if (run.state !== 'paused') this.pauses++;
      run.pause(reason);
      await sleep(Math.min(RECHECK_MAX_MS, Math.max(RECHECK_MIN_MS, wait)), signal);
    }
  }

  status(): ScrubStatus {
    const current = this.run?.snapshot() ?? null;
    return {
      state: this.stopped ? 'stopped' : current === null ? 'waiting' : current.state === 'paused' ? 'paused' : 'running',
      pauseReason: current?.pauseReason ?? null,
      intervalMs: this.intervalMs,
      limitBytesPerSec: this.rate,
      idleMs: this.o.config.idleMs,
      nextBlock: current?.nextBlock ?? this.position,
      passesDone: this.passes,
      lastPassEndedAt: this.lastPassEndedAt === null ? null : new Date(this.lastPassEndedAt).toISOString(),
      nextPassAt: this.nextPassAt === null ? null : new Date(this.nextPassAt).toISOString(),
      pauses: this.pauses,
      unreadable: this.found + (current?.unreadable ?? 0),
      current,
      last: this.last,
    };
  }
}
