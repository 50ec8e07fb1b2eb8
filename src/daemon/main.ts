#!/usr/bin/env node
/**
 * dm-remapd: the daemon. Runs in the foreground (systemd Type=notify), serves
 * the control socket, reassembles the remembered devices, and removes them
 * cleanly on SIGTERM/SIGINT. Logs are pino JSON lines on stdout.
 */
import { readFileSync } from 'node:fs';
import { mkdirTree } from './mkdir.js';
import { join } from 'node:path';
import { Command, CommanderError, Option } from 'commander';
import pino, { type Logger } from 'pino';
import { openEngine } from '../engine/open.js';
import { findProjectRoot } from '../native/binding.js';
import { exitNow, sdNotify } from '../native/sys.js';
import { ConfigError, DEFAULTS, applyConfig, readConfigFile, resolveGroup, type DaemonConfig } from './config.js';
import { ControlServer, type CommandHandler } from './control.js';
import { DeviceManager, type DeviceSpec } from './devices.js';
import { startNbdExport } from './exports.js';
import { renderMetrics } from './metrics.js';
import { MetricsServer } from './metrics-server.js';
import { ControlError, argBool, argInt, argNbdDevice, argString, errorBody, parseHostPort } from './protocol.js';
import { dmr4Handlers } from './handlers-dmr4.js';
import { ddrescueHandlers } from './handlers-ddrescue.js';
import { unremapHandlers } from './handlers-unremap.js';
import { scanHandlers } from './handlers-scan.js';
import { spareHandlers } from './handlers-spare.js';
import { BY_REMAP_DIR, StableNames, UDEV_NAMES_DIR, attachStableNames, kernelDeviceOf } from './stable-names.js';
import { checkMountNamespace, detachOwnMounts } from './mount-namespace.js';
import { backingPaths, reassembleWaitMs, waitForPaths } from './boot-wait.js';
import { StateFile, UBLK_MAX_DEPTH, UBLK_MAX_QUEUES } from './state.js';
import { openersHandlers, refuseRemoveIfOpen } from './handlers-openers.js';
import { LogStream } from './log-stream.js';

/** How long the daemon waits at exit for its last log lines to be written. */
const LOG_DRAIN_MS = 2000;
const logStream = new LogStream();

function version(): string {
  try {
    const pkg = JSON.parse(readFileSync(join(findProjectRoot(), 'package.json'), 'utf8')) as { version?: string };
    return pkg.version ?? '0.0.0';
  } catch {
    return '0.0.0';
  }
}

interface Flags {
  config?: string;
  stateDir?: string;
  controlSocket?: string;
  controlGroup?: string;
  logLevel?: string;
}

function parseFlags(argv: string[]): Flags {
  const program = new Command('dm-remapd')
    .description('Userspace block-device daemon that remaps bad blocks of a failing disk to a spare (runs in the foreground)')
    .version(version())
    .option('--config <file>', 'JSON configuration file')
    .option('--state-dir <dir>', `state folder (devices.json) [default: ${DEFAULTS.stateDir}]`)
    .addOption(new Option('--control-socket <path>', `control socket [default: $DM_REMAPD_SOCKET or ${DEFAULTS.controlSocket}]`))
    .option('--control-group <group>', 'group (name or gid) allowed to use the control socket besides root')
    .option('--log-level <level>', 'fatal, error, warn, info, debug or trace [default: info]')
    .exitOverride()
    .configureOutput({ writeErr: (s) => process.stderr.write(s) });
  program.parse(argv);
  return program.opts<Flags>();
}

function buildConfig(flags: Flags): DaemonConfig {
  let cfg = { ...DEFAULTS };
  if (flags.config !== undefined) cfg = applyConfig(cfg, readConfigFile(flags.config), flags.config);
  const env = process.env.DM_REMAPD_SOCKET;
  if (env !== undefined && env !== '') cfg = applyConfig(cfg, { controlSocket: env }, 'DM_REMAPD_SOCKET');
  const fromFlags: Record<string, unknown> = {};
  if (flags.stateDir !== undefined) fromFlags.stateDir = flags.stateDir;
  if (flags.controlSocket !== undefined) fromFlags.controlSocket = flags.controlSocket;
  if (flags.controlGroup !== undefined) fromFlags.controlGroup = flags.controlGroup;
  if (flags.logLevel !== undefined) fromFlags.logLevel = flags.logLevel;
  return applyConfig(cfg, fromFlags, 'command line');
}

/** The add request's arguments as a device spec (types checked, keys named). */
function specFromArgs(args: Record<string, unknown>, cfg: DaemonConfig): { spec: DeviceSpec; format: boolean } {
  const name = argString('add', args, 'name');
  const main = argString('add', args, 'main');
  const spare = argString('add', args, 'spare', true);
  const spareTailBytes = argInt('add', args, 'spareTailBytes', 1, Number.MAX_SAFE_INTEGER);
  if ((spare === undefined) === (spareTailBytes === undefined)) {
    throw new ControlError('BAD_REQUEST', `add: give exactly one of "spare" or "spareTailBytes" for device "${name}"`);
  }
  const blockSize = argInt('add', args, 'blockSize', 512, 4096);
  if (blockSize !== undefined && blockSize !== 512 && blockSize !== 4096) {
    throw new ControlError('BAD_REQUEST', `add: argument "blockSize" must be 4096 or 512, got ${blockSize}`);
  }
  const spec: DeviceSpec = { name, main };
  if (spare !== undefined) spec.spare = spare;
  if (spareTailBytes !== undefined) spec.spareTailBytes = spareTailBytes;
  const spares = args.spares; // spare pool: the extra spares, in the order they were added
  if (spares !== undefined) {
    if (!Array.isArray(spares) || !spares.every((p): p is string => typeof p === 'string' && p.startsWith('/'))) {
      throw new ControlError('BAD_REQUEST', `add: argument "spares" must be an array of absolute paths for device "${name}", got ${JSON.stringify(spares)}`);
    }
    if (spares.length > 0) spec.spares = spares;
  }
  const poolReserveBytes = argInt('add', args, 'poolReserveBytes', 0, Number.MAX_SAFE_INTEGER);
  if (poolReserveBytes !== undefined && poolReserveBytes > 0) spec.poolReserveBytes = poolReserveBytes;
  if (blockSize !== undefined) spec.blockSize = blockSize;
  const timeout = argInt('add', args, 'metadataTimeoutMs', 1, 3_600_000);
  spec.metadataTimeoutMs = timeout ?? cfg.metadataTimeoutMs;
  if (argBool('add', args, 'allowIdentityChange') === true) spec.allowIdentityChange = true;
  if (argBool('add', args, 'readOnly') === true) spec.readOnly = true;
  const nbdUnix = argString('add', args, 'nbdUnix', true);
  if (nbdUnix !== undefined) {
    if (!nbdUnix.startsWith('/')) throw new ControlError('BAD_REQUEST', `add: argument "nbdUnix" must be an absolute path, got "${nbdUnix}"`);
    spec.nbdUnix = nbdUnix;
  }
  const tcp = args.nbdTcp;
  if (tcp !== undefined) {
    const hp = typeof tcp === 'string' ? parseHostPort(tcp) : null;
    if (hp === null) throw new ControlError('BAD_REQUEST', `add: argument "nbdTcp" must be "HOST:PORT", got ${JSON.stringify(tcp)}`);
    spec.nbdTcp = hp;
  }
  const nbdDevice = argNbdDevice('add', args);
  if (nbdDevice !== undefined) spec.nbdDevice = nbdDevice;
  if (argBool('add', args, 'ublk') === true) spec.ublk = true;
  const ublkQueues = argInt('add', args, 'ublkQueues', 1, UBLK_MAX_QUEUES);
  const ublkDepth = argInt('add', args, 'ublkDepth', 1, UBLK_MAX_DEPTH);
  if ((ublkQueues !== undefined || ublkDepth !== undefined) && spec.ublk !== true) {
    throw new ControlError('BAD_REQUEST', `add: argument "${ublkQueues !== undefined ? 'ublkQueues' : 'ublkDepth'}" needs "ublk": true for device "${name}"`);
  }
  if (ublkQueues !== undefined) spec.ublkQueues = ublkQueues;
  if (ublkDepth !== undefined) spec.ublkDepth = ublkDepth;
  const description = argString('add', args, 'description', true);
  if (description !== undefined) spec.description = description;
  return { spec, format: argBool('add', args, 'format') === true };
}

function handlers(mgr: DeviceManager, cfg: DaemonConfig, startedAt: number): Record<string, CommandHandler> {
  return {
    // Feature handlers: one spread per handlers-*.ts file.
    ...dmr4Handlers(mgr, (args) => specFromArgs(args, cfg)),
    ...ddrescueHandlers(mgr),
    ...unremapHandlers(mgr),
    ...scanHandlers(mgr, cfg),
    ...spareHandlers(mgr),
    ...openersHandlers(mgr),
    ping: async () => ({ version: version(), pid: process.pid, uptimeMs: Date.now() - startedAt, devices: mgr.size }),
    add: async (args) => {
      const { spec, format } = specFromArgs(args, cfg);
      const r = await mgr.add(spec, { format });
      sdNotify(`STATUS=serving ${mgr.size} device(s)`);
      return r;
    },
    remove: async (args) => {
      const name = argString('remove', args, 'name');
      const timeoutMs = argInt('remove', args, 'timeoutMs', 0, 3_600_000);
      // A mounted or open /dev/ublkbN or /dev/nbdN: refused, naming who holds it (docs/OPERATION.md "Openers").
      if (argBool('remove', args, 'force') !== true) await refuseRemoveIfOpen(mgr, name);
      const r = await mgr.remove(name, timeoutMs);
      sdNotify(`STATUS=serving ${mgr.size} device(s)`);
      return r;
    },
    list: async () => mgr.list(),
    status: async (args) => {
      const name = argString('status', args, 'name', true);
      return name === undefined ? mgr.list() : mgr.status(name);
    },
    remap: async (args) => {
      const name = argString('remap', args, 'name');
      const blocks = args.blocks;
      if (!Array.isArray(blocks) || blocks.length === 0 || blocks.length > 1_000_000
        || !blocks.every((b): b is number => typeof b === 'number' && Number.isSafeInteger(b) && b >= 0)) {
        throw new ControlError('BAD_REQUEST', 'remap: argument "blocks" must be a non-empty array of at most 1000000 non-negative integers');
      }
      return { name, results: await mgr.remap(name, blocks) };
    },
  };
}

async function run(): Promise<number> {
  let cfg: DaemonConfig;
  try {
    cfg = buildConfig(parseFlags(process.argv));
  } catch (err) {
    if (err instanceof CommanderError) {
      return err.code === 'commander.helpDisplayed' || err.code === 'commander.version' || err.exitCode === 0 ? 0 : 2;
    }
    if (err instanceof ConfigError) {
      process.stderr.write(`dm-remapd: ${err.message}\n`);
      return 2;
    }
    throw err;
  }
  const log: Logger = pino({ level: cfg.logLevel, base: { pid: process.pid, service: 'dm-remapd' } }, logStream);
  const mountNamespace = checkMountNamespace(log); // warns in a private one (src/daemon/mount-namespace.ts)
  let groupId: number | undefined;
  try {
    groupId = resolveGroup(cfg.controlGroup);
    mkdirTree(cfg.stateDir, 0o755);
  } catch (err) {
    log.fatal({ event: 'start-failed', error: errorBody(err) }, `cannot start: ${(err as Error).message}`);
    if (err instanceof ConfigError) {
      // A configuration error (an unknown controlGroup) is a usage error, as for every other bad key.
      process.stderr.write(`dm-remapd: ${err.message}\n`);
      return 2;
    }
    return 1;
  }
  const startedAt = Date.now();
  const mgr = new DeviceManager({ stateDir: cfg.stateDir, logger: log, openEngine, startExport: startNbdExport, defaultMetadataTimeoutMs: cfg.metadataTimeoutMs, health: cfg.health });
  const control = new ControlServer({ path: cfg.controlSocket, logger: log, handlers: handlers(mgr, cfg, startedAt), groupId, mode: cfg.controlSocketMode });
  const byRemapDir = cfg.byRemapDir === undefined ? BY_REMAP_DIR : cfg.byRemapDir;
  const stableNames = byRemapDir === null ? null
    : attachStableNames(mgr, new StableNames({ linkDir: byRemapDir, udevDir: cfg.udevNamesDir === undefined ? UDEV_NAMES_DIR : cfg.udevNamesDir, logger: log }));
  let stopping = false;
  let resolveStop: (signal: string) => void = () => undefined;
  const stopped = new Promise<string>((resolve) => {
    resolveStop = resolve;
  });
  const onSignal = (signal: NodeJS.Signals): void => {
    if (stopping) {
      log.warn({ event: 'signal-ignored', signal }, `${signal} during shutdown: still removing devices (bounded by their deadlines)`);
      return;
    }
    stopping = true;
    resolveStop(signal);
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  process.on('SIGPIPE', () => undefined);
  try {
    await control.listen();
  } catch (err) {
    log.fatal({ event: 'start-failed', error: errorBody(err) }, `cannot listen on ${cfg.controlSocket}: ${(err as Error).message}`);
    return 1;
  }
  const buildVersion = version();
  const metrics = cfg.metrics === undefined ? null : new MetricsServer({
    config: cfg.metrics,
    logger: log,
    render: () => renderMetrics({
      version: buildVersion, nodeVersion: process.version, startedAtMs: startedAt,
      devices: mgr.list().map((status) => ({ status, commitLatency: mgr.engineOf(status.name)?.metadataCommitLatency() ?? null })),
    }),
  });
  try {
    await metrics?.listen();
  } catch (err) {
    log.fatal({ event: 'start-failed', error: errorBody(err) }, `cannot serve metrics: ${(err as Error).message}`);
    await control.close();
    return 1;
  }
  let r = { started: 0, failed: 0 };
  // Boot: wait, bounded, for the remembered backing disks (DM_REMAPD_REASSEMBLE_WAIT_MS, set by the unit).
  await waitForPaths(backingPaths(await new StateFile(cfg.stateDir).load().catch(() => [])), reassembleWaitMs(), log);
  try {
    r = await mgr.reassemble();
  } catch (err) {
    log.error({ event: 'reassemble-failed', error: errorBody(err) }, `cannot read the remembered devices: ${(err as Error).message}`);
  }
  stableNames?.reconcile();
  log.info({ event: 'ready', controlSocket: cfg.controlSocket, stateDir: cfg.stateDir, devices: r.started, failedDevices: r.failed },
    `dm-remapd ready: ${r.started} device(s) reassembled, ${r.failed} failed`);
  sdNotify('READY=1');
  sdNotify(`STATUS=serving ${r.started} device(s)${r.failed > 0 ? `, ${r.failed} failed to reassemble` : ''}`);
  const signal = await stopped;
  log.info({ event: 'stopping', signal }, `${signal}: removing ${mgr.size} device(s)`);
  sdNotify('STOPPING=1');
  sdNotify(`STATUS=stopping: removing ${mgr.size} device(s)`);
  await control.close();
  await metrics?.close();
  // In a private mount namespace, copies of our devices' mounts are ours alone: detach them first (DM_REMAPD_DETACH_OWN_MOUNTS=0: don't).
  if (mountNamespace.initial === false && process.env.DM_REMAPD_DETACH_OWN_MOUNTS !== '0') {
    await detachOwnMounts(mgr.list().map((s) => kernelDeviceOf(s.exports)).filter((d): d is string => d !== null), log);
  }
  stableNames?.stopping();
  const reports = await mgr.shutdown(cfg.shutdownTimeoutMs);
  stableNames?.stopped();
  const unclean = reports.filter((x) => x.timedOut || x.metadataAborted);
  log.info({ event: 'stopped', devices: reports.length, unclean: unclean.length }, 'dm-remapd stopped');
  return 0;
}

/**
 * Lets the last log lines out (bounded: the reader may be gone or stalled),
 * then leaves: libuv handles of abandoned hung I/O must not keep the process
 * alive, and neither may a log write blocked on a reader that stopped reading
 * (exit(3) would join its thread-pool thread, so then _exit).
 */
async function leave(code: number): Promise<void> {
  await logStream.drain(LOG_DRAIN_MS);
  if (logStream.busy) {
    try {
      exitNow(code);
    } catch {
      // no addon (the reason run() failed, maybe): exit as usual
    }
  }
  process.exit(code);
}

run().then(
  (code) => leave(code),
  (err: unknown) => {
    process.stderr.write(`dm-remapd: fatal: ${err instanceof Error ? err.stack ?? err.message : String(err)}\n`);
    return leave(1);
  },
);
