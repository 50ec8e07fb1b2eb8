/**
 * A token bucket that may go into debt: the rate limiter of scans and
 * scrubs. A caller takes the bytes it is about to read and is told how long
 * to wait before reading them. A chunk larger than the bucket is granted
 * at once and paid for by the wait, so any chunk size works with any rate.
 * Pure: the clock is passed in, so the accounting can be property-tested.
 */
export class TokenBucket {
  /** Bytes per second. */
  readonly rate: number;
  /** Bytes that may go out at once after an idle time. */
  readonly burst: number;
  private tokens: number;
  private last: number;
  /** Bytes granted so far. */
  granted = 0;
  /** Milliseconds of waiting the bucket has asked for so far. */
  waitedMs = 0;
  /** Takes that had to wait. */
  throttled = 0;

  constructor(rateBytesPerSec: number, burstBytes: number, nowMs: number) {
    if (!(rateBytesPerSec > 0) || !Number.isFinite(rateBytesPerSec)) throw new RangeError(`token bucket rate must be a positive number of bytes/s, got ${rateBytesPerSec}`);
    if (!(burstBytes > 0) || !Number.isFinite(burstBytes)) throw new RangeError(`token bucket burst must be a positive number of bytes, got ${burstBytes}`);
    this.rate = rateBytesPerSec;
    this.burst = burstBytes;
    this.tokens = burstBytes;
    this.last = nowMs;
  }

  private refill(nowMs: number): void {
    if (nowMs <= this.last) return;
    this.tokens = Math.min(this.burst, this.tokens + ((nowMs - this.last) * this.rate) / 1000);
    this.last = nowMs;
  }

  /**
   * Takes `bytes` at `nowMs`; returns the milliseconds to wait before using
   * them (0: now). Waiting that long brings the bucket back out of debt.
   */
  take(bytes: number, nowMs: number): number {
    this.refill(nowMs);
    this.tokens -= bytes;
    this.granted += bytes;
    if (this.tokens >= 0) return 0;
    const wait = Math.ceil((-this.tokens * 1000) / this.rate);
    this.waitedMs += wait;
    this.throttled++;
    return wait;
  }

  /** Tokens available at `nowMs` (negative: debt). For tests and status. */
  available(nowMs: number): number {
    this.refill(nowMs);
    return this.tokens;
  }
}
