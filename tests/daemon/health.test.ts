/**
 * Device health: the pure judgement (evaluateHealth) by example and by
 * property (fast-check), and the per-device tracker: one log line per change
 * at the right level, a history bounded by the window, a timer that is
 * unref'ed and gone after stop().
 */
import fc from 'fast-check';
import pino from 'pino';
import { Writable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import {
  HEALTH_DEFAULTS, HEALTH_STATES, HealthTracker, baselineIndex, evaluateHealth, healthRank,
  type HealthConfig, type HealthSample, type HealthThresholds,
} from '../../src/daemon/health.js';

const TH: HealthThresholds = {
  windowMs: 60_000, degradedErrors: 1, failingErrors: 10, degradedRemaps: 2, failingRemaps: 20, degradedSpareUsed: 0.5, failingSpareUsed: 0.9,
};

function sample(t: number, o: Partial<HealthSample> = {}): HealthSample {
  return {
    t, readErrors: 0, writeErrors: 0, autoRemaps: 0, spareUsed: 0, spareTotal: 1000,
    spareExhausted: false, breakerTripped: false, engineFailed: false, ...o,
  };
}

describe('evaluateHealth by example', () => {
  it('is ok with no events and little spare used', () => {
    expect(evaluateHealth([sample(0), sample(5000, { spareUsed: 10 })], TH)).toEqual({
      health: 'ok', reasons: [], errorsInWindow: 0, remapsInWindow: 0, spareUsedFraction: 0.01,
    });
    expect(evaluateHealth([], TH).health).toBe('ok');
  });

  it('counts errors and remaps within the window only', () => {
    const h = [sample(0), sample(10_000, { readErrors: 3 }), sample(70_000, { readErrors: 3, writeErrors: 1, autoRemaps: 2 })];
    // Baseline: the sample at t=10000 (the newest at or before 70000-60000).
    expect(baselineIndex(h, TH.windowMs)).toBe(1);
    const v = evaluateHealth(h, TH);
    expect(v).toMatchObject({ health: 'degraded', errorsInWindow: 1, remapsInWindow: 2 });
    expect(v.reasons).toEqual(['1 I/O error(s) in the last 60 s', '2 automatic remap(s) in the last 60 s']);
    // Once the window has passed without events: ok again.
    expect(evaluateHealth([...h, sample(140_000, { readErrors: 3, writeErrors: 1, autoRemaps: 2 })], TH).health).toBe('ok');
  });

  it('failing on the failing thresholds, the breaker or a failed engine', () => {
    expect(evaluateHealth([sample(0), sample(1, { writeErrors: 10 })], TH).health).toBe('failing');
    expect(evaluateHealth([sample(0), sample(1, { autoRemaps: 20 })], TH).health).toBe('failing');
    expect(evaluateHealth([sample(0), sample(1, { spareUsed: 900 })], TH).health).toBe('failing');
    expect(evaluateHealth([sample(0, { breakerTripped: true })], TH)).toMatchObject({ health: 'failing', reasons: ['remap-rate breaker tripped'] });
    expect(evaluateHealth([sample(0, { engineFailed: true, failReason: 'fdatasync of main failed (EIO)' })], TH).reasons)
      .toEqual(['engine failed: fdatasync of main failed (EIO)']);
  });

  it('spare-exhausted when the spare is full or a remap was refused, above everything else', () => {
    expect(evaluateHealth([sample(0, { spareUsed: 1000, engineFailed: true })], TH)).toMatchObject({
      health: 'spare-exhausted', reasons: ['spare full: 1000 of 1000 blocks used', 'engine failed'],
    });
    expect(evaluateHealth([sample(0, { spareUsed: 3, spareExhausted: true })], TH).health).toBe('spare-exhausted');
    expect(evaluateHealth([sample(0, { spareTotal: 0 })], TH).health).toBe('spare-exhausted');
  });

  it('a counter that went down (a reopened engine) counts as no events', () => {
    expect(evaluateHealth([sample(0, { readErrors: 50, autoRemaps: 50 }), sample(1)], TH)).toMatchObject({ health: 'ok', errorsInWindow: 0, remapsInWindow: 0 });
  });
});

const arbThresholds: fc.Arbitrary<HealthThresholds> = fc.record({
  windowMs: fc.integer({ min: 1, max: 100_000 }),
  dE: fc.integer({ min: 1, max: 50 }), fE: fc.integer({ min: 0, max: 50 }),
  dR: fc.integer({ min: 1, max: 50 }), fR: fc.integer({ min: 0, max: 50 }),
  dS: fc.double({ min: 0.01, max: 1, noNaN: true }), fS: fc.double({ min: 0, max: 1, noNaN: true }),
}).map((r) => ({
  windowMs: r.windowMs, degradedErrors: r.dE, failingErrors: r.dE + r.fE, degradedRemaps: r.dR, failingRemaps: r.dR + r.fR,
  degradedSpareUsed: r.dS, failingSpareUsed: Math.min(1, r.dS + r.fS),
}));

/** Histories with nondecreasing time and counters (as a running engine produces). */
const arbHistory: fc.Arbitrary<HealthSample[]> = fc.array(fc.record({
  dt: fc.integer({ min: 0, max: 30_000 }), dr: fc.integer({ min: 0, max: 5 }), dw: fc.integer({ min: 0, max: 5 }), da: fc.integer({ min: 0, max: 5 }),
  used: fc.integer({ min: 0, max: 100 }), total: fc.integer({ min: 0, max: 100 }),
  ex: fc.boolean(), br: fc.boolean(), failed: fc.boolean(),
}), { minLength: 1, maxLength: 30 }).map((steps) => {
  let t = 0; let r = 0; let w = 0; let a = 0;
  return steps.map((s) => {
    t += s.dt; r += s.dr; w += s.dw; a += s.da;
    return {
      t, readErrors: r, writeErrors: w, autoRemaps: a, spareUsed: Math.min(s.used, s.total), spareTotal: s.total,
      spareExhausted: s.ex && s.br, breakerTripped: s.br && s.failed, engineFailed: s.failed && s.ex,
    };
  });
});

describe('evaluateHealth properties', () => {
  it('the verdict follows its own counts: each health has the condition that defines it', () => {
    fc.assert(fc.property(arbHistory, arbThresholds, (h, th) => {
      const v = evaluateHealth(h, th);
      const last = h[h.length - 1];
      const full = last.spareTotal <= 0 || last.spareUsed >= last.spareTotal || last.spareExhausted;
      expect(HEALTH_STATES).toContain(v.health);
      expect(v.health === 'spare-exhausted').toBe(full);
      const failingCond = last.engineFailed || last.breakerTripped || v.errorsInWindow >= th.failingErrors || v.remapsInWindow >= th.failingRemaps
        || v.spareUsedFraction >= th.failingSpareUsed;
      const degradedCond = v.errorsInWindow >= th.degradedErrors || v.remapsInWindow >= th.degradedRemaps || v.spareUsedFraction >= th.degradedSpareUsed;
      if (!full) expect(v.health).toBe(failingCond ? 'failing' : degradedCond ? 'degraded' : 'ok');
      expect(v.reasons.length === 0).toBe(v.health === 'ok');
      expect(v.errorsInWindow).toBeGreaterThanOrEqual(0);
      expect(v.spareUsedFraction).toBeGreaterThanOrEqual(0);
      expect(v.spareUsedFraction).toBeLessThanOrEqual(1);
    }));
  });

  it('more events in the newest sample never make the health better', () => {
    fc.assert(fc.property(arbHistory, arbThresholds, fc.integer({ min: 0, max: 30 }), fc.integer({ min: 0, max: 30 }), (h, th, de, da) => {
      const last = h[h.length - 1];
      const worse = [...h.slice(0, -1), { ...last, writeErrors: last.writeErrors + de, autoRemaps: last.autoRemaps + da }];
      expect(healthRank(evaluateHealth(worse, th).health)).toBeGreaterThanOrEqual(healthRank(evaluateHealth(h, th).health));
    }));
  });

  it('lower thresholds never make the health better', () => {
    fc.assert(fc.property(arbHistory, arbThresholds, fc.integer({ min: 0, max: 10 }), (h, th, k) => {
      const lower: HealthThresholds = {
        ...th,
        degradedErrors: Math.max(1, th.degradedErrors - k), failingErrors: Math.max(1, th.failingErrors - k),
        degradedRemaps: Math.max(1, th.degradedRemaps - k), failingRemaps: Math.max(1, th.failingRemaps - k),
        degradedSpareUsed: th.degradedSpareUsed / 2, failingSpareUsed: th.failingSpareUsed / 2,
      };
      expect(healthRank(evaluateHealth(h, lower).health)).toBeGreaterThanOrEqual(healthRank(evaluateHealth(h, th).health));
    }));
  });

  it('only the window matters: samples older than the baseline change nothing', () => {
    fc.assert(fc.property(arbHistory, arbThresholds, (h, th) => {
      const b = baselineIndex(h, th.windowMs);
      expect(evaluateHealth(h.slice(b), th)).toEqual(evaluateHealth(h, th));
    }));
  });

  it('the window counts equal the newest counters minus the baseline counters', () => {
    fc.assert(fc.property(arbHistory, arbThresholds, (h, th) => {
      const base = h[baselineIndex(h, th.windowMs)];
      const last = h[h.length - 1];
      const v = evaluateHealth(h, th);
      expect(v.errorsInWindow).toBe(last.readErrors + last.writeErrors - base.readErrors - base.writeErrors);
      expect(v.remapsInWindow).toBe(last.autoRemaps - base.autoRemaps);
      expect(base.t <= last.t - th.windowMs || base === h[0]).toBe(true);
    }));
  });
});

/** A pino logger writing its JSON lines into `lines`. */
function capture(): { logger: pino.Logger; lines: Array<Record<string, unknown>> } {
  const lines: Array<Record<string, unknown>> = [];
  const stream = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const l of chunk.toString('utf8').split('\n')) if (l !== '') lines.push(JSON.parse(l) as Record<string, unknown>);
      cb();
    },
  });
  return { logger: pino({ level: 'trace' }, stream), lines };
}

async function flushLogs(): Promise<void> {
  await new Promise((r) => setImmediate(r));
}

describe('HealthTracker', () => {
  const cfg: HealthConfig = { ...TH, intervalMs: 20 };

  it('logs each change once, at warn for degraded and error for failing/spare-exhausted, info back to ok', async () => {
    const { logger, lines } = capture();
    let now = 0;
    let s: Omit<HealthSample, 't'> = sample(0);
    const tr = new HealthTracker({ device: 'd0', sample: () => s, config: cfg, logger, now: () => now });
    expect(tr.tick().health).toBe('ok');
    now = 1000; s = { ...s, readErrors: 1 };
    expect(tr.tick().health).toBe('degraded');
    now = 2000;
    expect(tr.tick().health).toBe('degraded'); // no second line
    expect(tr.current().health).toBe('degraded');
    now = 3000; s = { ...s, writeErrors: 20 };
    expect(tr.current().health).toBe('failing'); // a status query notices (and logs) it too
    expect(tr.tick().health).toBe('failing');
    now = 4000; s = { ...s, spareUsed: 1000 };
    expect(tr.tick().health).toBe('spare-exhausted');
    now = 200_000; s = { ...s, spareUsed: 1 };
    expect(tr.tick().health).toBe('ok'); // the window has passed
    await flushLogs();
    const changes = lines.filter((l) => l.event === 'health-changed');
    expect(changes.map((l) => [l.previous, l.health, l.level, l.device])).toEqual([
      ['ok', 'degraded', 40, 'd0'], ['degraded', 'failing', 50, 'd0'], ['failing', 'spare-exhausted', 50, 'd0'], ['spare-exhausted', 'ok', 30, 'd0'],
    ]);
    expect(changes[0].reasons).toEqual(['1 I/O error(s) in the last 60 s']);
  });

  it('keeps one window of samples', () => {
    const { logger } = capture();
    let now = 0;
    const tr = new HealthTracker({ device: 'd0', sample: () => sample(0), config: { ...cfg, windowMs: 100 }, logger, now: () => now });
    for (let i = 0; i < 1000; i++) {
      now += 10;
      tr.tick();
    }
    expect(tr.samples).toBeLessThanOrEqual(12);
    expect(tr.samples).toBeGreaterThanOrEqual(10);
  });

  it('samples on an unref\'ed timer, and stop() leaves no timer behind', async () => {
    const { logger } = capture();
    let calls = 0;
    const timers = (): number => process.getActiveResourcesInfo().filter((r) => r === 'Timeout').length;
    const before = timers();
    const tr = new HealthTracker({ device: 'd0', sample: () => { calls++; return sample(0); }, config: cfg, logger });
    tr.start();
    expect(tr.running).toBe(true);
    // An unref'ed timer is not an active resource: it cannot keep the daemon alive.
    expect(timers()).toBe(before);
    const t0 = calls;
    for (let i = 0; i < 200 && calls < t0 + 3; i++) await new Promise((r) => setTimeout(r, 10));
    expect(calls).toBeGreaterThanOrEqual(t0 + 3);
    tr.stop();
    expect(tr.running).toBe(false);
    const after = calls;
    await new Promise((r) => setTimeout(r, 100));
    expect(calls).toBe(after);
  });

  it('a sampler that throws is logged, and the timer goes on', async () => {
    const { logger, lines } = capture();
    let n = 0;
    const tr = new HealthTracker({ device: 'd0', sample: () => { if (++n === 2) throw new Error('boom'); return sample(0); }, config: cfg, logger });
    tr.start();
    for (let i = 0; i < 200 && n < 4; i++) await new Promise((r) => setTimeout(r, 10));
    tr.stop();
    await flushLogs();
    expect(n).toBeGreaterThanOrEqual(4);
    expect(lines.filter((l) => l.event === 'health-sample-failed')).toHaveLength(1);
  });

  it('defaults are consistent (failing thresholds not below degraded ones)', () => {
    expect(HEALTH_DEFAULTS.failingErrors).toBeGreaterThanOrEqual(HEALTH_DEFAULTS.degradedErrors);
    expect(HEALTH_DEFAULTS.failingRemaps).toBeGreaterThanOrEqual(HEALTH_DEFAULTS.degradedRemaps);
    expect(HEALTH_DEFAULTS.failingSpareUsed).toBeGreaterThanOrEqual(HEALTH_DEFAULTS.degradedSpareUsed);
  });
});
