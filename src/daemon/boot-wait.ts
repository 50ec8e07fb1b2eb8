/**
 * Boot: the daemon starts early (before local-fs-pre.target), possibly
 * before udev has made the links of the backing disks its devices.json names
 * (/dev/disk/by-id/...). Reassembling then would mark those devices failed
 * and fstab would miss them. So, when asked (DM_REMAPD_REASSEMBLE_WAIT_MS,
 * set by systemd/dm-remapd.service), a daemon started during boot first
 * waits, bounded, for every remembered main and spare path to exist.
 */
import { existsSync, readFileSync } from 'node:fs';
import type { Logger } from 'pino';
import type { DeviceSpec } from './state.js';

/** Every backing path of the specs (main, spare, extra spares), each once. */
export function backingPaths(specs: readonly DeviceSpec[]): string[] {
  const out = new Set<string>();
  for (const s of specs) {
    for (const p of [s.main, s.spare, ...(s.spares ?? [])]) if (typeof p === 'string' && p !== '') out.add(p);
  }
  return [...out];
}

/**
 * Waits until every path exists or `timeoutMs` passed (polling every
 * `pollMs`). Returns the paths still missing (reassembly then reports
 * them, device by device). Logs `waiting-for-disks` once when it has to
 * wait, and `disks-appeared` or `disks-missing` at the end.
 */
export async function waitForPaths(paths: readonly string[], timeoutMs: number, log: Logger, pollMs = 200): Promise<string[]> {
  let missing = paths.filter((p) => !existsSync(p));
  if (missing.length === 0 || timeoutMs <= 0) return missing;
  const started = Date.now();
  log.info({ event: 'waiting-for-disks', missing, timeoutMs }, `waiting up to ${timeoutMs} ms for ${missing.length} backing path(s): ${missing.join(', ')}`);
  while (missing.length > 0 && Date.now() - started < timeoutMs) {
    await new Promise((r) => setTimeout(r, Math.min(pollMs, Math.max(1, timeoutMs - (Date.now() - started)))));
    missing = missing.filter((p) => !existsSync(p));
  }
  const waitedMs = Date.now() - started;
  if (missing.length === 0) log.info({ event: 'disks-appeared', waitedMs }, `all backing paths present after ${waitedMs} ms`);
  else log.warn({ event: 'disks-missing', missing, waitedMs }, `still missing after ${waitedMs} ms: ${missing.join(', ')}; their devices will be failed`);
  return missing;
}

/** The system's uptime in ms (/proc/uptime), or null. */
export function uptimeMs(path = '/proc/uptime'): number | null {
  try {
    const s = Number(readFileSync(path, 'utf8').split(' ')[0]);
    return Number.isFinite(s) ? Math.round(s * 1000) : null;
  } catch {
    return null;
  }
}

/**
 * How long to wait: DM_REMAPD_REASSEMBLE_WAIT_MS (whole ms, at most 10
 * minutes; 0 when unset or malformed) counted from the system's boot, so
 * that only a start during boot waits; a restart later (a crash, `systemctl
 * restart`, with ublk devices waiting to be recovered) never does.
 */
export function reassembleWaitMs(env: NodeJS.ProcessEnv = process.env, upMs: number | null = uptimeMs()): number {
  const v = env.DM_REMAPD_REASSEMBLE_WAIT_MS;
  if (v === undefined || !/^\d{1,6}$/.test(v)) return 0;
  const wait = Math.min(Number(v), 600_000);
  return upMs === null ? 0 : Math.max(0, wait - upMs);
}
