/**
 * Hung and failing devices through the daemon (issue 5): one daemon serves a
 * healthy device `ok` (plain files) while, one after the other, a victim
 * device is added on fault disks (tests/helpers/faultdisk.ts) and hit by one
 * fault:
 *
 * - the spare hangs (a write that needs a remap);
 * - the main hangs (a read);
 * - the spare fails every write (data and metadata);
 * - the spare is full (more bad blocks than spare blocks);
 * - the main disappears: its nbdkit is SIGKILLed behind nbdfuse;
 * - the main disappears: its FUSE mount is force-unmounted.
 *
 * Each must give the client an error (never a hang past the bound), a log
 * line naming the device, the block (or offset) and the errno, status
 * counts that say what happened, a removal within its deadline + 1 s, and
 * no crash. A vanished main must fail the device without remapping
 * anything (no remap storm: remaps and metadata commits are counted over a
 * burst of 200 writes). Throughout, a libnbd client (nbd_client.py churn)
 * writes, reads back and flushes on `ok`; during every scenario it must make
 * progress, see no error and no wrong data, and no request of it may take
 * longer than HEALTHY_MAX_MS; at the end every block it wrote still holds
 * its last write.
 *
 *   npx tsc -p . && npx vitest run tests/reliability/fault-matrix.test.ts
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cleanupAll, makeTempDir, requireTools, startFaultDisk, SYSTEM_PYTHON, type FaultDisk } from '../helpers/faultdisk.js';
import { request, startDaemon, type Daemon, type LogLine } from '../daemon/helpers.js';

requireTools('nbdkit', 'nbdkit-python', 'nbdfuse', 'fusermount3', '/dev/fuse', 'umount', SYSTEM_PYTHON);

const CLIENT = new URL('./nbd_client.py', import.meta.url).pathname;
const BS = 4096;
const HEALTHY_BLOCKS = 2048;
/** Deadline given to each removal; it must answer within this + REMOVE_SLACK_MS. */
const REMOVE_DEADLINE_MS = 2000;
const REMOVE_SLACK_MS = 1000;
/** Metadata timeout of the victims: bounds a remap on a hung spare. */
const META_TIMEOUT_MS = 1000;
/** No request on the healthy device may take longer than this while a victim is faulted. */
const HEALTHY_MAX_MS = 1500;

interface Status {
  state: string; remappedBlocks: number; pendingBlocks: number; readErrors: number; writeErrors: number;
  spareBlocksUsed: number; spareBlocksTotal: number; spareExhausted: boolean; metadataSeq: number;
  quarantinedSpareBlocks: number; badSpareBlocks: number; failReason: string | null; inFlight: number;
}

interface OpResult { ok: boolean; errno: string; ms: number; message: string; line: string }

/** One request through nbd_client.py op: resolves with its outcome (the client prints one line). */
function nbdOp(uri: string, op: string, offset: number, length: number, timeoutMs = 30_000): Promise<OpResult> {
  return new Promise((resolve, reject) => {
    const p = spawn(SYSTEM_PYTHON, [CLIENT, 'op', uri, op, String(offset), String(length)], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    p.stdout.setEncoding('utf8').on('data', (c: string) => { out += c; });
    p.stderr.setEncoding('utf8').on('data', (c: string) => { err += c; });
    const t = setTimeout(() => { p.kill('SIGKILL'); reject(new Error(`nbd op ${op} ${offset} did not answer within ${timeoutMs} ms`)); }, timeoutMs);
    p.on('close', (code) => {
      clearTimeout(t);
      const line = out.trim().split('\n').pop() ?? '';
      const f = line.split(' ');
      if (code !== 0 || line === '') { reject(new Error(`nbd op ${op} exited ${code}: ${out}${err}`)); return; }
      if (f[0] === 'OK') resolve({ ok: true, errno: '', ms: Number(f[1]), message: '', line });
      else if (f[0] === 'ERR') resolve({ ok: false, errno: f[1], ms: Number(f[2]), message: f.slice(3).join(' '), line });
      else if (f[0] === 'BURST') resolve({ ok: f[2] === '{}', errno: f[2], ms: Number(f[3]), message: `${f[1]} ok; ${f.slice(4).join(' ')}`, line });
      else reject(new Error(`nbd op ${op}: unexpected output ${out}${err}`));
    });
  });
}

/** The healthy device's workload, read from the client's progress lines. */
class Churn {
  ops = 0;
  errors = 0;
  mismatches = 0;
  /** [time, max latency of the window] per progress line. */
  readonly windows: Array<[number, number]> = [];
  done?: { ops: number; writes: number; blocksVerified: number; errors: number; mismatches: number; maxLatencyMs: number; firstErrors: string[] };
  private readonly proc: ChildProcess;
  readonly exited: Promise<number | null>;
  private out = '';
  stderr = '';
  private readyResolve!: () => void;
  readonly ready = new Promise<void>((r) => { this.readyResolve = r; });

  constructor(uri: string, private readonly stopFile: string) {
    this.proc = spawn(SYSTEM_PYTHON, [CLIENT, 'churn', uri, String(HEALTHY_BLOCKS), '4242', stopFile], { stdio: ['ignore', 'pipe', 'pipe'] });
    this.proc.stderr?.setEncoding('utf8').on('data', (c: string) => { this.stderr += c; });
    this.proc.stdout?.setEncoding('utf8').on('data', (c: string) => {
      this.out += c;
      for (let nl = this.out.indexOf('\n'); nl >= 0; nl = this.out.indexOf('\n')) {
        const line = this.out.slice(0, nl);
        this.out = this.out.slice(nl + 1);
        const f = line.split(' ');
        if (f[0] === 'READY') this.readyResolve();
        else if (f[0] === 'P') {
          this.ops = Number(f[1]);
          this.errors = Number(f[2]);
          this.mismatches = Number(f[3]);
          this.windows.push([Date.now(), Number(f[4])]);
        } else if (f[0] === 'DONE') this.done = JSON.parse(line.slice(5)) as Churn['done'];
      }
    });
    this.exited = new Promise((res) => this.proc.on('close', (code) => res(code)));
  }

  mark(): { ops: number; t: number } {
    return { ops: this.ops, t: Date.now() };
  }

  /** Ops done and the worst latency seen since `m` (waits for one more progress line first). */
  async since(m: { ops: number; t: number }): Promise<{ ops: number; maxMs: number }> {
    const n = this.windows.length;
    for (let i = 0; i < 50 && this.windows.length === n; i++) await sleep(20);
    const maxMs = Math.max(0, ...this.windows.filter(([t]) => t >= m.t).map(([, ms]) => ms));
    return { ops: this.ops - m.ops, maxMs };
  }

  async stop(): Promise<void> {
    writeFileSync(this.stopFile, '');
    const code = await Promise.race([this.exited, sleep(60_000).then(() => 'timeout' as const)]);
    if (code !== 0) throw new Error(`churn client: ${String(code)} ${this.stderr}`);
  }

  kill(): void {
    if (this.proc.exitCode === null) this.proc.kill('SIGKILL');
  }
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function file(path: string, bytes: number): string {
  writeFileSync(path, '');
  truncateSync(path, bytes);
  return path;
}

describe('hung and failing devices through the daemon, beside a healthy device', () => {
  let dir: string;
  let d: Daemon;
  let churn: Churn;
  const figures: string[] = [];

  beforeAll(async () => {
    dir = await makeTempDir('dmr-faultmx');
    d = await startDaemon(dir);
    const add = await request(d.sock, 'add', {
      name: 'ok', main: file(join(dir, 'ok-main.img'), 16 << 20), spare: file(join(dir, 'ok-spare.img'), 4 << 20),
      format: true, nbdUnix: join(dir, 'ok.nbd'),
    });
    expect(add.ok, JSON.stringify(add)).toBe(true);
    churn = new Churn(`nbd+unix:///ok?socket=${join(dir, 'ok.nbd')}`, join(dir, 'churn.stop'));
    await churn.ready;
  });

  afterAll(async () => {
    churn?.kill();
    if (d !== undefined) await d.stop('SIGKILL');
    await cleanupAll();
  });

  async function status(name: string): Promise<Status> {
    const r = await request(d.sock, 'status', { name });
    expect(r.ok, JSON.stringify(r)).toBe(true);
    return r.result as Status;
  }

  async function addVictim(name: string, main: string, spare: string): Promise<string> {
    const sock = join(dir, `${name}.nbd`);
    const r = await request(d.sock, 'add', { name, main, spare, format: true, nbdUnix: sock, metadataTimeoutMs: META_TIMEOUT_MS });
    expect(r.ok, JSON.stringify(r)).toBe(true);
    return `nbd+unix:///${name}?socket=${sock}`;
  }

  /** Removes a victim with REMOVE_DEADLINE_MS and checks the bound; returns the report and the wall time. */
  async function removeBounded(name: string): Promise<{ wall: number; rep: Record<string, unknown> }> {
    const t0 = Date.now();
    const rm = await request(d.sock, 'remove', { name, timeoutMs: REMOVE_DEADLINE_MS });
    const wall = Date.now() - t0;
    expect(rm.ok, JSON.stringify(rm)).toBe(true);
    expect(wall, `${name}: removal took ${wall} ms`).toBeLessThanOrEqual(REMOVE_DEADLINE_MS + REMOVE_SLACK_MS);
    const list = (await request(d.sock, 'list')).result as Array<{ name: string }>;
    expect(list.map((x) => x.name)).toEqual(['ok']);
    return { wall, rep: rm.result as Record<string, unknown> };
  }

  /** Log lines of a device at warn or above. */
  function warnings(name: string): LogLine[] {
    return d.logs.filter((l) => l.device === name && l.level >= 40);
  }

  /** The daemon is alive and the healthy device did its work during the scenario, unharmed. */
  async function healthyThrough(m: { ops: number; t: number }, what: string): Promise<string> {
    expect(d.proc.exitCode, `daemon exited during ${what}: ${d.stderr}`).toBeNull();
    expect(d.proc.signalCode).toBeNull();
    const s = await churn.since(m);
    expect(churn.errors, `healthy device: errors during ${what}`).toBe(0);
    expect(churn.mismatches, `healthy device: wrong data during ${what}`).toBe(0);
    expect(s.ops, `healthy device made no progress during ${what}`).toBeGreaterThanOrEqual(30);
    expect(s.maxMs, `healthy device: a request took ${s.maxMs} ms during ${what}`).toBeLessThan(HEALTHY_MAX_MS);
    const ok = await status('ok');
    expect(ok).toMatchObject({ state: 'running', readErrors: 0, writeErrors: 0, remappedBlocks: 0 });
    expect(d.logs.filter((l) => l.device === 'ok' && l.level >= 40)).toEqual([]);
    expect(d.logs.filter((l) => l.level >= 60)).toEqual([]);
    return `healthy ok: ${s.ops} ops, max ${s.maxMs.toFixed(1)} ms`;
  }

  it('the spare hangs: the write that needs a remap fails EIO after the metadata timeout; reads of main go on; bounded removal', async () => {
    const m = churn.mark();
    const main = await startFaultDisk({ dir, name: 'sh-main', sizeBytes: 16 << 20 });
    const spare = await startFaultDisk({ dir, name: 'sh-spare', sizeBytes: 4 << 20 });
    const uri = await addVictim('sh', main.path, spare.path);
    await main.setBad({ write: [[100 * BS, BS]] });
    const seq0 = (await status('sh')).metadataSeq;
    await spare.setHang(true);
    const w = await nbdOp(uri, 'write', 100 * BS, BS);
    expect(w.line).toMatch(/^ERR EIO /);
    expect(w.ms).toBeGreaterThanOrEqual(META_TIMEOUT_MS - 100);
    expect(w.ms).toBeLessThan(META_TIMEOUT_MS + 2000);
    const line = await d.waitLog((l) => l.device === 'sh' && l.level >= 40 && l.msg === 'request failed');
    expect(line).toMatchObject({ device: 'sh', errno: 'EIO', offset: 100 * BS });
    expect(String(line?.err)).toMatch(/spare data write timed out after 1000 ms.*block 100/);
    // Main is still served: a read of a block that is not on the spare answers.
    const r = await nbdOp(uri, 'read', 0, BS);
    expect(r.line).toMatch(/^OK /);
    const s = await status('sh');
    expect(s).toMatchObject({ state: 'running', remappedBlocks: 0, quarantinedSpareBlocks: 1, metadataSeq: seq0 });
    expect(s.writeErrors).toBeGreaterThanOrEqual(1);
    const { wall, rep } = await removeBounded('sh');
    await spare.setHang(false);
    await main.stop();
    await spare.stop();
    figures.push(`spare hangs      | write ${w.errno} after ${w.ms} ms ("${String(line?.err)}") | remapped 0, quarantined 1 | remove ${wall} ms (${(rep.cancelled as string[]).join('; ') || 'nothing cancelled'}) | ${await healthyThrough(m, 'the spare hang')}`);
  }, 60_000);

  it('the main hangs: the stuck read is answered ESHUTDOWN at removal, which keeps its deadline; the log names the request', async () => {
    const m = churn.mark();
    const main = await startFaultDisk({ dir, name: 'mh-main', sizeBytes: 16 << 20 });
    const uri = await addVictim('mh', main.path, file(join(dir, 'mh-spare.img'), 4 << 20));
    await main.setHang(true);
    const stuck = nbdOp(uri, 'read', 7 * BS, BS);
    await main.waitBlocked(1);
    await sleep(1500); // stuck for longer than the healthy device's latency bound
    expect((await status('mh')).inFlight).toBeGreaterThanOrEqual(1);
    const { wall, rep } = await removeBounded('mh');
    expect(rep.requestsAbandoned).toBeGreaterThanOrEqual(1);
    expect((rep.cancelled as string[]).join('; ')).toMatch(/request\(s\) abandoned/);
    const r = await stuck;
    expect(r.line).toMatch(/^ERR ESHUTDOWN /);
    const line = await d.waitLog((l) => l.device === 'mh' && l.level >= 40 && l.msg === 'request failed');
    expect(line).toMatchObject({ device: 'mh', cmd: 'read', offset: 7 * BS, errno: 'ESHUTDOWN' });
    const removed = await d.waitLog((l) => l.device === 'mh' && l.event === 'removed');
    expect(removed).toMatchObject({ requestsAbandoned: rep.requestsAbandoned });
    await main.setHang(false);
    await main.stop();
    figures.push(`main hangs       | read ${r.errno} after ${r.ms} ms, at removal | log "request failed" read offset ${7 * BS} ESHUTDOWN | remove ${wall} ms (${(rep.cancelled as string[]).join('; ')}) | ${await healthyThrough(m, 'the main hang')}`);
  }, 60_000);

  it('the spare fails every write: the remap gives up after a bounded number of spare blocks, EIO, nothing remapped; other blocks are served', async () => {
    const m = churn.mark();
    const main = await startFaultDisk({ dir, name: 'sf-main', sizeBytes: 16 << 20 });
    const spare = await startFaultDisk({ dir, name: 'sf-spare', sizeBytes: 4 << 20 });
    const uri = await addVictim('sf', main.path, spare.path);
    await main.setBad({ write: [[200 * BS, BS], [300 * BS, BS]] });
    await spare.setBad({ write: [[0, 4 << 20]] });
    const before = await spare.stats();
    const w1 = await nbdOp(uri, 'write', 200 * BS, BS);
    const w2 = await nbdOp(uri, 'write', 300 * BS, BS);
    expect(w1.line).toMatch(/^ERR EIO /);
    expect(w2.line).toMatch(/^ERR EIO /);
    const after = await spare.stats();
    const spareWrites = after.writes - before.writes;
    // 5 spare blocks per remap (the first try and 4 more), nothing else
    expect(spareWrites).toBeGreaterThanOrEqual(2);
    expect(spareWrites).toBeLessThanOrEqual(10);
    // the second write's failure is logged after every spare-bad line before it
    await d.waitLogs((l) => l.device === 'sf' && l.level >= 40 && l.msg === 'request failed', 2);
    const bad = warnings('sf').filter((l) => l.event === 'spare-bad');
    expect(bad.length).toBe(spareWrites);
    expect(bad[0]).toMatchObject({ device: 'sf', block: 200, errno: 'EIO' });
    const failed = warnings('sf').filter((l) => l.msg === 'request failed');
    expect(failed.map((l) => l.offset)).toEqual([200 * BS, 300 * BS]);
    expect(String(failed[0].err)).toMatch(/spare write failed \d+ times in a row.*block 200.*EIO/);
    // a good block is still written and read back, and reads of main go on
    const good = await nbdOp(uri, 'write', 10 * BS, BS);
    expect(good.line).toMatch(/^OK /);
    expect((await nbdOp(uri, 'read', 10 * BS, BS)).line).toMatch(/^OK /);
    const s = await status('sf');
    expect(s).toMatchObject({ state: 'running', remappedBlocks: 0 });
    expect(s.writeErrors).toBeGreaterThanOrEqual(2);
    const { wall, rep } = await removeBounded('sf');
    await main.stop();
    await spare.stop();
    figures.push(`spare fails      | writes ${w1.errno}/${w2.errno} ("${String(failed[0].err)}") | ${spareWrites} spare writes tried, ${bad.length} spare-bad lines, remapped 0 | remove ${wall} ms (synced ${String(rep.synced)}) | ${await healthyThrough(m, 'the failing spare')}`);
  }, 60_000);

  it('the spare is full: remaps until the last spare block, then ENOSPC, logged once; good blocks and remapped data still served', async () => {
    const m = churn.mark();
    const main = await startFaultDisk({ dir, name: 'sx-main', sizeBytes: 16 << 20 });
    const uri = await addVictim('sx', main.path, file(join(dir, 'sx-spare.img'), 1 << 20));
    const total = (await status('sx')).spareBlocksTotal;
    expect(total).toBeGreaterThan(0);
    const first = 1000;
    await main.setBad({ write: [[first * BS, (total + 10) * BS]] });
    const burst = await nbdOp(uri, 'writes', first * BS, total + 10, 120_000);
    expect(burst.line, burst.line).toMatch(new RegExp(`^BURST ${total} \\{"ENOSPC":10\\} `));
    const s = await status('sx');
    expect(s).toMatchObject({ state: 'running', remappedBlocks: total, spareBlocksUsed: total, spareExhausted: true });
    await d.waitLogs((l) => l.device === 'sx' && l.level >= 40 && l.msg === 'request failed', 10);
    const exhausted = warnings('sx').filter((l) => l.event === 'spare-exhausted');
    expect(exhausted.length).toBe(1);
    expect(exhausted[0]).toMatchObject({ device: 'sx', block: first + total, spareBlocksTotal: total });
    const failed = warnings('sx').filter((l) => l.msg === 'request failed');
    expect(failed.length).toBe(10);
    expect(failed[0]).toMatchObject({ errno: 'ENOSPC', offset: (first + total) * BS });
    expect(String(failed[0].err)).toMatch(new RegExp(`spare exhausted.*block ${first + total}`));
    expect((await nbdOp(uri, 'write', 10 * BS, BS)).line).toMatch(/^OK /);
    expect((await nbdOp(uri, 'read', first * BS, BS)).line).toMatch(/^OK /);
    const { wall, rep } = await removeBounded('sx');
    expect(rep.synced).toBe(true);
    await main.stop();
    figures.push(`spare full       | ${total} remapped, then ${burst.errno} ("${String(failed[0].err)}") | 1 spare-exhausted line | remove ${wall} ms (synced true) | ${await healthyThrough(m, 'the full spare')}`);
  }, 120_000);

  for (const how of ['nbdkit killed', 'FUSE unmounted'] as const) {
    it(`the main disappears (${how}): the device fails with the errno named, no remap and no metadata commit over 200 writes; bounded removal`, async () => {
      const m = churn.mark();
      const name = how === 'nbdkit killed' ? 'gk' : 'gu';
      const main = await startFaultDisk({ dir, name: `${name}-main`, sizeBytes: 16 << 20 });
      const spareFile = file(join(dir, `${name}-spare.img`), 4 << 20);
      const uri = await addVictim(name, main.path, spareFile);
      expect((await nbdOp(uri, 'write', 0, BS)).line).toMatch(/^OK /);
      const s0 = await status(name);
      if (how === 'nbdkit killed') await main.kill();
      else execFileSync('umount', ['-f', '-l', main.mountDir], { stdio: 'pipe' });
      const w = await nbdOp(uri, 'write', 50 * BS, BS);
      expect(w.ok).toBe(false);
      const burst = await nbdOp(uri, 'writes', 60 * BS, 200, 60_000);
      expect(burst.line).toMatch(/^BURST 0 /);
      const rd = await nbdOp(uri, 'read', 0, BS);
      expect(rd.ok).toBe(false);
      const s = await status(name);
      expect(s.state).toBe('failed');
      expect(s.failReason).toMatch(new RegExp(`main ${main.path} is unreachable \\((ENOTCONN|ECONNABORTED|ENODEV|ENXIO|ESHUTDOWN|EPIPE|ECONNRESET)\\)`));
      // no remap storm: nothing remapped, no metadata commit
      expect(s).toMatchObject({ remappedBlocks: 0, pendingBlocks: 0, spareBlocksUsed: 0, metadataSeq: s0.metadataSeq });
      // the last request (the read) has failed in the log too, so every line before it is here
      await d.waitLog((l) => l.device === name && l.msg === 'request failed' && l.cmd === 'read');
      expect(d.logs.filter((l) => l.device === name && (l.event === 'remap' || l.event === 'read-error' || l.event === 'metadata-commit-failed'))).toEqual([]);
      const failedLine = d.logs.filter((l) => l.device === name && l.event === 'device-failed');
      expect(failedLine.length).toBe(1);
      const firstFailure = warnings(name).find((l) => l.msg === 'request failed');
      expect(firstFailure).toMatchObject({ device: name, offset: 50 * BS });
      expect(String(firstFailure?.hostErrno ?? firstFailure?.errno)).toMatch(/^E[A-Z]+$/);
      const { wall, rep } = await removeBounded(name);
      await main.stop();
      figures.push(`main gone (${how}) | write ${w.errno}, then ${burst.errno} over 200 writes, read ${rd.errno} | "${String(failedLine[0].reason)}"; remapped 0, metadata seq ${s0.metadataSeq} -> ${s.metadataSeq} | remove ${wall} ms (synced ${String(rep.synced)}) | ${await healthyThrough(m, `main gone (${how})`)}`);
    }, 60_000);
  }

  it('the healthy device kept every write through all of it; the daemon stops cleanly', async () => {
    await churn.stop();
    const r = churn.done;
    expect(r, churn.stderr).toBeDefined();
    expect(r?.errors).toBe(0);
    expect(r?.mismatches).toBe(0);
    expect(r?.blocksVerified).toBeGreaterThan(100);
    console.log(['fault matrix (scenario | client | log/status | removal | healthy device during it):', ...figures.map((f) => `  ${f}`),
      `  healthy device overall: ${r?.ops} ops, ${r?.writes} writes, ${r?.blocksVerified} blocks verified at the end, 0 errors, max latency ${r?.maxLatencyMs} ms`].join('\n'));
    expect(await d.stop('SIGTERM')).toBe(0);
  }, 90_000);
});
