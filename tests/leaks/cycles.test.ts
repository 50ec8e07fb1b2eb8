/**
 * Leak cycles (issue 5, "Leaks"; ARCHITECTURE.md "Lifecycle"): the compiled
 * daemon runs N add/remove cycles of one device on small temp files, exported
 * over a unix NBD socket, with a little I/O through a raw NBD client each
 * cycle. After warm-up cycles and again at the end, the daemon's fds,
 * threads (io_uring's own iou-* workers counted apart: they come and go),
 * io_uring instances, RSS, JS heap after a full GC and
 * process.getActiveResourcesInfo() are sampled from outside: /proc, and a
 * test-only preload (probe.cjs, through NODE_OPTIONS) that answers SIGUSR2.
 *
 *   DMR_LEAK_CYCLES=1000 npx vitest run tests/leaks/cycles.test.ts
 *
 * Default 300 cycles after 200 warm-up (~7 s). Needs `npm run build`.
 * DMR_LEAK_WARMUP, DMR_LEAK_NODE_OPTIONS, DMR_LEAK_GLIBC_TUNABLES: see below.
 * DMR_LEAK_ASAN=1: the daemon runs under ASan/LSan (scripts/asan.sh does it).
 * DMR_LEAK_NO_MEM_ASSERT=1: print the memory figures without asserting them.
 * DMR_LEAK_INJECT=fd|buffer (probe.cjs): a deliberate leak, to see it caught.
 * Figures and their meaning: docs/RELIABILITY.md.
 */
import { execFileSync } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, readFileSync, readdirSync, readlinkSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import * as net from 'node:net';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_OPTS_MAGIC, NBD_REP_MAGIC, NBD_SIMPLE_REPLY_MAGIC, NBD_CMD_FLAG_FUA,
  NbdCmd, NbdOpt, NbdRep, encodeInfoRequest, encodeOptionHeader, encodeRequestHeader,
} from '../../src/frontends/nbd/protocol.js';
import { cleanup, request, startDaemon, tempDir, type Daemon } from '../daemon/helpers.js';

const CYCLES = Number(process.env.DMR_LEAK_CYCLES ?? 300);
/** Cycles before the start sample: until then V8's JIT and heap and glibc's arenas are still growing to their working size. */
const WARMUP = Number(process.env.DMR_LEAK_WARMUP ?? 200);
/**
 * Extra node options for the daemon. The young generation is capped at 1 MiB
 * semi-spaces because V8 otherwise grows it (to 16 MiB semi-spaces) whenever
 * allocation is brisk: measured +25 MiB heapTotal and +50 MiB RSS over 500
 * uncapped cycles, going up and down, with external memory flat. With the cap
 * RSS flattens after ~200 cycles. DMR_LEAK_NODE_OPTIONS='' runs uncapped.
 */
const DAEMON_NODE_OPTIONS = process.env.DMR_LEAK_NODE_OPTIONS ?? '--max-semi-space-size=1';
/**
 * glibc's mmap threshold is dynamic: after the first large block is freed it
 * rises (up to 32 MiB), so later MiB-sized metadata and I/O buffers come from
 * the heap, and whether the top of the heap is trimmed back depends on what
 * lies above it: RSS then moved by up to +-11 MiB between samples. A fixed
 * 128 KiB threshold returns large blocks to the kernel at free, and RSS
 * follows live memory. DMR_LEAK_GLIBC_TUNABLES='' runs with glibc's default.
 */
const DAEMON_GLIBC_TUNABLES = process.env.DMR_LEAK_GLIBC_TUNABLES ?? 'glibc.malloc.mmap_threshold=131072';
const CHECKPOINTS = 10;
const MiB = 1024 * 1024;
const BLOCK = 4096;
const MAIN_BYTES = 16 * MiB;
const SPARE_TAIL = 4 * MiB;
const DATA_BLOCKS = (MAIN_BYTES - SPARE_TAIL) / BLOCK;
const PROBE = fileURLToPath(new URL('./probe.cjs', import.meta.url));
/*
 * Memory bounds, judged from the start sample (after warm-up) and, for the
 * slowly settling ones, over the second half only (the checkpoint at >= 50 %
 * of the cycles to the end): a leak grows linearly and shows in the second
 * half as much as in the first; JIT code and allocator high-water marks
 * level off.
 *  - external (ArrayBuffers, aligned I/O buffers; after GC and sweeping): was
 *    exactly flat. 1 MiB is < 4 KiB per cycle at 300 cycles: one leaked I/O
 *    buffer per cycle crosses it.
 *  - heapUsed after GC, second half: grew 0.14-0.23 MiB per second half
 *    (optimized code, feedback vectors: heap snapshot diff). A removed
 *    device kept reachable (engine, remap table, export, connection state)
 *    is tens of KiB: > 1 MiB over a 120-cycle half.
 *  - RSS (with the two daemon settings above): the floor (lowest of the
 *    checkpoints) of the second half against that of the first: measured
 *    < 0.5 MiB; 4 MiB leaves room for page-granular noise. Start to end:
 *    -8..+3 MiB measured (a sample can catch a transient 8 MiB bump), bound
 *    32 MiB. RSS is only a backstop: native leaks of unreachable memory are
 *    what LSan is for (DMR_LEAK_ASAN=1), leaked buffers show in external.
 */
const EXTERNAL_BOUND = MiB;
const HEAP_BOUND = MiB;
const RSS_HALF_BOUND = 4 * MiB;
const RSS_BOUND = 32 * MiB;

function end0<T>(xs: T[]): T {
  const x = xs[xs.length - 1];
  if (x === undefined) throw new Error('empty trace');
  return x;
}

// ------------------------------------------------------------ raw NBD client

class NbdClient {
  private buf: Buffer = Buffer.alloc(0);
  private wake: (() => void) | null = null;
  private ended = false;
  private handle = 1n;
  readonly sock: net.Socket;

  private constructor(path: string) {
    this.sock = net.connect({ path });
    this.sock.on('data', (d: Buffer) => {
      this.buf = this.buf.length === 0 ? d : Buffer.concat([this.buf, d]);
      this.wake?.();
    });
    this.sock.on('error', () => undefined);
    this.sock.on('close', () => {
      this.ended = true;
      this.wake?.();
    });
  }

  static async connect(path: string): Promise<NbdClient> {
    const c = new NbdClient(path);
    await once(c.sock, 'connect');
    const g = await c.read(18);
    if (g.readBigUInt64BE(8) !== NBD_OPTS_MAGIC) throw new Error('bad greeting');
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
    const go = encodeInfoRequest('', []);
    c.sock.write(Buffer.concat([flags, encodeOptionHeader(NbdOpt.GO, go.length), go]));
    for (;;) {
      const h = await c.read(20);
      if (h.readBigUInt64BE(0) !== NBD_REP_MAGIC) throw new Error('bad option reply');
      const type = h.readUInt32BE(12);
      await c.read(h.readUInt32BE(16));
      if (type === NbdRep.ACK) return c;
      if (type !== NbdRep.INFO) throw new Error(`NBD_OPT_GO refused: reply type ${type}`);
    }
  }

  private async read(n: number): Promise<Buffer> {
    const until = Date.now() + 5000;
    while (this.buf.length < n) {
      if (this.ended) throw new Error(`connection closed with ${this.buf.length}/${n} bytes`);
      if (Date.now() > until) throw new Error(`timeout waiting for ${n} bytes`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, 100);
        this.wake = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.wake = null;
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }

  /** One request, one simple reply; returns the NBD error and the read payload. */
  async cmd(type: number, offset: number, length: number, data?: Buffer, flags = 0): Promise<{ error: number; data: Buffer }> {
    const handle = this.handle++;
    const hdr = encodeRequestHeader({ flags, type, handle, offset, length });
    this.sock.write(data === undefined ? hdr : Buffer.concat([hdr, data]));
    const r = await this.read(16);
    if (r.readUInt32BE(0) !== NBD_SIMPLE_REPLY_MAGIC || r.readBigUInt64BE(8) !== handle) throw new Error('bad reply');
    const error = r.readUInt32BE(4);
    const payload = type === NbdCmd.READ && error === 0 ? await this.read(length) : Buffer.alloc(0);
    return { error, data: payload };
  }

  async disconnect(): Promise<void> {
    this.sock.end(encodeRequestHeader({ flags: 0, type: NbdCmd.DISC, handle: 0n, offset: 0, length: 0 }));
    if (!this.ended) await once(this.sock, 'close');
  }

  destroy(): void {
    this.sock.destroy();
  }
}

// ------------------------------------------------------------------ sampling

interface Sample {
  fds: number;
  rings: number;
  threads: number;
  iouWorkers: number;
  rssKiB: number;
  /** RssAnon of /proc/PID/status: anonymous memory (malloc, V8 heap, rings), without mapped files. */
  anonKiB: number;
  heapUsed: number;
  /** process.memoryUsage().heapTotal: the V8 heap's committed pages. */
  heapTotal: number;
  /** process.memoryUsage().external and .arrayBuffers (bytes), after the GC. */
  external: number;
  arrayBuffers: number;
  resources: string[];
}

function procSample(pid: number): Omit<Sample, 'heapUsed' | 'heapTotal' | 'external' | 'arrayBuffers' | 'resources'> {
  let fds = 0;
  let rings = 0;
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    fds++;
    try {
      if (readlinkSync(`/proc/${pid}/fd/${fd}`).includes('io_uring')) rings++;
    } catch {
      // closed meanwhile
    }
  }
  let threads = 0;
  let iouWorkers = 0;
  for (const t of readdirSync(`/proc/${pid}/task`)) {
    try {
      if (readFileSync(`/proc/${pid}/task/${t}/comm`, 'utf8').startsWith('iou-')) iouWorkers++;
      else threads++;
    } catch {
      // exited meanwhile
    }
  }
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kib = (key: string): number => Number(new RegExp(`${key}:\\s+(\\d+) kB`).exec(status)?.[1] ?? -1);
  return { fds, rings, threads, iouWorkers, rssKiB: kib('VmRSS'), anonKiB: kib('RssAnon') };
}

interface ProbeSnap { seq: number; resources: string[]; heapUsed: number; heapTotal: number; external: number; arrayBuffers: number }

async function probe(pid: number, out: string): Promise<ProbeSnap> {
  const before = existsSync(out) ? (JSON.parse(readFileSync(out, 'utf8')) as ProbeSnap).seq : 0;
  process.kill(pid, 'SIGUSR2');
  const until = Date.now() + 5000;
  for (;;) {
    if (existsSync(out)) {
      const s = JSON.parse(readFileSync(out, 'utf8')) as ProbeSnap;
      if (s.seq > before) return s;
    }
    if (Date.now() > until) throw new Error('probe did not answer SIGUSR2');
    await new Promise((r) => setTimeout(r, 10));
  }
}

async function sample(pid: number, out: string): Promise<Sample> {
  const p = await probe(pid, out); // full GC first, then /proc
  return { ...procSample(pid), heapUsed: p.heapUsed, heapTotal: p.heapTotal, external: p.external, arrayBuffers: p.arrayBuffers, resources: [...p.resources].sort() };
}

/** Counts of each resource type, e.g. {PipeWrap: 2, Timeout: 1}. */
function tally(rs: string[]): Record<string, number> {
  const t: Record<string, number> = {};
  for (const r of rs) t[r] = (t[r] ?? 0) + 1;
  return t;
}

function fmt(s: Sample): string {
  return `fds=${s.fds} rings=${s.rings} threads=${s.threads} iou-workers=${s.iouWorkers} ` +
    `rss=${(s.rssKiB / 1024).toFixed(1)}MiB anon=${(s.anonKiB / 1024).toFixed(1)}MiB heapUsed=${(s.heapUsed / MiB).toFixed(2)}MiB ` +
    `external=${(s.external / MiB).toFixed(2)}MiB arrayBuffers=${(s.arrayBuffers / MiB).toFixed(2)}MiB ` +
    `resources=${JSON.stringify(tally(s.resources))}`;
}

// ------------------------------------------- optional: the daemon under LSan

/**
 * DMR_LEAK_ASAN=1: the daemon runs with the ASan/LSan addon that
 * `bash scripts/asan.sh --build` leaves in build-asan/, libasan preloaded and
 * reports written to DIR/asan.PID (log_path), checked after the daemon stops.
 * (The fd/thread/RSS figures are then those of an instrumented process.)
 */
const ASAN = process.env.DMR_LEAK_ASAN === '1';
const ROOT = fileURLToPath(new URL('../../', import.meta.url));

function asanEnv(dir: string): Record<string, string> {
  if (!ASAN) return {};
  const addon = join(ROOT, 'build-asan', 'build', 'Release', 'dm_remapd.node');
  if (!existsSync(addon)) throw new Error(`DMR_LEAK_ASAN=1: ${addon} missing (bash scripts/asan.sh --build)`);
  const lib = execFileSync('gcc', ['-print-file-name=libasan.so'], { encoding: 'utf8' }).trim();
  return {
    DM_REMAPD_ADDON: addon,
    LD_PRELOAD: lib,
    ASAN_OPTIONS: `detect_leaks=1:exitcode=23:allocator_may_return_null=1:detect_odr_violation=0:log_path=${join(dir, 'asan')}`,
    LSAN_OPTIONS: `suppressions=${join(ROOT, 'tests', 'leaks', 'lsan-daemon.supp')}:print_suppressions=0`,
  };
}

// ------------------------------------------------------------------ the test

describe('leaks over add/remove cycles (daemon, NBD, I/O)', () => {
  let dir: string;
  let d: Daemon | undefined;
  beforeAll(() => {
    dir = tempDir('dmr-leaks-');
  });
  afterAll(async () => {
    await d?.stop();
    cleanup(dir);
  });

  it(`${CYCLES} cycles leave fds, threads, rings, resources flat and RSS bounded`, async () => {
    const main = join(dir, 'main.img');
    writeFileSync(main, '');
    truncateSync(main, MAIN_BYTES);
    const nbdPath = join(dir, 'd.nbd');
    const probeOut = join(dir, 'probe.json');
    d = await startDaemon(dir, {
      env: {
        NODE_OPTIONS: `--expose-gc ${DAEMON_NODE_OPTIONS} --require ${PROBE}`, DMR_LEAK_PROBE_OUT: probeOut,
        GLIBC_TUNABLES: DAEMON_GLIBC_TUNABLES,
        DMR_LEAK_HEAPSNAP_DIR: process.env.DMR_LEAK_HEAPSNAP_DIR ?? '',
        ...asanEnv(dir),
      },
    });
    const pid = d.proc.pid;
    if (pid === undefined) throw new Error('no daemon pid');
    const sock = d.sock;

    // Known content per block, to verify every read.
    const written = new Map<number, number>();
    let ios = 0;
    let remaps = 0;
    let heldAtRemove = 0;

    const daemon = d;
    /** A control request; an answer-less close (the daemon died?) throws with its stderr and last logs. */
    const req = async (cmd: string, args: Record<string, unknown>): Promise<Record<string, unknown>> => {
      const a = await request(sock, cmd, args) as Record<string, unknown> | undefined;
      if (a === undefined) {
        const tail = daemon.logs.slice(-5).map((l) => JSON.stringify(l)).join('\n');
        throw new Error(`no answer to ${cmd} (daemon exit ${daemon.proc.exitCode ?? daemon.proc.signalCode}); stderr: ${daemon.stderr}\nlogs:\n${tail}`);
      }
      return a;
    };

    const cycle = async (i: number): Promise<void> => {
      const add = await req('add', {
        name: 'leak', main, spareTailBytes: SPARE_TAIL, format: true, nbdUnix: nbdPath, metadataTimeoutMs: 2000,
      });
      if (add.ok !== true) throw new Error(`cycle ${i}: add failed: ${JSON.stringify(add)}`);
      const c = await NbdClient.connect(nbdPath);
      try {
        // A write (FUA on odd cycles), a read-back of it and of an older block, a flush.
        const blk = (i * 7919) % DATA_BLOCKS;
        const seed = (i % 250) + 1;
        const w = await c.cmd(NbdCmd.WRITE, blk * BLOCK, BLOCK, Buffer.alloc(BLOCK, seed), i % 2 === 1 ? NBD_CMD_FLAG_FUA : 0);
        if (w.error !== 0) throw new Error(`cycle ${i}: WRITE error ${w.error}`);
        written.set(blk, seed);
        const older = [...written.keys()][i % written.size];
        for (const b of [blk, older]) {
          const r = await c.cmd(NbdCmd.READ, b * BLOCK, BLOCK);
          if (r.error !== 0 || r.data[0] !== written.get(b) || r.data[BLOCK - 1] !== written.get(b)) {
            throw new Error(`cycle ${i}: block ${b} read back error=${r.error} byte=${r.data[0]} want ${written.get(b)}`);
          }
        }
        if ((await c.cmd(NbdCmd.FLUSH, 0, 0)).error !== 0) throw new Error(`cycle ${i}: FLUSH failed`);
        ios += 4;
        // Every 10th cycle a live remap of the block just written (the spare
        // write and metadata commit paths), and its data read through the remap.
        if (i % 10 === 0) {
          const rm = await req('remap', { name: 'leak', blocks: [blk] });
          const res = (rm.result as { results: Array<{ result: string }> } | undefined)?.results[0]?.result;
          if (rm.ok !== true || (res !== 'remapped' && res !== 'already-remapped')) throw new Error(`cycle ${i}: remap: ${JSON.stringify(rm)}`);
          if (res === 'remapped') remaps++;
          const r = await c.cmd(NbdCmd.READ, blk * BLOCK, BLOCK);
          if (r.error !== 0 || r.data[0] !== seed) throw new Error(`cycle ${i}: remapped block ${blk} reads ${r.data[0]}, want ${seed}`);
          ios++;
        }
        // Every 3rd cycle the client stays connected: removal must close it.
        if (i % 3 === 0) heldAtRemove++;
        else await c.disconnect();
        const rmv = await req('remove', { name: 'leak', timeoutMs: 2000 });
        const rep = rmv.result as { timedOut: boolean } | undefined;
        if (rmv.ok !== true || rep?.timedOut !== false) throw new Error(`cycle ${i}: remove: ${JSON.stringify(rmv)}`);
      } finally {
        c.destroy();
      }
    };

    const t0 = Date.now();
    for (let i = 0; i < WARMUP; i++) await cycle(i);
    await new Promise((r) => setTimeout(r, 300));
    const start = await sample(pid, probeOut);
    const t1 = Date.now();
    // Sampled at CHECKPOINTS checkpoints: a leak grows linearly, allocator and JIT
    // warm-up do not, so the second half is judged on its own (see the bounds above).
    const trace: Array<{ cycles: number; s: Sample }> = [{ cycles: 0, s: start }];
    const settled = async (): Promise<Sample> => {
      // Let the daemon finish closing the last control and NBD connections.
      let s = await sample(pid, probeOut);
      for (let k = 0; k < 20 && (s.fds !== start.fds || s.threads !== start.threads || s.rings !== start.rings); k++) {
        await new Promise((r) => setTimeout(r, 100));
        s = await sample(pid, probeOut);
      }
      return s;
    };
    for (let i = 0; i < CYCLES; i++) {
      await cycle(WARMUP + i);
      if ((i + 1) % Math.max(1, Math.floor(CYCLES / CHECKPOINTS)) === 0 && i + 1 < CYCLES) trace.push({ cycles: i + 1, s: await settled() });
    }
    const cyclesMs = Date.now() - t1;
    const end = await settled();
    trace.push({ cycles: CYCLES, s: end });
    const mid = trace.find((t) => t.cycles >= CYCLES / 2) ?? end0(trace);
    // RSS floor (lowest sample) of each half: transient bumps go up and come
    // back; a leak lifts the floor.
    const floor = (ts: typeof trace): number => Math.min(...ts.map((t) => t.s.rssKiB)) * 1024;
    const rssFloorFirst = floor(trace.filter((t) => t.cycles < mid.cycles));
    const rssFloorSecond = floor(trace.filter((t) => t.cycles >= mid.cycles));
    const statusAll = await req('list', {});

    const mib = (bytes: number): string => (bytes / MiB).toFixed(2);
    const lines = [
      `leak cycles: ${CYCLES} add/remove cycles after ${WARMUP} warm-up, ${ios} NBD I/Os verified, ${remaps} live remaps, ` +
        `${heldAtRemove} removals with a connected client; ${(cyclesMs / CYCLES).toFixed(1)} ms/cycle, ${((Date.now() - t0) / 1000).toFixed(1)} s total`,
      `  start: ${fmt(start)}`,
      `  end:   ${fmt(end)}`,
      '  cycles   fds rings threads iou-wrk   rss MiB  anon MiB  heap MiB heapTot MiB  ext MiB  arrayBuf MiB',
      ...trace.map(({ cycles, s: x }) =>
        `  ${String(cycles).padStart(6)} ${String(x.fds).padStart(5)} ${String(x.rings).padStart(5)} ${String(x.threads).padStart(7)} ` +
        `${String(x.iouWorkers).padStart(7)} ${mib(x.rssKiB * 1024).padStart(9)} ${mib(x.anonKiB * 1024).padStart(9)} ` +
        `${mib(x.heapUsed).padStart(9)} ${mib(x.heapTotal).padStart(11)} ${mib(x.external).padStart(8)} ${mib(x.arrayBuffers).padStart(13)}`),
      `  delta start->end: fds ${end.fds - start.fds}, rings ${end.rings - start.rings}, threads ${end.threads - start.threads}, ` +
        `rss ${mib((end.rssKiB - start.rssKiB) * 1024)} MiB, heapUsed ${mib(end.heapUsed - start.heapUsed)} MiB`,
      `  bounds: rss start->end ${mib((end.rssKiB - start.rssKiB) * 1024)} < ${mib(RSS_BOUND)} MiB, ` +
        `rss floor first half -> second half (from ${mid.cycles}) ${mib(rssFloorSecond - rssFloorFirst)} < ${mib(RSS_HALF_BOUND)} MiB, ` +
        `external start->end ${mib(end.external - start.external)} < ${mib(EXTERNAL_BOUND)} MiB, ` +
        `heapUsed second half (${mid.cycles}->${CYCLES}) ${mib(end.heapUsed - mid.s.heapUsed)} < ${mib(HEAP_BOUND)} MiB`,
    ];
    console.log(lines.join('\n'));

    if (ASAN) {
      const code = await d.stop();
      const reports = readdirSync(dir).filter((f) => f.startsWith('asan.'));
      for (const f of reports) console.log(`${f}:\n${readFileSync(join(dir, f), 'utf8')}`);
      console.log(`ASan/LSan daemon: exit ${code}, ${reports.length} report file(s)`);
      expect(reports).toEqual([]);
      expect(code).toBe(0);
    }
    expect(statusAll.ok).toBe(true);
    expect(statusAll.result).toEqual([]);
    expect(existsSync(nbdPath)).toBe(false);
    expect(statSync(main).size).toBe(MAIN_BYTES);
    for (const { s: x } of trace) {
      expect(x.fds).toBe(start.fds);
      expect(x.rings).toBe(0);
      expect(x.threads).toBe(start.threads);
      expect(x.resources).toEqual(start.resources);
    }
    // Under ASan, freed memory sits in its quarantine (256 MiB): RSS means nothing there.
    if (!ASAN && process.env.DMR_LEAK_NO_MEM_ASSERT !== '1') {
      expect((end.rssKiB - start.rssKiB) * 1024).toBeLessThan(RSS_BOUND);
      expect(rssFloorSecond - rssFloorFirst).toBeLessThan(RSS_HALF_BOUND);
      expect(Math.abs(end.external - start.external)).toBeLessThan(EXTERNAL_BOUND);
      expect(end.heapUsed - mid.s.heapUsed).toBeLessThan(HEAP_BOUND);
    }
  }, 60_000 + CYCLES * 500);
});
