/**
 * The daemon's log output (src/daemon/log-stream.ts).
 *
 * Found from an interrupted CI run: a daemon whose stdout reader had died
 * (EPIPE) never exited after SIGTERM, because pino's default stream retried
 * its exit flush forever. These tests cut the reader of a real pipe and check that the
 * daemon still stops in bounded time, and that the stream keeps every line,
 * in order, while the output works.
 */
import { closeSync, openSync, constants as fsc, readSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { execFileSync } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LogStream } from '../../src/daemon/log-stream.js';
import { cleanup, ctl, raw, startDaemon, tempDir, type Daemon } from './helpers.js';

/** A FIFO opened at both ends in this process: [readFd, writeFd]. */
function fifo(dir: string, name: string): [number, number] {
  const path = join(dir, name);
  execFileSync('mkfifo', [path]);
  const r = openSync(path, fsc.O_RDONLY | fsc.O_NONBLOCK);
  const w = openSync(path, fsc.O_WRONLY);
  return [r, w];
}

/** Reads what is in the FIFO now (its reader is non-blocking). */
function readAvailable(fd: number): string {
  const chunks: Buffer[] = [];
  const buf = Buffer.alloc(1 << 16);
  for (;;) {
    let n: number;
    try {
      n = readSync(fd, buf);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EAGAIN') break;
      throw err;
    }
    if (n === 0) break;
    chunks.push(Buffer.from(buf.subarray(0, n)));
  }
  return Buffer.concat(chunks).toString('utf8');
}

describe('LogStream', () => {
  let dir: string;
  beforeAll(() => {
    dir = tempDir('dmr-logstream-');
  });
  afterAll(() => cleanup(dir));

  it('writes every line, whole and in order, through a pipe that is read as it fills', async () => {
    const [r, w] = fifo(dir, 'ok');
    const s = new LogStream({ fd: w });
    const want: string[] = [];
    let got = '';
    for (let i = 0; i < 20_000; i++) {
      const line = `${JSON.stringify({ i, pad: 'x'.repeat(i % 97) })}\n`;
      want.push(line);
      s.write(line);
      if (i % 1000 === 0) {
        await new Promise((res) => setTimeout(res, 1));
        got += readAvailable(r);
      }
    }
    // The pipe holds 64 KiB: keep reading until the stream is idle.
    let drained = false;
    const done = s.drain(10_000).then((ok) => { drained = ok; });
    while (!drained) {
      got += readAvailable(r);
      await Promise.race([done, new Promise((res) => setTimeout(res, 5))]);
    }
    got += readAvailable(r);
    expect(got).toBe(want.join(''));
    expect(s.broken).toBeNull();
    expect(s.dropped).toBe(0);
    closeSync(r);
    closeSync(w);
  });

  it('a pipe with no reader (EPIPE) ends logging once, reported, without blocking a drain', async () => {
    const [r, w] = fifo(dir, 'gone');
    const reports: string[] = [];
    const s = new LogStream({ fd: w, onBroken: (errno, message) => reports.push(`${errno}: ${message}`) });
    s.write('{"first":1}\n');
    expect(await s.drain(5000)).toBe(true);
    expect(readAvailable(r)).toBe('{"first":1}\n');
    closeSync(r); // the reader is gone
    for (let i = 0; i < 100; i++) s.write(`{"line":${i}}\n`);
    const t0 = Date.now();
    expect(await s.drain(5000)).toBe(false);
    expect(Date.now() - t0).toBeLessThan(2000);
    expect(s.broken).toBe('EPIPE');
    expect(reports).toHaveLength(1);
    expect(reports[0]).toMatch(/^EPIPE: /);
    // every one of the 100 lines is counted as dropped, and later ones too
    expect(s.dropped).toBe(100);
    s.write('{"after":1}\n');
    expect(s.dropped).toBe(101);
    expect(s.busy).toBe(false);
    expect(reports).toHaveLength(1);
    closeSync(w);
  });

  it('a stalled output keeps at most maxPendingBytes, counts what it drops, and says so once it moves', async () => {
    const [r, w] = fifo(dir, 'stall');
    try {
      const s = new LogStream({ fd: w, maxPendingBytes: 4096 });
      // 2000 lines of 113 bytes, a few at a time, while nothing reads: the
      // pipe (64 KiB) fills, a write blocks, 4 KiB of lines wait, the rest drop.
      const line = `${JSON.stringify({ pad: 'y'.repeat(100) })}\n`;
      for (let i = 0; i < 2000; i++) {
        s.write(line);
        if (i % 20 === 19) await new Promise((res) => setTimeout(res, 2)); // 2.2 KiB a turn: under the cap until the pipe is full
      }
      await new Promise((res) => setTimeout(res, 50));
      expect(s.busy).toBe(true);
      const dropped = s.dropped;
      expect(dropped).toBeGreaterThan(2000 - (64 << 10) / line.length - 4096 / line.length - 10);
      // Read it all out, then log once more: a log-lines-dropped line comes first.
      let got = '';
      const until = Date.now() + 5000;
      while (Date.now() < until) {
        got += readAvailable(r);
        if (!s.busy) break;
        await new Promise((res) => setTimeout(res, 5));
      }
      s.write('{"after":1}\n');
      expect(await s.drain(5000)).toBe(true);
      got += readAvailable(r);
      const lines = got.trim().split('\n');
      expect(lines.slice(0, -2).filter((l) => `${l}\n` !== line)).toEqual([]);
      expect(lines.length - 2 + dropped).toBe(2000);
      const note = JSON.parse(lines.at(-2) as string) as Record<string, unknown>;
      expect(note).toMatchObject({ event: 'log-lines-dropped', dropped, level: 40 });
      expect(lines.at(-1)).toBe('{"after":1}');
    } finally {
      closeSync(r); // a writer still blocked gets EPIPE and lets go
      closeSync(w);
    }
  });
});

/** SIGTERM, then the exit code and how long it took, or SIGKILL and a note when it is still running after `limitMs`. */
async function terminate(d: Daemon, limitMs = 15_000): Promise<{ code: number | null | string; ms: number }> {
  const t0 = Date.now();
  d.proc.kill('SIGTERM');
  const code = await Promise.race([
    new Promise<number | null>((res) => d.proc.once('exit', (c) => res(c))),
    new Promise<string>((res) => setTimeout(() => res(`still running after ${limitMs} ms`), limitMs)),
  ]);
  if (typeof code === 'string') d.proc.kill('SIGKILL');
  return { code, ms: Date.now() - t0 };
}

describe('daemon with a dead log reader', () => {
  let dir: string;
  beforeAll(() => {
    dir = tempDir('dmr-logdead-');
  });
  afterAll(() => cleanup(dir));

  it('stops on SIGTERM in bounded time after its stdout reader has gone, and says on stderr that logging ended', async () => {
    const main = join(dir, 'main.img');
    writeFileSync(main, '');
    truncateSync(main, 16 << 20);
    const d = await startDaemon(dir);
    const add = await ctl(d.sock, 'add', 'd', '--main', main, '--spare-tail', '4M', '--format', '--nbd-unix', join(dir, 'd.nbd'));
    expect(add.code, add.stderr).toBe(0);
    await d.waitLog((l) => l.event === 'added' && l.device === 'd');
    d.proc.stdout?.destroy(); // the log reader dies: the daemon's next line meets EPIPE
    const { code, ms } = await terminate(d);
    await new Promise((res) => { // stderr read to its end (bounded)
      const err = d.proc.stderr;
      if (err === null || err.readableEnded || err.destroyed) return res(null);
      err.once('close', res);
      setTimeout(res, 2000);
    });
    console.log(`[log output] daemon exit ${String(code)} ${ms} ms after SIGTERM with its log reader gone; stderr: ${d.stderr.trim()}`);
    expect(code).toBe(0);
    expect(d.stderr).toMatch(/log output \(fd 1\) failed with EPIPE/);
  }, 30_000);

  it('keeps serving while nobody reads its log, and still stops on SIGTERM in bounded time (exit code 0)', async () => {
    const d = await startDaemon(dir, { stateDir: join(dir, 'state2'), sock: join(dir, 'run2.sock') });
    d.proc.stdout?.pause(); // the reader stops reading: the pipe fills and a log write blocks
    // Each failed request logs a line: 3000 of them are far more than the pipe holds.
    const n = 3000;
    const reqs = Array.from({ length: n }, (_, i) => `${JSON.stringify({ id: i, cmd: 'status', args: { name: `missing-${i}` } })}\n`).join('');
    const answers = await raw(d.sock, reqs, n, 60_000);
    expect(answers).toHaveLength(n);
    expect(answers.every((a) => a.ok === false)).toBe(true);
    const { code, ms } = await terminate(d);
    console.log(`[log output] ${n} requests answered with the log reader stalled; exit ${String(code)} ${ms} ms after SIGTERM`);
    expect(code).toBe(0);
    // It waited its 2 s for the blocked log write before leaving: the stall was real.
    expect(ms).toBeGreaterThanOrEqual(1900);
    d.proc.stdout?.destroy();
  }, 90_000);
});
