/**
 * The metrics exposition without a daemon: renderMetrics output through the
 * strict text-format parser (tests/helpers/prom-text.ts) and, when present,
 * `promtool check metrics`; label escaping by property; the fixed-bucket
 * histogram; the health/metrics config keys (errors name the key) and the
 * metrics listen-address parser, fuzzed.
 */
import { spawnSync } from 'node:child_process';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { ConfigError, DEFAULTS, applyConfig, parseMetricsListen } from '../../src/daemon/config.js';
import type { DeviceStatus } from '../../src/daemon/devices.js';
import { HEALTH_DEFAULTS } from '../../src/daemon/health.js';
import { escapeLabelValue, renderMetrics, type MetricsDevice } from '../../src/daemon/metrics.js';
import { LatencyHistogram } from '../../src/metadata/histogram.js';
import { parsePromText, sampleValue } from '../helpers/prom-text.js';

function status(name: string, o: Partial<DeviceStatus> = {}): DeviceStatus {
  return {
    name, state: 'running', main: `/dev/${name}`, spare: '/dev/spare', spareTailBytes: null, exports: [], connections: 2,
    sizeBytes: 1 << 30, blockSize: 4096, openMode: 'direct', remappedBlocks: 5, pendingBlocks: 1, badSpareBlocks: 0,
    quarantinedSpareBlocks: 0, spareBlocksTotal: 100, spareBlocksUsed: 5, spareExhausted: false, breakerTripped: false,
    readErrors: 1, writeErrors: 4, metadataSeq: 9, inFlight: 0, failReason: null, error: null, health: 'degraded', healthReasons: ['x'],
    stats: {
      reads: 10, writes: 20, flushes: 3, discards: 1, writeZeroes: 2, bytesRead: 40960, bytesWritten: 81920, readErrors: 1, writeErrors: 4,
      autoRemaps: 4, manualRemaps: 1, commitFailures: 0, flushErrors: 0, spareErrors: 0, otherErrors: 0,
    },
    ...o,
  };
}

function hist(values: number[]): LatencyHistogram {
  const h = new LatencyHistogram();
  for (const v of values) h.observe(v);
  return h;
}

const promtool = spawnSync('promtool', ['--version']).status === 0;

describe('renderMetrics', () => {
  it('parses strictly and carries each device\'s figures', () => {
    const devices: MetricsDevice[] = [
      { status: status('d0'), commitLatency: hist([0.3, 0.7, 4, 20000]).snapshot() },
      { status: status('d1', { health: 'spare-exhausted', spareBlocksUsed: 100 }), commitLatency: hist([]).snapshot() },
      // Never assembled: no engine, no figures, but listed with its state and health.
      {
        status: status('d2', {
          state: 'failed', health: 'failing', sizeBytes: null, blockSize: null, openMode: null, remappedBlocks: null, pendingBlocks: null, badSpareBlocks: null,
          quarantinedSpareBlocks: null, spareBlocksTotal: null, spareBlocksUsed: null, spareExhausted: null, breakerTripped: null, readErrors: null,
          writeErrors: null, metadataSeq: null, inFlight: null, stats: null, connections: 0,
        }),
        commitLatency: null,
      },
    ];
    const text = renderMetrics({ version: '1.2.3', nodeVersion: 'v20', startedAtMs: 1_700_000_000_000, devices });
    const f = parsePromText(text);
    expect(sampleValue(f, 'dm_remapd_up')).toBe(1);
    expect(sampleValue(f, 'dm_remapd_devices')).toBe(3);
    expect(sampleValue(f, 'dm_remapd_build_info', { version: '1.2.3' })).toBe(1);
    expect(sampleValue(f, 'dm_remapd_device_requests_total', { device: 'd0', op: 'write' })).toBe(20);
    expect(sampleValue(f, 'dm_remapd_device_io_bytes_total', { device: 'd0', op: 'read' })).toBe(40960);
    expect(sampleValue(f, 'dm_remapd_device_errors_total', { device: 'd0', kind: 'write' })).toBe(4);
    expect(sampleValue(f, 'dm_remapd_device_remaps_total', { device: 'd0', kind: 'manual' })).toBe(1);
    expect(sampleValue(f, 'dm_remapd_device_spare_used_blocks', { device: 'd1' })).toBe(100);
    expect(sampleValue(f, 'dm_remapd_device_health', { device: 'd0', state: 'degraded' })).toBe(1);
    expect(sampleValue(f, 'dm_remapd_device_health', { device: 'd0', state: 'ok' })).toBe(0);
    expect(sampleValue(f, 'dm_remapd_device_health', { device: 'd1', state: 'spare-exhausted' })).toBe(1);
    expect(sampleValue(f, 'dm_remapd_device_health', { device: 'd2', state: 'failing' })).toBe(1);
    expect(sampleValue(f, 'dm_remapd_device_state', { device: 'd2', state: 'failed' })).toBe(1);
    expect(() => sampleValue(f, 'dm_remapd_device_pending_blocks', { device: 'd2' })).toThrow(/0 samples/);
    const H = 'dm_remapd_device_metadata_commit_duration_seconds';
    expect(f.get(H)?.type).toBe('histogram');
    expect(sampleValue(f, `${H}_count`, { device: 'd0' })).toBe(4);
    expect(sampleValue(f, `${H}_bucket`, { device: 'd0', le: '0.0005' })).toBe(1);
    expect(sampleValue(f, `${H}_bucket`, { device: 'd0', le: '0.001' })).toBe(2);
    expect(sampleValue(f, `${H}_bucket`, { device: 'd0', le: '10' })).toBe(3);
    expect(sampleValue(f, `${H}_bucket`, { device: 'd0', le: '+Inf' })).toBe(4);
    expect(sampleValue(f, `${H}_sum`, { device: 'd0' })).toBeCloseTo(20.005, 6);
    for (const fam of f.values()) {
      expect(fam.help.length, fam.name).toBeGreaterThan(0);
      expect(fam.type, fam.name).not.toBe('untyped');
    }
    if (promtool) {
      const r = spawnSync('promtool', ['check', 'metrics'], { input: text, encoding: 'utf8' });
      expect(r.status, r.stdout + r.stderr).toBe(0);
    }
  });

  it('escapes label values: any path survives a parse', () => {
    fc.assert(fc.property(fc.string({ unit: 'binary', maxLength: 40 }), (main) => {
      const text = renderMetrics({ version: '0', nodeVersion: 'v', startedAtMs: 0, devices: [{ status: status('d0', { main }), commitLatency: null }] });
      const f = parsePromText(text);
      const info = f.get('dm_remapd_device_info')?.samples[0];
      expect(info?.labels.main).toBe(main);
    }));
    expect(escapeLabelValue('a"b\\c\nd')).toBe('a\\"b\\\\c\\nd');
  });

  it('the strict parser refuses what the format forbids', () => {
    const ok = '# HELP a_total x\n# TYPE a_total counter\na_total{l="v"} 1\n';
    expect(() => parsePromText(ok)).not.toThrow();
    for (const bad of [
      ok.slice(0, -1), // no final newline
      ok.replace('a_total{l="v"} 1', 'a_total{l="v} 1'), // unterminated
      ok.replace('"v"', '"\\x"'), // bad escape
      ok.replace('counter', 'gauge').replace(/a_total/g, 'a').replace('gauge', 'counter'), // counter without _total
      `${ok}a_total{l="v"} 2\n`, // duplicate series
      `${ok}# HELP b x\n# TYPE b gauge\nb 1\na_total{l="w"} 1\n`, // split family
      'a_total 1\n', // no TYPE
      ok.replace(' 1\n', ' one\n'),
      '# HELP h x\n# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n', // not cumulative
      '# HELP h x\n# TYPE h histogram\nh_bucket{le="1"} 1\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 2\n', // +Inf != count
    ]) expect(() => parsePromText(bad), JSON.stringify(bad)).toThrow();
  });
});

describe('LatencyHistogram', () => {
  it('buckets are cumulative upper bounds; +Inf is the count', () => {
    fc.assert(fc.property(fc.array(fc.double({ min: 0, max: 20_000, noNaN: true }), { maxLength: 200 }), (vals) => {
      const s = hist(vals).snapshot();
      expect(s.count).toBe(vals.length);
      s.boundsMs.forEach((b, i) => expect(s.cumulative[i]).toBe(vals.filter((v) => v <= b).length));
      expect(s.sumMs).toBeCloseTo(vals.reduce((a, b) => a + b, 0), 3);
    }));
    expect(() => new LatencyHistogram([1, 1])).toThrow(RangeError);
  });
});

describe('health and metrics config keys', () => {
  const apply = (raw: Record<string, unknown>) => applyConfig({ ...DEFAULTS }, raw, 'cfg.json');

  it('defaults: health thresholds, metrics off', () => {
    expect(DEFAULTS.health).toEqual(HEALTH_DEFAULTS);
    expect(DEFAULTS.metrics).toBeUndefined();
    expect(apply({ metrics: null }).metrics).toBeUndefined();
  });

  it('accepts and merges valid values', () => {
    const c = apply({ health: { windowMs: 1000, degradedErrors: 2, failingErrors: 2 }, metrics: { listen: ':9753' } });
    expect(c.health).toEqual({ ...HEALTH_DEFAULTS, windowMs: 1000, degradedErrors: 2, failingErrors: 2 });
    expect(c.metrics).toEqual({ listen: { kind: 'tcp', host: '127.0.0.1', port: 9753 }, socketMode: 0o666 });
    expect(apply({ metrics: { listen: '/run/x/m.sock', socketMode: '0660' } }).metrics).toEqual({ listen: { kind: 'unix', path: '/run/x/m.sock' }, socketMode: 0o660 });
    expect(apply({ metrics: { listen: '0.0.0.0:9100' } }).metrics?.listen).toEqual({ kind: 'tcp', host: '0.0.0.0', port: 9100 });
    expect(apply({ metrics: { listen: '[::1]:9100' } }).metrics?.listen).toEqual({ kind: 'tcp', host: '::1', port: 9100 });
  });

  it('refuses bad values naming the key', () => {
    const cases: Array<[Record<string, unknown>, RegExp]> = [
      [{ health: 5 }, /"health" must be an object/],
      [{ health: { foo: 1 } }, /unknown key "health\.foo"/],
      [{ health: { degradedErrors: 0 } }, /"health\.degradedErrors" must be an integer/],
      [{ health: { intervalMs: 'x' } }, /"health\.intervalMs" must be an integer number of milliseconds/],
      [{ health: { failingSpareUsed: 1.5 } }, /"health\.failingSpareUsed" must be a fraction/],
      [{ health: { degradedRemaps: 10, failingRemaps: 5 } }, /"health\.failingRemaps" \(5\) must not be below "health\.degradedRemaps" \(10\)/],
      [{ metrics: 'yes' }, /"metrics" must be an object/],
      [{ metrics: {} }, /"metrics\.listen" must be a non-empty string/],
      [{ metrics: { listen: 'example.com:80' } }, /"metrics\.listen" must be "HOST:PORT"/],
      [{ metrics: { listen: '127.0.0.1:70000' } }, /"metrics\.listen"/],
      [{ metrics: { listen: 'rel/path.sock' } }, /"metrics\.listen"/],
      [{ metrics: { listen: ':9' , port: 1 } }, /unknown key "metrics\.port"/],
      [{ metrics: { listen: ':9', socketMode: '0660' } }, /"metrics\.socketMode" applies only to a unix socket/],
      [{ metrics: { listen: '/x.sock', socketMode: '0066' } }, /"metrics\.socketMode" must be a file mode/],
    ];
    for (const [raw, re] of cases) {
      expect(() => apply(raw), JSON.stringify(raw)).toThrow(ConfigError);
      expect(() => apply(raw), JSON.stringify(raw)).toThrow(re);
    }
  });

  it('parseMetricsListen never throws, and what it accepts is well-formed (fuzz)', () => {
    fc.assert(fc.property(fc.oneof(fc.string({ maxLength: 30 }), fc.string({ unit: fc.constantFrom(...'0123456789:.[]/abflocalhost'.split('')), maxLength: 24 })), (s) => {
      const l = parseMetricsListen(s);
      if (l === null) return;
      if (l.kind === 'unix') expect(l.path.startsWith('/')).toBe(true);
      else {
        expect(l.port).toBeGreaterThanOrEqual(0);
        expect(l.port).toBeLessThanOrEqual(65535);
        expect(l.host === 'localhost' || /^[\d.]+$/.test(l.host) || l.host.includes(':')).toBe(true);
      }
    }), { numRuns: 3000 });
  });
});
