/**
 * The daemon's configuration: a JSON file (`--config FILE`), overridden by
 * the environment (DM_REMAPD_SOCKET) and by flags. Validated by hand, with
 * errors that name the key.
 */
import { readFileSync } from 'node:fs';
import { getgrnam } from './groups.js';

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
}

export const DEFAULTS: DaemonConfig = {
  stateDir: '/var/lib/dm-remapd',
  controlSocket: '/run/dm-remapd/control.sock',
  logLevel: 'info',
  metadataTimeoutMs: 5000,
  shutdownTimeoutMs: 5000,
};

export class ConfigError extends Error {
  override name = 'ConfigError';
}

const LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace'] as const;
const KEYS = ['stateDir', 'controlSocket', 'controlGroup', 'controlSocketMode', 'logLevel', 'metadataTimeoutMs', 'shutdownTimeoutMs'] as const;

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
