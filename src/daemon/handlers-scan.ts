/**
 * Control commands of surface scans and the background scrub
 * (docs/OPERATION.md, "Scan and scrub"):
 *   scanStart  {name, startBlock?, endBlock?, rateBytesPerSec?, chunkBytes?,
 *               remapUnreadable?: "zero", confirmDestroyUnreadableData?: true}
 *   scanStatus {jobId} | {name}
 *   scanCancel {name, jobId?}
 * A scan runs as a job in the daemon (one per device); remapctl polls it.
 * Jobs and scrubs end when their device is removed (and at daemon stop).
 */
import { join } from 'node:path';
import type { Logger } from 'pino';
import type { DaemonConfig } from './config.js';
import type { CommandHandler } from './control.js';
import type { DeviceEvent, DeviceManager } from './devices.js';
import { ControlError, argBool, argInt, argString } from './protocol.js';
import { DEFAULT_CHUNK_BYTES, ScanRun, type ScanSnapshot } from './scan.js';
import { ScrubStore, Scrubber, type ScrubStatus } from './scrub.js';

/** Scrub positions across restarts, in the state folder. */
export const SCRUB_STATE_FILE = 'scrub.json';

/** Finished jobs kept for scanStatus {jobId} (remapctl polls them to their end, even past a removal). */
const KEEP_JOBS = 32;

export interface ScanStatusResult {
  name: string;
  job: ScanSnapshot | null;
  scrub: ScrubStatus | null;
}

export class ScanService {
  private readonly jobs = new Map<string, ScanRun>();
  /** The latest manual scan job of each device. */
  private readonly current = new Map<string, ScanRun>();
  private readonly scrubbers = new Map<string, Scrubber>();
  /** Engine requests issued by the scans of each device (to tell client activity apart). */
  private readonly own = new Map<string, { requests: number }>();
  private seq = 0;
  private readonly log: Logger;
  private readonly store: ScrubStore | null;

  constructor(private readonly mgr: DeviceManager, private readonly cfg: DaemonConfig) {
    this.log = mgr.logger;
    this.store = cfg.scrub === undefined ? null : new ScrubStore(join(cfg.stateDir, SCRUB_STATE_FILE), this.log);
    mgr.onDevice((ev) => this.onDevice(ev));
  }

  private newJobId(kind: string): string {
    return `${kind}-${process.pid}-${++this.seq}`;
  }

  private ownOf(name: string): { requests: number } {
    let c = this.own.get(name);
    if (c === undefined) {
      c = { requests: 0 };
      this.own.set(name, c);
    }
    return c;
  }

  private onDevice(ev: DeviceEvent): void {
    if (ev.type === 'running') {
      this.own.set(ev.name, { requests: 0 });
      if (this.cfg.scrub === undefined) return;
      const own = this.ownOf(ev.name);
      const s = new Scrubber({
        engine: ev.engine, config: this.cfg.scrub, logger: this.log,
        ownRequests: () => own.requests, countOwnRequest: () => { own.requests++; },
        manualScanRunning: () => this.current.get(ev.name)?.active === true,
        newJobId: () => this.newJobId('scrub'), store: this.store ?? undefined,
      });
      this.scrubbers.get(ev.name)?.stop('replaced');
      this.scrubbers.set(ev.name, s);
      s.start();
      return;
    }
    this.current.get(ev.name)?.cancel('device is being removed');
    this.scrubbers.get(ev.name)?.stop('device is being removed');
    this.scrubbers.delete(ev.name);
    this.own.delete(ev.name);
  }

  private remember(run: ScanRun): void {
    this.jobs.set(run.jobId, run);
    if (this.jobs.size <= KEEP_JOBS) return;
    for (const [id, j] of this.jobs) {
      if (this.jobs.size <= KEEP_JOBS) break;
      if (!j.active) this.jobs.delete(id);
    }
  }

  start(args: Record<string, unknown>): ScanSnapshot {
    const name = argString('scanStart', args, 'name');
    const engine = this.mgr.runningEngine(name, 'scan');
    const blocks = engine.blocks;
    const startBlock = argInt('scanStart', args, 'startBlock', 0, Number.MAX_SAFE_INTEGER) ?? 0;
    const endBlock = argInt('scanStart', args, 'endBlock', 0, Number.MAX_SAFE_INTEGER) ?? blocks;
    if (startBlock >= blocks || endBlock > blocks) {
      throw new ControlError('INVALID_ARGUMENT', `scanStart: range of blocks ${startBlock}..${endBlock} (end exclusive) goes past the end of device "${name}" (${blocks} blocks of ${engine.blockSize} bytes)`);
    }
    if (endBlock <= startBlock) {
      throw new ControlError('INVALID_ARGUMENT', `scanStart: range of blocks ${startBlock}..${endBlock} (end exclusive) of device "${name}" is ${endBlock < startBlock ? 'reversed' : 'empty'}`);
    }
    const rate = argInt('scanStart', args, 'rateBytesPerSec', 1, Number.MAX_SAFE_INTEGER);
    const chunkBytes = argInt('scanStart', args, 'chunkBytes', 512, 64 * 1024 * 1024) ?? DEFAULT_CHUNK_BYTES;
    const mode = argString('scanStart', args, 'remapUnreadable', true);
    if (mode !== undefined && mode !== 'zero') {
      throw new ControlError('BAD_REQUEST', `scanStart: argument "remapUnreadable" must be "zero", got ${JSON.stringify(mode)}`);
    }
    const confirmed = argBool('scanStart', args, 'confirmDestroyUnreadableData') === true;
    if (mode === 'zero' && !confirmed) {
      throw new ControlError('BAD_REQUEST', `scanStart: remapUnreadable "zero" replaces the data of every unreadable block of device "${name}" with zeroes; `
        + 'confirm it with "confirmDestroyUnreadableData": true');
    }
    if (mode === 'zero' && engine.capabilities().readOnly) {
      throw new ControlError('INVALID_ARGUMENT', `scanStart: device "${name}" is read-only; its unreadable blocks cannot be remapped`);
    }
    const running = this.current.get(name);
    if (running?.active === true) {
      const s = running.snapshot();
      throw new ControlError('BUSY', `device "${name}" is already being scanned (job ${s.jobId}, ${s.percent}%); cancel it first (remapctl scan ${name} --cancel)`);
    }
    const own = this.ownOf(name);
    const run = new ScanRun({
      kind: 'scan', jobId: this.newJobId('scan'), engine, startBlock, endBlock, rateBytesPerSec: rate, chunkBytes,
      remapUnreadable: mode === 'zero' ? 'zero' : undefined, logger: this.log, onOwnRequest: () => { own.requests++; },
    });
    this.current.set(name, run);
    this.remember(run);
    void run.run();
    return run.snapshot();
  }

  status(args: Record<string, unknown>): ScanStatusResult | { job: ScanSnapshot } {
    const jobId = argString('scanStatus', args, 'jobId', true);
    if (jobId !== undefined) {
      const j = this.jobs.get(jobId);
      if (j === undefined) throw new ControlError('INVALID_ARGUMENT', `scanStatus: no scan job "${jobId}" (finished jobs are kept for the last ${KEEP_JOBS})`);
      return { job: j.snapshot() };
    }
    const name = argString('scanStatus', args, 'name');
    this.mgr.specOf(name); // UNKNOWN_DEVICE
    return { name, job: this.current.get(name)?.snapshot() ?? null, scrub: this.scrubbers.get(name)?.status() ?? null };
  }

  cancel(args: Record<string, unknown>): { name: string; cancelled: boolean; job: ScanSnapshot | null } {
    const name = argString('scanCancel', args, 'name');
    const jobId = argString('scanCancel', args, 'jobId', true);
    this.mgr.specOf(name); // UNKNOWN_DEVICE
    const run = this.current.get(name);
    if (run === undefined || (jobId !== undefined && run.jobId !== jobId)) return { name, cancelled: false, job: run?.snapshot() ?? null };
    const was = run.active;
    run.cancel('cancelled by request');
    if (was) this.log.info({ event: 'scan-cancel-requested', device: name, jobId: run.jobId }, `scan of ${name} cancelled by request`);
    return { name, cancelled: was, job: run.snapshot() };
  }
}

export function scanHandlers(mgr: DeviceManager, cfg: DaemonConfig): Record<string, CommandHandler> {
  const svc = new ScanService(mgr, cfg);
  return {
    scanStart: async (args) => svc.start(args),
    scanStatus: async (args) => svc.status(args),
    scanCancel: async (args) => svc.cancel(args),
  };
}
