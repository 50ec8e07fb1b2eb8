/**
 * The daemon's configuration: a JSON file (`--config FILE`), overridden by
 * the environment (DM_REMAPD_SOCKET) and by flags. Validated by hand, with
 * errors that name the key.
 */
import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { getgrnam } from './groups.js';
import { HEALTH_DEFAULTS, type HealthConfig } from './health.js';

export interface DaemonConfig {
  stateDir: string;
  controlSocket: string;
  /** Group (name or gid) whose members may use the control socket, besides root. */
  controlGroup?: string | number;
  /** Mode of the control socket; 0600 by default (0660 with a control group). */
  controlSocketMode?: number;
  logLevel: 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace';
  /** Metadata timeout of devices that do not set one; also their removal deadline. */
  metadataTimeoutMs: number;
  /** Deadline per device when the daemon stops. */
  shutdownTimeoutMs: number;
  /** Health thresholds and sampling (docs/OPERATION.md, "Health"). */
  health: HealthConfig;
  /** Prometheus metrics listener; undefined: off. */
  metrics?: MetricsConfig;
  /** Background scrub of every device (docs/OPERATION.md, "Scan and scrub"); undefined: off. */
  scrub?: ScrubConfig;
  /** Stable names: folder of the NAME -> /dev/ublkbN|nbdN links ('/dev/disk/by-remap'); null: none. */
  byRemapDir?: string | null;
  /** Stable names: folder of the name files udev/99-dm-remapd.rules imports ('/run/dm-remapd/udev'); null: none. */
  udevNamesDir?: string | null;
}

export const DEFAULTS: DaemonConfig = {
  stateDir: '/var/lib/dm-remapd',
  controlSocket: '/run/dm-remapd/control.sock',
  logLevel: 'info',
  metadataTimeoutMs: 5000,
  shutdownTimeoutMs: 5000,
  health: HEALTH_DEFAULTS,
};

export class ConfigError extends Error {
  override name = 'ConfigError';
}

const LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace'] as const;
const KEYS = ['stateDir', 'controlSocket', 'controlGroup', 'controlSocketMode', 'logLevel', 'metadataTimeoutMs', 'shutdownTimeoutMs', 'health', 'metrics', 'scrub', 'byRemapDir', 'udevNamesDir'] as const;

function str(src: string, key: string, v: unknown): string {
  if (typeof v !== 'string' || v === '') throw new ConfigError(`${src}: "${key}" must be a non-empty string, got ${JSON.stringify(v)}`);
  return v;
}

function absPath(src: string, key: string, v: unknown): string {
  const s = str(src, key, v);
  if (!s.startsWith('/')) throw new ConfigError(`${src}: "${key}" must be an absolute path, got ${JSON.stringify(s)}`);
  return s;
}

function ms(src: string, key: string, v: unknown): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 1 || v > 3_600_000) {
    throw new ConfigError(`${src}: "${key}" must be an integer number of milliseconds in 1..3600000, got ${JSON.stringify(v)}`);
  }
  return v;
}

function mode(src: string, key: string, v: unknown): number {
  const n = typeof v === 'string' && /^0?[0-7]{3}$/.test(v) ? parseInt(v, 8) : v;
  if (typeof n !== 'number' || !Number.isInteger(n) || n < 0 || n > 0o777 || (n & 0o600) !== 0o600) {
    throw new ConfigError(`${src}: "${key}" must be a file mode such as "0600" (owner read/write required), got ${JSON.stringify(v)}`);
  }
  return n;
}

function group(src: string, key: string, v: unknown): string | number {
  if (typeof v === 'number' && Number.isSafeInteger(v) && v >= 0) return v;
  return str(src, key, v);
}

/** Applies the keys of `raw` (from `src`: a file name or "flags") onto `into`. */
export function applyConfig(into: DaemonConfig, raw: Record<string, unknown>, src: string): DaemonConfig {
  for (const key of Object.keys(raw)) {
    if (!(KEYS as readonly string[]).includes(key)) throw new ConfigError(`${src}: unknown key "${key}" (known: ${KEYS.join(', ')})`);
  }
  const out = { ...into };
  if (raw.stateDir !== undefined) out.stateDir = absPath(src, 'stateDir', raw.stateDir);
  if (raw.controlSocket !== undefined) out.controlSocket = absPath(src, 'controlSocket', raw.controlSocket);
  if (raw.controlGroup !== undefined) out.controlGroup = group(src, 'controlGroup', raw.controlGroup);
  if (raw.controlSocketMode !== undefined) out.controlSocketMode = mode(src, 'controlSocketMode', raw.controlSocketMode);
  if (raw.logLevel !== undefined) {
    const l = str(src, 'logLevel', raw.logLevel);
    if (!(LEVELS as readonly string[]).includes(l)) throw new ConfigError(`${src}: "logLevel" must be one of ${LEVELS.join(', ')}, got ${JSON.stringify(l)}`);
    out.logLevel = l as DaemonConfig['logLevel'];
  }
  if (raw.metadataTimeoutMs !== undefined) out.metadataTimeoutMs = ms(src, 'metadataTimeoutMs', raw.metadataTimeoutMs);
  if (raw.shutdownTimeoutMs !== undefined) out.shutdownTimeoutMs = ms(src, 'shutdownTimeoutMs', raw.shutdownTimeoutMs);
  if (raw.health !== undefined) out.health = healthConfig(src, raw.health, out.health);
  if (raw.metrics !== undefined) out.metrics = metricsConfig(src, raw.metrics);
  if (raw.scrub !== undefined) out.scrub = scrubConfig(src, raw.scrub);
  // Stable names (docs/OPERATION.md, "Stable names"): null turns them off.
  if (raw.byRemapDir !== undefined) out.byRemapDir = raw.byRemapDir === null ? null : absPath(src, 'byRemapDir', raw.byRemapDir);
  if (raw.udevNamesDir !== undefined) out.udevNamesDir = raw.udevNamesDir === null ? null : absPath(src, 'udevNamesDir', raw.udevNamesDir);
  return out;
}

export function readConfigFile(path: string): Record<string, unknown> {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    throw new ConfigError(`cannot read config file ${path}: ${(e as Error).message}`);
  }
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (e) {
    throw new ConfigError(`config file ${path} is not valid JSON: ${(e as Error).message}`);
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new ConfigError(`config file ${path} must hold a JSON object`);
  return v as Record<string, unknown>;
}

/** The gid of the control group, resolved from /etc/group when given by name. */
export function resolveGroup(g: string | number | undefined): number | undefined {
  if (g === undefined) return undefined;
  if (typeof g === 'number') return g;
  if (/^\d+$/.test(g)) return Number(g);
  const gid = getgrnam(g);
  if (gid === undefined) throw new ConfigError(`controlGroup: no group named "${g}" in /etc/group`);
  return gid;
}

// ------------------------------------------------------- health and metrics

function obj(src: string, key: string, v: unknown): Record<string, unknown> {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new ConfigError(`${src}: "${key}" must be an object, got ${JSON.stringify(v)}`);
  return v as Record<string, unknown>;
}

function onlyKeys(src: string, key: string, o: Record<string, unknown>, known: readonly string[]): void {
  for (const k of Object.keys(o)) {
    if (!known.includes(k)) throw new ConfigError(`${src}: unknown key "${key}.${k}" (known: ${known.join(', ')})`);
  }
}

function count(src: string, key: string, v: unknown): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 1 || v > 1_000_000_000) {
    throw new ConfigError(`${src}: "${key}" must be an integer in 1..1000000000, got ${JSON.stringify(v)}`);
  }
  return v;
}

function fraction(src: string, key: string, v: unknown): number {
  if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0 || v > 1) throw new ConfigError(`${src}: "${key}" must be a fraction in (0, 1], got ${JSON.stringify(v)}`);
  return v;
}

const HEALTH_KEYS = ['intervalMs', 'windowMs', 'degradedErrors', 'failingErrors', 'degradedRemaps', 'failingRemaps', 'degradedSpareUsed', 'failingSpareUsed'] as const;

/** `health`: thresholds over the base (defaults); each failing threshold must not be below its degraded one. */
function healthConfig(src: string, v: unknown, base: HealthConfig): HealthConfig {
  const o = obj(src, 'health', v);
  onlyKeys(src, 'health', o, HEALTH_KEYS);
  const out = { ...base };
  for (const k of HEALTH_KEYS) {
    const x = o[k];
    if (x === undefined) continue;
    if (k === 'intervalMs' || k === 'windowMs') out[k] = ms(src, `health.${k}`, x);
    else if (k === 'degradedSpareUsed' || k === 'failingSpareUsed') out[k] = fraction(src, `health.${k}`, x);
    else out[k] = count(src, `health.${k}`, x);
  }
  for (const what of ['Errors', 'Remaps', 'SpareUsed'] as const) {
    const d = out[`degraded${what}`];
    const f = out[`failing${what}`];
    if (f < d) throw new ConfigError(`${src}: "health.failing${what}" (${f}) must not be below "health.degraded${what}" (${d})`);
  }
  return out;
}

export type MetricsListen = { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string };

export interface MetricsConfig {
  listen: MetricsListen;
  /** Mode of a unix metrics socket (default 0666: as open as a localhost port). */
  socketMode: number;
}

const METRICS_KEYS = ['listen', 'socketMode'] as const;

/**
 * A metrics listen address: an absolute path (unix socket), "PORT" or
 * ":PORT" (127.0.0.1), or "HOST:PORT" with an IPv4 literal, "[IPv6]" or
 * "localhost". Port 0 picks a free port (logged at start).
 */
export function parseMetricsListen(s: string): MetricsListen | null {
  if (s.startsWith('/')) return Buffer.byteLength(s) <= 107 && !s.includes('\0') ? { kind: 'unix', path: s } : null;
  const m = /^(?:(\[[0-9a-fA-F:.]+\]|\d{1,3}(?:\.\d{1,3}){3}|localhost)?:)?(\d{1,5})$/.exec(s);
  if (m === null) return null;
  const port = Number(m[2]);
  if (port > 65535) return null;
  let host = m[1] ?? '127.0.0.1';
  if (host.startsWith('[')) {
    host = host.slice(1, -1);
    if (isIP(host) !== 6) return null;
  } else if (host !== 'localhost' && isIP(host) !== 4) {
    return null;
  }
  return { kind: 'tcp', host, port };
}

/** `metrics`: null or absent is off; `{listen, socketMode?}` is on. */
function metricsConfig(src: string, v: unknown): MetricsConfig | undefined {
  if (v === null || v === false) return undefined;
  const o = obj(src, 'metrics', v);
  onlyKeys(src, 'metrics', o, METRICS_KEYS);
  const l = str(src, 'metrics.listen', o.listen);
  const listen = parseMetricsListen(l);
  if (listen === null) {
    throw new ConfigError(`${src}: "metrics.listen" must be "HOST:PORT" (an IPv4 address, [IPv6] or localhost), ":PORT", or an absolute socket path of at most 107 bytes, got ${JSON.stringify(l)}`);
  }
  const socketMode = o.socketMode === undefined ? 0o666 : mode(src, 'metrics.socketMode', o.socketMode);
  if (o.socketMode !== undefined && listen.kind !== 'unix') throw new ConfigError(`${src}: "metrics.socketMode" applies only to a unix socket "metrics.listen"`);
  return { listen, socketMode };
}

// ------------------------------------------------------------------- scrub

export interface ScrubConfig {
  /** Time from the end of one pass (or from the device's start) to the next pass. */
  intervalHours: number;
  /** Read rate limit in MiB/s (1 MiB = 1048576 bytes). */
  rateMBps: number;
  /** The scrub waits until no client I/O happened for this long. */
  idleMs: number;
}

export const SCRUB_DEFAULTS: ScrubConfig = { intervalHours: 168, rateMBps: 8, idleMs: 5000 };
const SCRUB_KEYS = ['intervalHours', 'rateMBps', 'idleMs'] as const;

function scrubNumber(src: string, key: string, v: unknown, max: number): number {
  if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0 || v > max) {
    throw new ConfigError(`${src}: "scrub.${key}" must be a number greater than 0 and at most ${max}, got ${JSON.stringify(v)}`);
  }
  return v;
}

/** `scrub`: null or false is off; an object (keys optional, SCRUB_DEFAULTS) is on. */
function scrubConfig(src: string, v: unknown): ScrubConfig | undefined {
  if (v === null || v === false) return undefined;
  if (typeof v !== 'object' || Array.isArray(v)) {
    throw new ConfigError(`${src}: "scrub" must be an object {intervalHours, rateMBps, idleMs}, null or false, got ${JSON.stringify(v)}`);
  }
  const o = v as Record<string, unknown>;
  for (const k of Object.keys(o)) {
    if (!(SCRUB_KEYS as readonly string[]).includes(k)) throw new ConfigError(`${src}: unknown key "scrub.${k}" (known: ${SCRUB_KEYS.join(', ')})`);
  }
  const out = { ...SCRUB_DEFAULTS };
  if (o.intervalHours !== undefined) out.intervalHours = scrubNumber(src, 'intervalHours', o.intervalHours, 87_600);
  if (out.intervalHours * 3_600_000 < 1) throw new ConfigError(`${src}: "scrub.intervalHours" must be at least 1 ms (0.0000003 h), got ${out.intervalHours}`);
  if (o.rateMBps !== undefined) out.rateMBps = scrubNumber(src, 'rateMBps', o.rateMBps, 100_000);
  if (o.idleMs !== undefined) {
    const x = o.idleMs;
    if (typeof x !== 'number' || !Number.isSafeInteger(x) || x < 0 || x > 3_600_000) {
      throw new ConfigError(`${src}: "scrub.idleMs" must be an integer number of milliseconds in 0..3600000, got ${JSON.stringify(x)}`);
    }
    out.idleMs = x;
  }
  return out;
}
