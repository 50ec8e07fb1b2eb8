/**
 * Remap-rate circuit breaker. A disk that degrades loses a few blocks at a
 * time; hundreds of remaps within seconds means a whole region (or the whole
 * device) is failing, or the errors are not media errors at all. Past the
 * limit the engine stops remapping automatically and fails the device instead
 * of burning the spare.
 */
export class RemapBreaker {
  private readonly stamps: number[] = [];
  private trippedAtMs = -1;

  constructor(
    readonly maxRemaps: number,
    readonly windowMs: number,
    private readonly now: () => number = Date.now,
  ) {}

  get tripped(): boolean {
    return this.trippedAtMs >= 0;
  }

  /** Ask for `n` automatic remaps; false (and the breaker trips) past the limit. */
  admit(n = 1): boolean {
    if (this.tripped) return false;
    const t = this.now();
    while (this.stamps.length > 0 && this.stamps[0] <= t - this.windowMs) this.stamps.shift();
    if (this.stamps.length + n > this.maxRemaps) {
      this.trippedAtMs = t;
      return false;
    }
    for (let i = 0; i < n; i++) this.stamps.push(t);
    return true;
  }

  /** Operator reset (after replacing cabling, say). */
  reset(): void {
    this.trippedAtMs = -1;
    this.stamps.length = 0;
  }

  /** Remaps admitted within the current window. */
  recent(): number {
    const t = this.now();
    return this.stamps.filter((s) => s > t - this.windowMs).length;
  }
}
