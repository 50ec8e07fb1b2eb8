/**
 * DeviceManager: the add/remove lifecycle of remapped devices. Each device is
 * a BlockEngine plus (optionally) an NBD export. Added devices are remembered
 * in `<stateDir>/devices.json` and reassembled at the next start.
 */
import { realpath } from 'node:fs/promises';
import { isAbsolute } from 'node:path';
import type { Logger } from 'pino';
import type { BlockEngine, CloseReport, EngineStatus, ManualRemapResult } from '../engine/engine.js';
import type { OpenEngineOptions } from '../engine/open.js';
import type { SpareInfo } from '../engine/spare-pool.js';
import { ERRNO, RemapError } from '../errors.js';
import { stackOverlap } from '../engine/stack-overlap.js';
import { ControlError, DEVICE_NAME, errorBody, type ControlErrorBody } from './protocol.js';
import { StateFile, type DeviceSpec } from './state.js';
import { HEALTH_DEFAULTS, HealthTracker, type DeviceHealth, type HealthConfig, type HealthVerdict } from './health.js';

export type { DeviceSpec } from './state.js';

/** A device's /dev/ublkbN with the queues and depth the kernel gave it (`remapctl status --json`, "ublk"). */
export interface UblkStatus {
  device: string;
  queues: number;
  depth: number;
}

/** The part of an NBD export the manager uses (NbdExport satisfies it). */
export interface ExportHandle {
  readonly endpoints: string[];
  /** Set by the ublk export. */
  readonly ublk?: UblkStatus;
  connectionCount(): number;
  /** reason 'shutdown' (daemon stop): a ublk device with USER_RECOVERY is left to the next daemon instead of deleted. */
  close(deadlineMs: number, reason?: 'remove' | 'shutdown'): Promise<{ connectionsClosed: number }>;
}

/** Starts the export of a device, or returns null when the spec asks for none. */
export type ExportStarter = (engine: BlockEngine, spec: DeviceSpec, logger: Logger, ctx?: { stateDir?: string }) => Promise<ExportHandle | null>;
export type EngineOpener = (o: OpenEngineOptions) => Promise<BlockEngine>;

/** Attaches the kernel NBD client for `spec.nbdDevice` (src/frontends/nbd-kernel); loaded only when asked for. */
export const attachKernelNbd: ExportStarter = async (engine, spec, logger) => {
  if (spec.nbdDevice === undefined) return null;
  const { attachNbdDevice } = await import('../frontends/nbd-kernel/index.js');
  const a = await attachNbdDevice(engine, { device: spec.nbdDevice, readOnly: spec.readOnly, logger: logger.child({ device: spec.name }) });
  return { endpoints: [a.device], connectionCount: () => (a.session.state === 'closed' ? 0 : 1), close: (ms) => a.detach(ms) };
};

/** Serves the device as /dev/ublkbN for `spec.ublk` (src/frontends/ublk); loaded only when asked for. */
/** With ctx.stateDir, a restarted daemon recovers (or deletes) the device of the previous one (docs/UBLK.md "Crash recovery"). */
export const attachKernelUblk: ExportStarter = async (engine, spec, logger, ctx) => {
  if (spec.ublk !== true) return null;
  const { startUblkExport } = await import('../frontends/ublk/index.js');
  return startUblkExport(engine, spec, logger, ctx);
};

/** Both handles as one: closed in parallel within the same deadline. */
function joinExports(a: ExportHandle | null, b: ExportHandle | null): ExportHandle | null {
  if (a === null || b === null) return a ?? b;
  return {
    endpoints: [...a.endpoints, ...b.endpoints],
    ublk: a.ublk ?? b.ublk,
    connectionCount: () => a.connectionCount() + b.connectionCount(),
    close: async (ms, reason) => {
      const [x, y] = await Promise.all([a.close(ms, reason), b.close(ms, reason)]);
      return { connectionsClosed: x.connectionsClosed + y.connectionsClosed };
    },
  };
}

export type DeviceState = 'starting' | 'running' | 'stopping' | 'failed';

/**
 * What feature services (scan, scrub) hear of a device's life: 'running'
 * once it is added (or reassembled), 'removing' when its removal begins,
 * before its engine closes (daemon stop included).
 */
export type DeviceEvent = { type: 'running' | 'removing'; name: string; engine: BlockEngine };

interface Entry {
  spec: DeviceSpec;
  state: 'starting' | 'running' | 'stopping' | 'failed';
  engine?: BlockEngine;
  exp?: ExportHandle | null;
  /** Why the device could not be assembled (state 'failed' without an engine). */
  error?: ControlErrorBody;
  /** Resolved main and spare paths, for the in-use check. */
  paths: string[];
  /** Samples the engine's counters on a timer (stopped at removal). */
  health?: HealthTracker;
}

export interface DeviceStatus {
  name: string;
  state: DeviceState;
  main: string;
  spare: string | null;
  spareTailBytes: number | null;
  exports: string[];
  /** The ublk device and its queues x depth; null when the device has none (attached). */
  ublk: UblkStatus | null;
  connections: number;
  sizeBytes: number | null;
  blockSize: number | null;
  openMode: 'direct' | 'buffered' | null;
  remappedBlocks: number | null;
  pendingBlocks: number | null;
  badSpareBlocks: number | null;
  quarantinedSpareBlocks: number | null;
  spareBlocksTotal: number | null;
  spareBlocksUsed: number | null;
  spareExhausted: boolean | null;
  breakerTripped: boolean | null;
  readErrors: number | null;
  writeErrors: number | null;
  metadataSeq: number | null;
  inFlight: number | null;
  failReason: string | null;
  error: ControlErrorBody | null;
  stats: EngineStatus['stats'] | null;
  /** Spare pool: every spare (0 = the primary, holding the metadata) with its path, blocks and use; null without an engine. */
  spares: SpareInfo[] | null;
  /** ok / degraded / failing / spare-exhausted (src/daemon/health.ts); null while starting. */
  health: DeviceHealth | null;
  healthReasons: string[];
}

export interface RemoveReport {
  name: string;
  deadlineMs: number;
  elapsedMs: number;
  /** The removal did not finish within the deadline; what remains runs in the background. */
  timedOut: boolean;
  connectionsClosed: number;
  requestsAbandoned: number;
  ioCancelled: number;
  ioAbandoned: number;
  metadataAborted: boolean;
  synced: boolean;
  /** Human summary of what was cancelled. */
  cancelled: string[];
}

export interface DeviceManagerOptions {
  stateDir: string;
  logger: Logger;
  openEngine: EngineOpener;
  startExport: ExportStarter;
  /** The kernel NBD attach for specs with nbdDevice (default: attachKernelNbd). */
  attachNbd?: ExportStarter;
  /** The ublk frontend for specs with ublk (default: attachKernelUblk). */
  attachUblk?: ExportStarter;
  /** Metadata timeout when a spec gives none (5000). */
  defaultMetadataTimeoutMs?: number;
  /** Health thresholds and sampling interval (HEALTH_DEFAULTS). */
  health?: HealthConfig;
}

/** Extra time past the deadline the removal may take before remove() answers anyway. */
const REMOVE_SLACK_MS = 500;

export class DeviceManager {
  private readonly devices = new Map<string, Entry>();
  /** Names whose removal timed out: not re-addable until their close settles. */
  private readonly draining = new Map<string, Promise<unknown>>();
  private readonly state: StateFile;
  private readonly log: Logger;
  private shuttingDown = false;
  private readonly listeners: Array<(ev: DeviceEvent) => void> = [];

  constructor(private readonly o: DeviceManagerOptions) {
    this.state = new StateFile(o.stateDir);
    this.log = o.logger;
  }

  get size(): number {
    return this.devices.size;
  }

  /** The daemon's logger, for feature services. */
  get logger(): Logger {
    return this.log;
  }

  /** Calls `fn` on each DeviceEvent; a listener that throws is logged, never fails the add or removal. */
  onDevice(fn: (ev: DeviceEvent) => void): void {
    this.listeners.push(fn);
  }

  private emit(ev: DeviceEvent): void {
    for (const fn of this.listeners) {
      try {
        fn(ev);
      } catch (err) {
        this.log.error({ event: 'device-listener-failed', device: ev.name, type: ev.type, error: errorBody(err) }, `a ${ev.type} listener of ${ev.name} failed`);
      }
    }
  }

  private timeoutOf(spec: DeviceSpec): number {
    return spec.metadataTimeoutMs ?? this.o.defaultMetadataTimeoutMs ?? 5000;
  }

  private persist(): Promise<void> {
    const specs = [...this.devices.values()].map((e) => e.spec);
    return this.state.save(specs);
  }

  private get(name: string): Entry {
    const e = this.devices.get(name);
    if (e === undefined) throw new ControlError('UNKNOWN_DEVICE', `no device named "${name}"`);
    return e;
  }

  /**
   * Adds and starts a device. `format` formats a spare that has no metadata.
   * Persisted in devices.json unless `persist` is false (reassembly).
   */
  async add(spec: DeviceSpec, opts: { format?: boolean; persist?: boolean; beforeExport?: (engine: BlockEngine) => Promise<void> } = {}): Promise<DeviceStatus> {
    if (this.shuttingDown) throw new ControlError('SHUTTING_DOWN', 'dm-remapd is shutting down');
    if (!DEVICE_NAME.test(spec.name)) {
      throw new ControlError('BAD_REQUEST', `device name "${spec.name}" is invalid: use 1-64 letters, digits, '.', '_' or '-'`);
    }
    for (const [key, p] of [['main', spec.main], ['spare', spec.spare], ...(spec.spares ?? []).map((x) => ['spares', x] as const)] as const) {
      if (p !== undefined && !isAbsolute(p)) throw new ControlError('BAD_REQUEST', `add: argument "${key}" must be an absolute path, got "${p}"`);
    }
    const existing = this.devices.get(spec.name);
    if (existing !== undefined) {
      throw new ControlError('DEVICE_EXISTS', `device "${spec.name}" already exists (state ${existing.state}, main ${existing.spec.main}); remove it first`);
    }
    if (this.draining.has(spec.name)) {
      throw new ControlError('BUSY', `device "${spec.name}" is still draining I/O from its last removal; try again later`);
    }
    const paths = await this.resolvePaths(spec);
    for (const [other, e] of this.devices) {
      const clash = paths.find((p) => e.paths.includes(p));
      if (clash !== undefined) throw new ControlError('BUSY', `${clash} is already used by device "${other}"`);
      // Another device on the same storage (a partition of its disk, a loop device over its image, ...).
      for (const p of paths) {
        for (const q of e.paths) {
          const c = stackOverlap(q, p);
          if (c !== null && !c.sameDevice) {
            throw new ControlError('BUSY', `${p} overlaps ${q}, used by device "${other}": both are stored on ${c.layer} (bytes ${c.b[0]}..${c.b[1]} and ${c.a[0]}..${c.a[1]})`);
          }
        }
      }
    }
    const entry: Entry = { spec, state: 'starting', paths };
    this.devices.set(spec.name, entry);
    const log = this.log.child({ device: spec.name });
    try {
      const engine = await this.o.openEngine({
        name: spec.name,
        mainPath: spec.main,
        sparePath: spec.spare,
        spareTailBytes: spec.spareTailBytes,
        extraSpares: spec.spares,
        poolReserveBytes: spec.poolReserveBytes,
        format: opts.format === true,
        blockSize: spec.blockSize,
        metadataTimeoutMs: this.timeoutOf(spec),
        allowIdentityChange: spec.allowIdentityChange,
        readOnly: spec.readOnly,
        logger: this.log, // the engine adds the device to its own log lines
      });
      entry.engine = engine;
      if (opts.beforeExport !== undefined) {
        // e.g. import-dmr4: fills the new device before any client can connect.
        try {
          await opts.beforeExport(engine);
        } catch (err) {
          await engine.close(this.timeoutOf(spec)).catch(() => undefined);
          throw err;
        }
      }
      try {
        entry.exp = await this.o.startExport(engine, spec, this.log);
      } catch (err) {
        await engine.close(this.timeoutOf(spec)).catch(() => undefined);
        throw err;
      }
      if (spec.nbdDevice !== undefined) {
        try {
          entry.exp = joinExports(entry.exp, await (this.o.attachNbd ?? attachKernelNbd)(engine, spec, this.log));
        } catch (err) {
          await entry.exp?.close(this.timeoutOf(spec)).catch(() => undefined);
          await engine.close(this.timeoutOf(spec)).catch(() => undefined);
          throw err;
        }
      }
      if (spec.ublk === true) {
        try {
          entry.exp = joinExports(entry.exp, await (this.o.attachUblk ?? attachKernelUblk)(engine, spec, this.log, { stateDir: this.o.stateDir }));
        } catch (err) {
          await entry.exp?.close(this.timeoutOf(spec)).catch(() => undefined);
          await engine.close(this.timeoutOf(spec)).catch(() => undefined);
          throw err;
        }
      }
    } catch (err) {
      this.devices.delete(spec.name);
      log.error({ event: 'add-failed', error: errorBody(err) }, `device ${spec.name} could not be added: ${errorBody(err).message}`);
      throw err;
    }
    if (entry.state === 'starting') entry.state = 'running';
    if (opts.persist !== false) await this.persist();
    this.startHealth(entry);
    if (entry.engine !== undefined) this.emit({ type: 'running', name: spec.name, engine: entry.engine });
    log.info({ event: 'added', main: spec.main, spare: spec.spare ?? null, spareTailBytes: spec.spareTailBytes ?? null, exports: entry.exp?.endpoints ?? [] },
      `device ${spec.name} added`);
    return this.statusOf(entry);
  }

  private async resolvePaths(spec: DeviceSpec): Promise<string[]> {
    const out: string[] = [];
    for (const [role, p] of [['main', spec.main], ['spare', spec.spare], ...(spec.spares ?? []).map((x, i) => [`spare ${i + 1}`, x] as const)] as const) {
      if (p === undefined) continue;
      try {
        out.push(await realpath(p));
      } catch (e) {
        const code = (e as { code?: string }).code;
        const errno = code !== undefined && code in ERRNO ? ERRNO[code as keyof typeof ERRNO] : ERRNO.EIO;
        throw new RemapError(errno, errno === ERRNO.ENOENT ? `${role} ${p} does not exist` : `${role} ${p} cannot be resolved`, { device: spec.name, op: 'add' });
      }
    }
    return out;
  }

  /** Reassembles the devices remembered in devices.json. A device that fails stays listed as failed. */
  async reassemble(): Promise<{ started: number; failed: number }> {
    const specs = await this.state.load();
    let started = 0;
    let failed = 0;
    for (const spec of specs) {
      try {
        await this.add(spec, { persist: false });
        started++;
      } catch (err) {
        failed++;
        const error = errorBody(err);
        this.devices.set(spec.name, { spec, state: 'failed', error, paths: [] });
        this.log.error({ event: 'reassemble-failed', device: spec.name, main: spec.main, spare: spec.spare ?? null, error },
          `device ${spec.name} could not be reassembled: ${error.message}; the other devices are still served`);
      }
    }
    return { started, failed };
  }

  list(): DeviceStatus[] {
    return [...this.devices.values()].map((e) => this.statusOf(e));
  }

  status(name: string): DeviceStatus {
    return this.statusOf(this.get(name));
  }

  private statusOf(e: Entry): DeviceStatus {
    const s = e.engine?.status();
    let state: DeviceState = e.state;
    if (s !== undefined && state === 'running' && s.state === 'failed') state = 'failed';
    return {
      name: e.spec.name,
      state,
      main: e.spec.main,
      spare: e.spec.spare ?? null,
      spareTailBytes: e.spec.spareTailBytes ?? null,
      exports: e.exp?.endpoints ?? [],
      ublk: e.exp?.ublk ?? null,
      connections: e.exp?.connectionCount() ?? 0,
      sizeBytes: s?.sizeBytes ?? null,
      blockSize: s?.blockSize ?? null,
      openMode: s?.openMode ?? null,
      remappedBlocks: s?.remappedBlocks ?? null,
      pendingBlocks: s?.pendingBlocks ?? null,
      badSpareBlocks: s?.badSpareBlocks ?? null,
      quarantinedSpareBlocks: s?.quarantinedSpareBlocks ?? null,
      spareBlocksTotal: s?.spareBlocksTotal ?? null,
      spareBlocksUsed: s?.spareBlocksUsed ?? null,
      spareExhausted: s?.spareExhausted ?? null,
      breakerTripped: s?.breakerTripped ?? null,
      readErrors: s?.stats.readErrors ?? null,
      writeErrors: s?.stats.writeErrors ?? null,
      metadataSeq: s?.metadataSeq ?? null,
      inFlight: s?.inFlight ?? null,
      failReason: s?.failReason ?? e.error?.message ?? null,
      error: e.error ?? null,
      stats: s?.stats ?? null,
      spares: e.engine?.spareInfo() ?? null,
      ...this.healthOf(e),
    };
  }

  private startHealth(e: Entry): void {
    const engine = e.engine;
    if (engine === undefined) return;
    e.health = new HealthTracker({
      device: e.spec.name,
      config: this.o.health ?? HEALTH_DEFAULTS,
      logger: this.log,
      sample: () => {
        const s = engine.status();
        return {
          readErrors: s.stats.readErrors, writeErrors: s.stats.writeErrors, autoRemaps: s.stats.autoRemaps,
          spareUsed: s.spareBlocksUsed, spareTotal: s.spareBlocksTotal, spareExhausted: s.spareExhausted,
          breakerTripped: s.breakerTripped, engineFailed: s.state === 'failed', failReason: s.failReason,
        };
      },
    });
    e.health.start();
  }

  private healthOf(e: Entry): { health: DeviceHealth | null; healthReasons: string[] } {
    if (e.health !== undefined && e.engine !== undefined) {
      const v: HealthVerdict = e.health.current();
      return { health: v.health, healthReasons: v.reasons };
    }
    if (e.state === 'failed') return { health: 'failing', healthReasons: [`not assembled: ${e.error?.message ?? 'unknown reason'}`] };
    return { health: null, healthReasons: [] };
  }

  /** The engine of a device in any state (metrics), or null when it has none. */
  engineOf(name: string): BlockEngine | null {
    return this.devices.get(name)?.engine ?? null;
  }

  /**
   * The engine of a running device, for an operation named `what` (scan,
   * import, ...): UNKNOWN_DEVICE, or BUSY/IO_ERROR naming the device's state.
   */
  runningEngine(name: string, what: string): BlockEngine {
    const e = this.get(name);
    if (e.engine === undefined || e.state !== 'running') {
      throw new ControlError(e.state === 'failed' ? 'IO_ERROR' : 'BUSY', `device "${name}" is ${e.state}${e.error ? ` (${e.error.message})` : ''}; cannot ${what}`);
    }
    return e.engine;
  }

  /** The spec of a device (as persisted), for feature handlers. */
  specOf(name: string): Readonly<DeviceSpec> {
    return this.get(name).spec;
  }

  async remap(name: string, blocks: number[]): Promise<ManualRemapResult[]> {
    const results = await this.runningEngine(name, 'remap').remapBlocks(blocks);
    this.log.info({ event: 'manual-remap', device: name, blocks: blocks.length, remapped: results.filter((r) => r.result === 'remapped').length },
      `manual remap of ${blocks.length} block(s) on ${name}`);
    return results;
  }

  /**
   * Removes a device within one deadline (default: its metadata timeout):
   * stop the export, close the engine with the time that remains. Always
   * answers within the deadline plus REMOVE_SLACK_MS.
   */
  async remove(name: string, timeoutMs?: number, opts: { persist?: boolean } = {}): Promise<RemoveReport> {
    const e = this.get(name);
    if (e.state === 'starting') throw new ControlError('BUSY', `device "${name}" is still starting; try again when it is running`);
    if (e.state === 'stopping') throw new ControlError('BUSY', `device "${name}" is already being removed`);
    const deadlineMs = timeoutMs ?? this.timeoutOf(e.spec);
    const started = Date.now();
    const log = this.log.child({ device: name });
    const base: RemoveReport = {
      name, deadlineMs, elapsedMs: 0, timedOut: false, connectionsClosed: 0, requestsAbandoned: 0,
      ioCancelled: 0, ioAbandoned: 0, metadataAborted: false, synced: false, cancelled: [],
    };
    if (e.engine === undefined) {
      // Never assembled: only forget it.
      this.devices.delete(name);
      if (opts.persist !== false) await this.persist();
      if (opts.persist !== false && e.spec.ublk === true) {
        // Its ublk device, left quiesced (or stopped) by an earlier daemon, goes too (docs/UBLK.md).
        const { dropUblkRecord } = await import('../frontends/ublk/index.js');
        await dropUblkRecord(this.o.stateDir, name, this.log).catch((err: unknown) => {
          log.warn({ event: 'ublk-record-drop-failed', error: errorBody(err) }, `device ${name}: its earlier ublk device could not be deleted`);
        });
      }
      log.info({ event: 'removed', ...base }, `device ${name} removed (it was not assembled)`);
      return base;
    }
    e.state = 'stopping';
    e.health?.stop();
    this.emit({ type: 'removing', name, engine: e.engine });
    const engine = e.engine;
    const exp = e.exp ?? null;
    const report = { ...base };
    const work = (async (): Promise<void> => {
      if (exp !== null) {
        const r = await exp.close(deadlineMs, this.shuttingDown ? 'shutdown' : 'remove').catch((err: unknown) => {
          log.warn({ event: 'export-close-failed', error: errorBody(err) }, 'closing the export failed');
          return { connectionsClosed: 0 };
        });
        report.connectionsClosed = r.connectionsClosed;
      }
      const remaining = Math.max(0, deadlineMs - (Date.now() - started));
      const c: CloseReport = await engine.close(remaining);
      report.requestsAbandoned = c.requestsAbandoned;
      report.ioCancelled = c.ioCancelled;
      report.ioAbandoned = c.ioAbandoned;
      report.metadataAborted = c.metadataAborted;
      report.synced = c.synced;
    })();
    let timer: NodeJS.Timeout | undefined;
    const hardStop = new Promise<'timeout'>((resolve) => {
      timer = setTimeout(() => resolve('timeout'), deadlineMs + REMOVE_SLACK_MS);
    });
    let outcome: 'done' | 'timeout' | 'error';
    let failure: unknown;
    try {
      outcome = await Promise.race([work.then(() => 'done' as const), hardStop]);
    } catch (err) {
      outcome = 'error';
      failure = err;
    } finally {
      clearTimeout(timer);
    }
    this.devices.delete(name);
    if (outcome === 'timeout') {
      report.timedOut = true;
      const settle = work.catch(() => undefined).finally(() => {
        this.draining.delete(name);
        log.info({ event: 'drained' }, `device ${name}: late I/O of the removal has settled`);
      });
      this.draining.set(name, settle);
    }
    report.elapsedMs = Date.now() - started;
    if (report.connectionsClosed > 0) report.cancelled.push(`${report.connectionsClosed} NBD connection(s) closed`);
    if (report.requestsAbandoned > 0) report.cancelled.push(`${report.requestsAbandoned} request(s) abandoned (answered ESHUTDOWN)`);
    if (report.ioCancelled > 0) report.cancelled.push(`${report.ioCancelled} backing I/O(s) cancelled`);
    if (report.ioAbandoned > 0) report.cancelled.push(`${report.ioAbandoned} backing I/O(s) abandoned in the kernel`);
    if (report.metadataAborted) report.cancelled.push('a pending metadata commit was aborted');
    if (report.timedOut) report.cancelled.push(`removal exceeded its ${deadlineMs} ms deadline; the rest continues in the background`);
    if (opts.persist !== false) await this.persist();
    if (outcome === 'error') {
      log.error({ event: 'remove-failed', error: errorBody(failure), ...report }, `device ${name} removal failed`);
      throw failure;
    }
    log.info({ event: 'removed', ...report }, `device ${name} removed in ${report.elapsedMs} ms`);
    return report;
  }

  /**
   * Daemon shutdown: removes every device (they are all NBD-only) within
   * `timeoutMs` each, in parallel, without forgetting them in devices.json.
   */
  async shutdown(timeoutMs?: number): Promise<RemoveReport[]> {
    this.shuttingDown = true;
    const names = [...this.devices.keys()];
    const reports = await Promise.all(names.map(async (n) => {
      try {
        return await this.remove(n, timeoutMs, { persist: false });
      } catch (err) {
        this.log.error({ event: 'shutdown-remove-failed', device: n, error: errorBody(err) }, `device ${n} could not be removed cleanly`);
        return null;
      }
    }));
    return reports.filter((r): r is RemoveReport => r !== null);
  }

  // ------------------------------------------------------- spare pool (issue 6)

  /** Devices with a spare add under way. */
  private readonly addingSpare = new Set<string>();

  /**
   * Adds an extra spare to a running device (handlers-spare.ts). The path is
   * checked against every part of every device (BUSY), written to
   * devices.json before the engine commits the spare (so a restart always
   * finds a committed spare's path), and taken out again when the add fails
   * before its commit was attempted.
   */
  async addSpare(name: string, path: string, format: boolean): Promise<SpareInfo> {
    const e = this.get(name);
    const engine = this.runningEngine(name, 'add a spare');
    if (!isAbsolute(path)) throw new ControlError('BAD_REQUEST', `spareAdd: argument "path" must be an absolute path, got "${path}"`);
    if (this.addingSpare.has(name)) throw new ControlError('BUSY', `device "${name}" already has a spare add under way`);
    this.addingSpare.add(name);
    try {
      let resolved: string;
      try {
        resolved = await realpath(path);
      } catch (err) {
        const code = (err as { code?: string }).code;
        const errno = code !== undefined && code in ERRNO ? ERRNO[code as keyof typeof ERRNO] : ERRNO.EIO;
        throw new RemapError(errno, errno === ERRNO.ENOENT ? `spare ${path} does not exist` : `spare ${path} cannot be resolved`, { device: name, op: 'spare-add' });
      }
      for (const [other, o] of this.devices) {
        if (o.paths.includes(resolved)) {
          throw new ControlError('BUSY', other === name ? `${path} is already part of device "${name}"` : `${path} is already used by device "${other}"`);
        }
        // The same storage under another name (a partition of a loop device over another device's image, ...);
        // the engine checks its own device's parts.
        for (const q of other === name ? [] : o.paths) {
          const c = stackOverlap(q, resolved);
          if (c !== null) throw new ControlError('BUSY', `${path} overlaps ${q}, used by device "${other}": both are stored on ${c.layer} (bytes ${c.b[0]}..${c.b[1]} and ${c.a[0]}..${c.a[1]})`);
        }
      }
      const recorded = engine.spareInfo().length - 1;
      const before = e.spec;
      e.spec = { ...before, spares: [...(before.spares ?? []).slice(0, recorded), path] };
      e.paths.push(resolved);
      await this.persist();
      try {
        return await engine.addSpare(path, { format });
      } catch (err) {
        // A failed commit may still land: keep the path then (a restart ignores an unrecorded one).
        const committing = err instanceof RemapError && err.context.op === 'metadata-commit';
        if (!committing) {
          e.spec = before;
          e.paths = e.paths.filter((p) => p !== resolved);
          await this.persist().catch(() => undefined);
        }
        throw err;
      }
    } finally {
      this.addingSpare.delete(name);
    }
  }
}
