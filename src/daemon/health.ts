/**
 * Device health: ok / degraded / failing / spare-exhausted, kept apart from
 * the lifecycle state (running, failed, ...). A pure function judges a short
 * history of counter snapshots against the configured thresholds; a small
 * tracker per device takes a snapshot on a timer, keeps the history of one
 * window, and logs each change of health once.
 */
import type { Logger } from 'pino';

export const HEALTH_STATES = ['ok', 'degraded', 'failing', 'spare-exhausted'] as const;
export type DeviceHealth = (typeof HEALTH_STATES)[number];

/** Severity order: a worse health never hides behind a milder one. */
export function healthRank(h: DeviceHealth): number {
  return HEALTH_STATES.indexOf(h);
}

/** One snapshot of a device's counters (cumulative since the device was opened) and levels. */
export interface HealthSample {
  /** Milliseconds (any monotonic-enough clock; Date.now() in the daemon). */
  t: number;
  readErrors: number;
  writeErrors: number;
  /** Automatic remaps (write errors, pending writes); manual remaps are the operator's doing. */
  autoRemaps: number;
  spareUsed: number;
  spareTotal: number;
  /** The engine refused a remap for lack of spare blocks. */
  spareExhausted: boolean;
  breakerTripped: boolean;
  /** The engine is failed (latched flush error, vanished disk, ...). */
  engineFailed: boolean;
  failReason?: string | null;
}

export interface HealthThresholds {
  /** The sliding window over which errors and remaps are counted. */
  windowMs: number;
  /** Read + write errors within the window that make the device degraded / failing. */
  degradedErrors: number;
  failingErrors: number;
  /** Automatic remaps within the window that make the device degraded / failing. */
  degradedRemaps: number;
  failingRemaps: number;
  /** Fraction (0..1] of the spare in use that makes the device degraded / failing. */
  degradedSpareUsed: number;
  failingSpareUsed: number;
}

export interface HealthConfig extends HealthThresholds {
  /** How often each device's counters are sampled and judged. */
  intervalMs: number;
}

export const HEALTH_DEFAULTS: HealthConfig = {
  intervalMs: 5000,
  windowMs: 600_000,
  degradedErrors: 1,
  failingErrors: 100,
  degradedRemaps: 1,
  failingRemaps: 64,
  degradedSpareUsed: 0.5,
  failingSpareUsed: 0.9,
};

export interface HealthVerdict {
  health: DeviceHealth;
  /** Why, one phrase per condition that holds (empty when ok). */
  reasons: string[];
  errorsInWindow: number;
  remapsInWindow: number;
  /** spareUsed / spareTotal (1 when the spare has no blocks). */
  spareUsedFraction: number;
}

/**
 * Index of the sample the window's counts are measured from: the newest one
 * taken at or before `last.t - windowMs`, else the oldest (a device younger
 * than one window: its first sample was taken when it was added).
 */
export function baselineIndex(history: readonly HealthSample[], windowMs: number): number {
  const cutoff = history[history.length - 1].t - windowMs;
  let b = 0;
  for (let i = 0; i < history.length; i++) {
    if (history[i].t <= cutoff) b = i;
    else break;
  }
  return b;
}

/**
 * Judges the newest sample of `history` (sorted by time, oldest first):
 * - spare-exhausted: no spare block left (or a remap was refused for lack of one);
 * - failing: the engine failed, the remap breaker tripped, or a failing threshold is reached;
 * - degraded: a degraded threshold is reached;
 * - ok otherwise.
 * Counters are compared with the window's baseline; a counter that went
 * down (a reopened engine) counts as no events.
 */
export function evaluateHealth(history: readonly HealthSample[], th: HealthThresholds): HealthVerdict {
  if (history.length === 0) return { health: 'ok', reasons: [], errorsInWindow: 0, remapsInWindow: 0, spareUsedFraction: 0 };
  const last = history[history.length - 1];
  const base = history[baselineIndex(history, th.windowMs)];
  const errors = Math.max(0, last.readErrors + last.writeErrors - (base.readErrors + base.writeErrors));
  const remaps = Math.max(0, last.autoRemaps - base.autoRemaps);
  const frac = last.spareTotal > 0 ? Math.min(1, last.spareUsed / last.spareTotal) : 1;
  const windowText = `${Math.round(th.windowMs / 1000)} s`;
  const exhausted: string[] = [];
  const failing: string[] = [];
  const degraded: string[] = [];
  if (last.spareTotal <= 0 || last.spareUsed >= last.spareTotal) exhausted.push(`spare full: ${last.spareUsed} of ${last.spareTotal} blocks used`);
  else if (last.spareExhausted) exhausted.push('a remap was refused for lack of spare blocks');
  if (last.engineFailed) failing.push(`engine failed${last.failReason ? `: ${last.failReason}` : ''}`);
  if (last.breakerTripped) failing.push('remap-rate breaker tripped');
  const level = (v: number, d: number, f: number, what: string): void => {
    if (v >= f) failing.push(what);
    else if (v >= d) degraded.push(what);
  };
  level(errors, th.degradedErrors, th.failingErrors, `${errors} I/O error(s) in the last ${windowText}`);
  level(remaps, th.degradedRemaps, th.failingRemaps, `${remaps} automatic remap(s) in the last ${windowText}`);
  if (exhausted.length === 0) level(frac, th.degradedSpareUsed, th.failingSpareUsed, `${(frac * 100).toFixed(1)}% of the spare used`);
  const health: DeviceHealth = exhausted.length > 0 ? 'spare-exhausted' : failing.length > 0 ? 'failing' : degraded.length > 0 ? 'degraded' : 'ok';
  return { health, reasons: [...exhausted, ...failing, ...degraded], errorsInWindow: errors, remapsInWindow: remaps, spareUsedFraction: frac };
}

export interface HealthTrackerOptions {
  device: string;
  /** The device's counters now (without the time). */
  sample: () => Omit<HealthSample, 't'>;
  config: HealthConfig;
  logger: Logger;
  now?: () => number;
}

/**
 * Samples one device on a timer (unref'ed: it never keeps the daemon alive)
 * and logs each change of health once: warn for degraded, error for failing
 * and spare-exhausted, info for a return to ok. stop() clears the timer.
 */
export class HealthTracker {
  private history: HealthSample[] = [];
  private timer: NodeJS.Timeout | undefined;
  private reported: DeviceHealth = 'ok';
  private readonly now: () => number;
  private readonly log: Logger;

  constructor(private readonly o: HealthTrackerOptions) {
    this.now = o.now ?? Date.now;
    this.log = o.logger.child({ device: o.device });
  }

  get running(): boolean {
    return this.timer !== undefined;
  }

  /** Takes the first sample (judged at once) and starts the timer. */
  start(): HealthVerdict {
    const v = this.tick();
    if (this.timer === undefined) {
      this.timer = setInterval(() => {
        try {
          this.tick();
        } catch (err) {
          this.log.warn({ event: 'health-sample-failed', err: String(err) }, `health of ${this.o.device} could not be sampled`);
        }
      }, this.o.config.intervalMs);
      this.timer.unref();
    }
    return v;
  }

  stop(): void {
    if (this.timer !== undefined) clearInterval(this.timer);
    this.timer = undefined;
  }

  /** Records a sample and judges it. */
  tick(): HealthVerdict {
    this.history.push({ ...this.o.sample(), t: this.now() });
    // Keep the window's baseline and what came after it.
    const b = baselineIndex(this.history, this.o.config.windowMs);
    if (b > 0) this.history = this.history.slice(b);
    return this.report(evaluateHealth(this.history, this.o.config));
  }

  /** Judges the counters as they are now, without recording them (status queries). */
  current(): HealthVerdict {
    return this.report(evaluateHealth([...this.history, { ...this.o.sample(), t: this.now() }], this.o.config));
  }

  /** Samples held (bounded by one window's worth of ticks). */
  get samples(): number {
    return this.history.length;
  }

  private report(v: HealthVerdict): HealthVerdict {
    if (v.health === this.reported) return v;
    const previous = this.reported;
    this.reported = v.health;
    const fields = { event: 'health-changed', health: v.health, previous, reasons: v.reasons,
      errorsInWindow: v.errorsInWindow, remapsInWindow: v.remapsInWindow, spareUsedFraction: v.spareUsedFraction };
    const msg = `device ${this.o.device} health ${previous} -> ${v.health}${v.reasons.length > 0 ? `: ${v.reasons.join('; ')}` : ''}`;
    if (v.health === 'ok') this.log.info(fields, msg);
    else if (v.health === 'degraded') this.log.warn(fields, msg);
    else this.log.error(fields, msg);
    return v;
  }
}
