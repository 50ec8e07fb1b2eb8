/**
 * A fixed-bucket latency histogram (the shape Prometheus histograms expose):
 * counts per upper bound, plus the sum and count of all observations.
 * Observing is a short loop over a dozen bounds and no allocation.
 */

/** Upper bounds, in milliseconds, of metadata commit latency buckets (+Inf is implied). */
export const COMMIT_LATENCY_BUCKETS_MS: readonly number[] = [0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000];

export interface HistogramSnapshot {
  /** Upper bounds (ms), ascending; the +Inf bucket is `count`. */
  boundsMs: number[];
  /** Cumulative counts: observations <= boundsMs[i]. */
  cumulative: number[];
  sumMs: number;
  count: number;
}

export class LatencyHistogram {
  private readonly bounds: Float64Array;
  /** Non-cumulative counts per bucket; the last slot is the overflow (+Inf). */
  private readonly counts: Float64Array;
  private sum = 0;
  private n = 0;

  constructor(boundsMs: readonly number[] = COMMIT_LATENCY_BUCKETS_MS) {
    for (let i = 1; i < boundsMs.length; i++) {
      if (!(boundsMs[i] > boundsMs[i - 1])) throw new RangeError('histogram bounds must be strictly ascending');
    }
    this.bounds = Float64Array.from(boundsMs);
    this.counts = new Float64Array(boundsMs.length + 1);
  }

  observe(ms: number): void {
    let i = 0;
    while (i < this.bounds.length && ms > this.bounds[i]) i++;
    this.counts[i]++;
    this.sum += ms;
    this.n++;
  }

  snapshot(): HistogramSnapshot {
    const cumulative: number[] = [];
    let acc = 0;
    for (let i = 0; i < this.bounds.length; i++) {
      acc += this.counts[i];
      cumulative.push(acc);
    }
    return { boundsMs: Array.from(this.bounds), cumulative, sumMs: this.sum, count: this.n };
  }
}
