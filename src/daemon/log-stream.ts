/**
 * The daemon's log destination: pino writes one JSON line per call, and this
 * stream hands the lines to fd 1 (a pipe, the journal's socket or a file).
 *
 * Why not pino's default stream: when the reader of stdout has gone away
 * (EPIPE), its synchronous flush at process exit retries forever, so the
 * daemon never exits after its devices are removed. Here an output error
 * other than EAGAIN ends logging for good (it is reported once on stderr),
 * every wait is bounded, and a stalled reader costs at most `maxPendingBytes`
 * of memory: lines beyond that are counted, and the count is logged once the
 * output moves again.
 *
 * Writes run in libuv's thread pool, one chunk at a time, so a slow reader
 * never blocks the event loop and lines keep their order. A reader that
 * stops reading for good leaves one pool thread blocked in write(2); the
 * daemon then leaves with _exit (see main.ts), since exit(3) would wait for
 * that thread.
 */
import { write as fsWrite, writeSync } from 'node:fs';

export interface LogStreamOptions {
  /** Default 1 (stdout). */
  fd?: number;
  /** Lines waiting beyond this size (counted in UTF-16 units, near enough to bytes for JSON logs) are dropped and counted. Default 16 Mi. */
  maxPendingBytes?: number;
  /** Where a broken output is reported (default: a line on fd 2). */
  onBroken?: (errno: string, message: string) => void;
}

/** A non-blocking output that is full is tried again after this long. */
const EAGAIN_RETRY_MS = 10;

export class LogStream {
  readonly fd: number;
  private readonly maxPendingBytes: number;
  private readonly onBroken: (errno: string, message: string) => void;
  private pending: string[] = [];
  private pendingBytes = 0;
  private writing = false;
  private droppedSinceReport = 0;
  private idleWaiters: Array<() => void> = [];
  /** The errno name that ended logging, or null while the output works. */
  broken: string | null = null;
  /** Lines not written: dropped while the output stalled, or after it broke. */
  dropped = 0;

  constructor(o: LogStreamOptions = {}) {
    this.fd = o.fd ?? 1;
    this.maxPendingBytes = o.maxPendingBytes ?? 16 << 20;
    this.onBroken = o.onBroken ?? ((errno, message) => {
      try {
        writeSync(2, `dm-remapd: log output (fd ${this.fd}) failed with ${errno} (${message}); later log lines are dropped\n`);
      } catch {
        // stderr is gone too: nothing left to tell
      }
    });
  }

  /** pino's entry point: one serialized line (with its newline). */
  write(line: string): boolean {
    if (this.broken !== null) {
      this.dropped++;
      return true;
    }
    if (this.pendingBytes + line.length > this.maxPendingBytes) {
      this.dropped++;
      this.droppedSinceReport++;
      return true;
    }
    if (this.droppedSinceReport > 0 && this.pendingBytes + line.length <= this.maxPendingBytes / 2) {
      // the output moves again: say how many lines it missed, in their place
      const note = `${JSON.stringify({ level: 40, time: Date.now(), pid: process.pid, service: 'dm-remapd', event: 'log-lines-dropped', dropped: this.droppedSinceReport, msg: `${this.droppedSinceReport} log line(s) dropped while the log output was stalled` })}\n`;
      this.droppedSinceReport = 0;
      this.enqueue(note);
    }
    this.enqueue(line);
    return true;
  }

  /** Resolves once everything written so far is out, the output broke, or `timeoutMs` passed (then false). */
  drain(timeoutMs: number): Promise<boolean> {
    if (!this.writing || this.broken !== null) return Promise.resolve(this.broken === null);
    return new Promise((resolve) => {
      const done = (): void => {
        clearTimeout(t);
        resolve(this.broken === null);
      };
      const t = setTimeout(() => {
        this.idleWaiters = this.idleWaiters.filter((w) => w !== done);
        resolve(false);
      }, timeoutMs);
      t.unref();
      this.idleWaiters.push(done);
    });
  }

  /** A write is in flight: in libuv's thread pool, where a pipe nobody reads blocks it. */
  get busy(): boolean {
    return this.writing;
  }

  private enqueue(line: string): void {
    this.pending.push(line);
    this.pendingBytes += line.length;
    if (!this.writing) this.writeNext();
  }

  private writeNext(): void {
    if (this.pending.length === 0 || this.broken !== null) {
      this.writing = false;
      const waiters = this.idleWaiters;
      this.idleWaiters = [];
      for (const w of waiters) w();
      return;
    }
    this.writing = true;
    const buf = Buffer.from(this.pending.length === 1 ? this.pending[0] : this.pending.join(''));
    this.pending = [];
    this.pendingBytes = 0;
    this.writeOut(buf);
  }

  private writeOut(buf: Buffer): void {
    fsWrite(this.fd, buf, 0, buf.length, null, (err, n) => {
      if (err !== null) {
        if (err.code === 'EAGAIN') {
          setTimeout(() => this.writeOut(buf), EAGAIN_RETRY_MS);
          return;
        }
        this.dropped += linesIn(buf);
        this.breakOff(err.code ?? 'EIO', err.message);
        this.writeNext();
        return;
      }
      if (n < buf.length) {
        this.writeOut(buf.subarray(n));
        return;
      }
      this.writeNext();
    });
  }

  private breakOff(errno: string, message: string): void {
    if (this.broken !== null) return;
    this.broken = errno;
    this.dropped += this.pending.length;
    this.pending = [];
    this.pendingBytes = 0;
    this.onBroken(errno, message);
  }
}

function linesIn(buf: Buffer): number {
  let n = 0;
  for (let i = buf.indexOf(10); i >= 0; i = buf.indexOf(10, i + 1)) n++;
  return n;
}
