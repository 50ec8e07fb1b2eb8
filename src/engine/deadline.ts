/** Outcome of waiting for a promise with a bound. */
export type Bounded<T> = { done: true; value: T } | { done: false };

/**
 * Wait for `p` at most `ms` milliseconds. The timer is always cleared, so a
 * bounded wait never leaves a handle behind (teardown is checked with
 * process.getActiveResourcesInfo()). A rejection of `p` propagates.
 */
export async function within<T>(p: Promise<T>, ms: number): Promise<Bounded<T>> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<Bounded<T>>((resolve) => {
    timer = setTimeout(() => resolve({ done: false }), Math.max(0, ms));
  });
  try {
    return await Promise.race([p.then((value): Bounded<T> => ({ done: true, value })), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** A single deadline shared by the steps of one operation (removal). */
export class Deadline {
  private readonly end: number;
  constructor(ms: number, private readonly now: () => number = Date.now) {
    this.end = now() + ms;
  }
  remaining(): number {
    return Math.max(0, this.end - this.now());
  }
  get expired(): boolean {
    return this.remaining() === 0;
  }
}
