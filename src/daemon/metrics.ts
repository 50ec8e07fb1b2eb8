/**
 * Prometheus text exposition (format 0.0.4) of the daemon and its devices.
 * Pure: a list of device statuses (plus each engine's commit-latency
 * histogram) in, the text out. Every family has one # HELP and one # TYPE
 * line and all its samples together; counters end in _total; label values
 * are escaped (backslash, double quote, newline). docs/OPERATION.md lists
 * every metric.
 */
import type { HistogramSnapshot } from '../metadata/histogram.js';
import type { DeviceState, DeviceStatus } from './devices.js';
import { HEALTH_STATES } from './health.js';

export const CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8';
const P = 'dm_remapd_';
const DEVICE_STATES: readonly DeviceState[] = ['starting', 'running', 'stopping', 'failed'];

export interface MetricsDevice {
  status: DeviceStatus;
  /** The engine's metadata commit latency; null when the device has no engine. */
  commitLatency: HistogramSnapshot | null;
}

export interface MetricsInput {
  version: string;
  nodeVersion: string;
  startedAtMs: number;
  devices: MetricsDevice[];
}

type Labels = Record<string, string>;
type Sample = { suffix?: string; labels: Labels; value: number };
type Kind = 'counter' | 'gauge' | 'histogram';

/** A label value as the text format wants it: \ " and newline escaped. */
export function escapeLabelValue(v: string): string {
  return v.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n');
}

function escapeHelp(v: string): string {
  return v.replace(/\\/g, '\\\\').replace(/\n/g, '\\n');
}

export function formatValue(v: number): string {
  if (Number.isNaN(v)) return 'NaN';
  if (v === Infinity) return '+Inf';
  if (v === -Infinity) return '-Inf';
  return String(v);
}

function labelText(l: Labels): string {
  const keys = Object.keys(l);
  if (keys.length === 0) return '';
  return `{${keys.map((k) => `${k}="${escapeLabelValue(l[k])}"`).join(',')}}`;
}

class Exposition {
  private readonly out: string[] = [];

  family(name: string, kind: Kind, help: string, samples: Sample[]): void {
    if (samples.length === 0) return;
    const full = P + name;
    this.out.push(`# HELP ${full} ${escapeHelp(help)}`, `# TYPE ${full} ${kind}`);
    for (const s of samples) this.out.push(`${full}${s.suffix ?? ''}${labelText(s.labels)} ${formatValue(s.value)}`);
  }

  text(): string {
    return `${this.out.join('\n')}\n`;
  }
}

/** One sample per device that has the value (null: no engine). */
function perDevice(devs: MetricsDevice[], f: (s: DeviceStatus) => number | null | undefined, extra: Labels = {}): Sample[] {
  const out: Sample[] = [];
  for (const d of devs) {
    const v = f(d.status);
    if (v !== null && v !== undefined) out.push({ labels: { device: d.status.name, ...extra }, value: v });
  }
  return out;
}

function bool(v: boolean | null): number | null {
  return v === null ? null : v ? 1 : 0;
}

export function renderMetrics(input: MetricsInput): string {
  const e = new Exposition();
  const devs = input.devices;
  e.family('up', 'gauge', 'Whether dm-remapd is up (always 1 when it answers).', [{ labels: {}, value: 1 }]);
  e.family('build_info', 'gauge', 'Version of dm-remapd and of Node.js; the value is always 1.',
    [{ labels: { version: input.version, node_version: input.nodeVersion }, value: 1 }]);
  e.family('start_time_seconds', 'gauge', 'When the daemon started, in seconds since the epoch.', [{ labels: {}, value: input.startedAtMs / 1000 }]);
  e.family('devices', 'gauge', 'Devices known to the daemon, in any state.', [{ labels: {}, value: devs.length }]);
  e.family('device_info', 'gauge', 'Main and spare of each device (spare "tail:BYTES" for a spare in the tail of main); the value is always 1.',
    devs.map((d) => ({
      labels: { device: d.status.name, main: d.status.main, spare: d.status.spare ?? `tail:${d.status.spareTailBytes ?? 0}`, open_mode: d.status.openMode ?? '' },
      value: 1,
    })));
  e.family('device_state', 'gauge', 'Lifecycle state of each device: 1 for the current state, 0 for the others.',
    devs.flatMap((d) => DEVICE_STATES.map((st) => ({ labels: { device: d.status.name, state: st }, value: d.status.state === st ? 1 : 0 }))));
  e.family('device_health', 'gauge', 'Health of each device (ok, degraded, failing, spare-exhausted): 1 for the current one, 0 for the others.',
    devs.filter((d) => d.status.health !== null)
      .flatMap((d) => HEALTH_STATES.map((h) => ({ labels: { device: d.status.name, state: h }, value: d.status.health === h ? 1 : 0 }))));
  e.family('device_size_bytes', 'gauge', 'Exported size of the device in bytes.', perDevice(devs, (s) => s.sizeBytes));
  e.family('device_block_size_bytes', 'gauge', 'Block size (the remap unit) in bytes.', perDevice(devs, (s) => s.blockSize));
  e.family('device_requests_total', 'counter', 'Requests served, by operation.', [
    ...perDevice(devs, (s) => s.stats?.reads, { op: 'read' }),
    ...perDevice(devs, (s) => s.stats?.writes, { op: 'write' }),
    ...perDevice(devs, (s) => s.stats?.flushes, { op: 'flush' }),
    ...perDevice(devs, (s) => s.stats?.discards, { op: 'discard' }),
    ...perDevice(devs, (s) => s.stats?.writeZeroes, { op: 'write_zeroes' }),
  ]);
  e.family('device_io_bytes_total', 'counter', 'Bytes read and written by clients, by operation.', [
    ...perDevice(devs, (s) => s.stats?.bytesRead, { op: 'read' }),
    ...perDevice(devs, (s) => s.stats?.bytesWritten, { op: 'write' }),
  ]);
  e.family('device_errors_total', 'counter',
    'Errors by kind: read (a read that stayed unreadable after retries, or a non-media read error), write (a failed backing write, remapped or not), flush, metadata_commit.', [
      ...perDevice(devs, (s) => s.stats?.readErrors, { kind: 'read' }),
      ...perDevice(devs, (s) => s.stats?.writeErrors, { kind: 'write' }),
      ...perDevice(devs, (s) => s.stats?.flushErrors, { kind: 'flush' }),
      ...perDevice(devs, (s) => s.stats?.commitFailures, { kind: 'metadata_commit' }),
    ]);
  e.family('device_spare_errors_total', 'counter', 'Failed reads and writes of spare blocks (each such block is then marked bad).',
    perDevice(devs, (s) => s.stats?.spareErrors));
  e.family('device_other_errors_total', 'counter', 'Backing errors that are not media errors (vanished device, full host filesystem, invalid request): never remapped.',
    perDevice(devs, (s) => s.stats?.otherErrors));
  e.family('device_remaps_total', 'counter', 'Blocks remapped since the device was opened: auto (write errors, writes to pending blocks) or manual.', [
    ...perDevice(devs, (s) => s.stats?.autoRemaps, { kind: 'auto' }),
    ...perDevice(devs, (s) => s.stats?.manualRemaps, { kind: 'manual' }),
  ]);
  e.family('device_remapped_blocks', 'gauge', 'Blocks currently served from the spare.', perDevice(devs, (s) => s.remappedBlocks));
  e.family('device_pending_blocks', 'gauge', 'Unreadable blocks waiting for a write (remapped on their next write).', perDevice(devs, (s) => s.pendingBlocks));
  e.family('device_spare_used_blocks', 'gauge', 'Spare blocks in use (remaps, bad and quarantined blocks).', perDevice(devs, (s) => s.spareBlocksUsed));
  e.family('device_spare_size_blocks', 'gauge', 'Spare blocks in the spare data area (its capacity).', perDevice(devs, (s) => s.spareBlocksTotal));
  e.family('device_bad_spare_blocks', 'gauge', 'Spare blocks marked bad.', perDevice(devs, (s) => s.badSpareBlocks));
  e.family('device_quarantined_spare_blocks', 'gauge', 'Spare blocks quarantined after a failed commit.', perDevice(devs, (s) => s.quarantinedSpareBlocks));
  e.family('device_spare_exhausted', 'gauge', '1 when a remap was refused for lack of spare blocks.', perDevice(devs, (s) => bool(s.spareExhausted)));
  e.family('device_breaker_tripped', 'gauge', '1 when the remap-rate breaker tripped (the device failed).', perDevice(devs, (s) => bool(s.breakerTripped)));
  e.family('device_in_flight_requests', 'gauge', 'Client requests being served.', perDevice(devs, (s) => s.inFlight));
  e.family('device_connections', 'gauge', 'Open export connections.', perDevice(devs, (s) => (s.stats === null ? null : s.connections)));
  e.family('device_metadata_seq', 'gauge', 'Highest metadata commit sequence number issued.', perDevice(devs, (s) => s.metadataSeq));
  const hist: Sample[] = [];
  for (const d of devs) {
    const h = d.commitLatency;
    if (h === null) continue;
    const device = d.status.name;
    h.boundsMs.forEach((b, i) => hist.push({ suffix: '_bucket', labels: { device, le: formatValue(b / 1000) }, value: h.cumulative[i] }));
    hist.push({ suffix: '_bucket', labels: { device, le: '+Inf' }, value: h.count });
    hist.push({ suffix: '_sum', labels: { device }, value: h.sumMs / 1000 });
    hist.push({ suffix: '_count', labels: { device }, value: h.count });
  }
  e.family('device_metadata_commit_duration_seconds', 'histogram',
    'Latency of completed metadata commits (journal blocks written to both copies and synced), in seconds.', hist);
  return e.text();
}
