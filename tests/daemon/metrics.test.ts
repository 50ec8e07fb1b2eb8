/**
 * Health and Prometheus metrics through the real daemon: a config enables
 * the metrics listener (TCP on 127.0.0.1, then a unix socket) and low health
 * thresholds; a device on a fault disk (nbdkit + nbdfuse) with a small spare
 * is written over a bad block through NBD (qemu-io), read over an unreadable
 * one (nbdsh), then its spare is filled by manual remaps. Scraped with curl
 * and with Node's fetch; every scrape goes through the strict text-format
 * parser (and promtool when installed). Health shows in the metrics,
 * `remapctl status` (human and --json) and the log (once per change, at
 * warn/error). A bad metrics config exits 2 naming the key; a listener that
 * cannot bind exits 1.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { statSync, truncateSync, writeFileSync, existsSync } from 'node:fs';
import { connect, createServer, type AddressInfo } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cleanupAll, makeTempDir, requireTools, startFaultDisk, type FaultDisk } from '../helpers/faultdisk.js';
import { parsePromText, sampleValue, type PromFamily } from '../helpers/prom-text.js';
import { run } from '../nbd/nbd-fixtures.js';
import { Rng } from '../fuzz/rng.js';
import { DAEMON, ctl, runNode, startDaemon, type Daemon } from './helpers.js';

requireTools('nbdkit', 'nbdkit-python', 'nbdfuse', 'fusermount3', '/dev/fuse', 'qemu-io', 'nbdsh', 'curl');

const SYS_ENV = { ...process.env, PATH: `/usr/bin:/bin:${process.env.PATH ?? ''}` };
const BS = 4096;
const H = 'dm_remapd_device_metadata_commit_duration_seconds';
const promtool = spawnSync('promtool', ['--version']).status === 0;

function check(text: string): Map<string, PromFamily> {
  const f = parsePromText(text);
  if (promtool) {
    const r = spawnSync('promtool', ['check', 'metrics'], { input: text, encoding: 'utf8' });
    expect(r.status, r.stdout + r.stderr).toBe(0);
  }
  return f;
}

async function scrape(url: string): Promise<Map<string, PromFamily>> {
  const r = await fetch(url);
  expect(r.status).toBe(200);
  expect(r.headers.get('content-type')).toBe('text/plain; version=0.0.4; charset=utf-8');
  return check(await r.text());
}

function curl(...args: string[]): { code: number | null; out: string } {
  const r = spawnSync('curl', ['-sS', '--max-time', '10', ...args], { encoding: 'utf8' });
  return { code: r.status, out: r.stdout + r.stderr };
}

async function writeConfig(dir: string, cfg: Record<string, unknown>): Promise<string> {
  const p = join(dir, `cfg-${Math.random().toString(36).slice(2)}.json`);
  writeFileSync(p, JSON.stringify(cfg));
  return p;
}

async function endpointOf(d: Daemon): Promise<string> {
  const l = await d.waitLog((x) => x.event === 'metrics-listening');
  return l.endpoint as string;
}

describe('health and metrics through the daemon', () => {
  let dir: string;
  let disk: FaultDisk | undefined;
  const daemons: Daemon[] = [];
  beforeAll(async () => {
    dir = await makeTempDir('dmr-metrics-');
    disk = await startFaultDisk({ dir, name: 'main', sizeBytes: 16 << 20 });
  });
  afterAll(async () => {
    for (const d of daemons) await d.stop();
    await cleanupAll();
  });

  it('counters, commit histogram and health move with a write error, a read error and a full spare', async () => {
    const fd = disk as FaultDisk;
    const spare = join(dir, 'spare.img');
    writeFileSync(spare, '');
    truncateSync(spare, 256 << 10); // 26 spare blocks
    const cfg = await writeConfig(dir, {
      metrics: { listen: '127.0.0.1:0' },
      health: { intervalMs: 100, windowMs: 600_000, degradedErrors: 1, failingErrors: 1000, degradedRemaps: 1, failingRemaps: 1000 },
    });
    const d = await startDaemon(dir, { args: ['--config', cfg] });
    daemons.push(d);
    const url = await endpointOf(d);
    expect(url).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/metrics$/);

    // No device yet: the daemon-level families only.
    let m = await scrape(url);
    expect(sampleValue(m, 'dm_remapd_up')).toBe(1);
    expect(sampleValue(m, 'dm_remapd_devices')).toBe(0);
    expect(m.has('dm_remapd_device_health')).toBe(false);

    const nbd = join(dir, 'fm.nbd');
    const uri = `nbd+unix:///fm?socket=${nbd}`;
    const add = await ctl(d.sock, 'add', 'fm', '--main', fd.path, '--spare', spare, '--format', '--nbd-unix', nbd);
    expect(add.code, add.stderr).toBe(0);
    m = await scrape(url);
    expect(sampleValue(m, 'dm_remapd_devices')).toBe(1);
    expect(sampleValue(m, 'dm_remapd_device_health', { device: 'fm', state: 'ok' })).toBe(1);
    expect(sampleValue(m, 'dm_remapd_device_spare_size_blocks', { device: 'fm' })).toBe(26);
    expect(sampleValue(m, 'dm_remapd_device_spare_used_blocks', { device: 'fm' })).toBe(0);
    expect(sampleValue(m, 'dm_remapd_device_errors_total', { device: 'fm', kind: 'write' })).toBe(0);
    const commits0 = sampleValue(m, `${H}_count`, { device: 'fm' });
    const writes0 = sampleValue(m, 'dm_remapd_device_requests_total', { device: 'fm', op: 'write' });

    // A write over a bad block: remapped, the client sees success.
    await fd.setBad({ write: [[100 * BS, BS]], read: [[300 * BS, BS]] });
    const w = await run('qemu-io', ['-f', 'raw', '-c', `write -P 0xa5 ${96 * BS} 32k`, '-c', 'flush', '-c', `read -P 0xa5 ${96 * BS} 32k`, uri]);
    expect(w.code, w.stdout + w.stderr).toBe(0);
    expect(w.stdout + w.stderr).not.toMatch(/Pattern verification failed|error|failed/i);
    m = await scrape(url);
    expect(sampleValue(m, 'dm_remapd_device_errors_total', { device: 'fm', kind: 'write' })).toBeGreaterThanOrEqual(1);
    expect(sampleValue(m, 'dm_remapd_device_remaps_total', { device: 'fm', kind: 'auto' })).toBe(1);
    expect(sampleValue(m, 'dm_remapd_device_remapped_blocks', { device: 'fm' })).toBe(1);
    expect(sampleValue(m, 'dm_remapd_device_spare_used_blocks', { device: 'fm' })).toBe(1);
    expect(sampleValue(m, 'dm_remapd_device_requests_total', { device: 'fm', op: 'write' })).toBeGreaterThan(writes0);
    expect(sampleValue(m, 'dm_remapd_device_requests_total', { device: 'fm', op: 'flush' })).toBeGreaterThanOrEqual(1);
    expect(sampleValue(m, 'dm_remapd_device_io_bytes_total', { device: 'fm', op: 'write' })).toBeGreaterThanOrEqual(32 * 1024);
    expect(sampleValue(m, 'dm_remapd_device_io_bytes_total', { device: 'fm', op: 'read' })).toBeGreaterThanOrEqual(32 * 1024);
    // The remap's commit is in the histogram (count up, a positive sum, +Inf = count).
    const commits1 = sampleValue(m, `${H}_count`, { device: 'fm' });
    expect(commits1).toBeGreaterThan(commits0);
    expect(sampleValue(m, `${H}_sum`, { device: 'fm' })).toBeGreaterThan(0);
    expect(sampleValue(m, `${H}_bucket`, { device: 'fm', le: '+Inf' })).toBe(commits1);
    expect(sampleValue(m, 'dm_remapd_device_health', { device: 'fm', state: 'degraded' })).toBe(1);
    expect(sampleValue(m, 'dm_remapd_device_health', { device: 'fm', state: 'ok' })).toBe(0);
    const deg = await d.waitLog((l) => l.event === 'health-changed' && l.health === 'degraded');
    expect(deg).toMatchObject({ level: 40, device: 'fm', previous: 'ok' });
    // The tracker may sample between the write error and its remap's commit:
    // the first degraded event names one or both.
    expect((deg.reasons as string[]).some((r) => r === '1 automatic remap(s) in the last 600 s' || r === '1 I/O error(s) in the last 600 s')).toBe(true);

    // remapctl status shows it, human and --json.
    const st = await ctl(d.sock, 'status');
    expect(st.stdout).toMatch(/^NAME +STATE +HEALTH +MODE/);
    expect(st.stdout).toMatch(/\nfm +running +degraded +direct /);
    const sj = JSON.parse((await ctl(d.sock, '--json', 'status', 'fm')).stdout) as { health: string; healthReasons: string[]; stats: Record<string, number> };
    expect(sj.health).toBe('degraded');
    expect(sj.healthReasons.length).toBeGreaterThan(0);
    expect(sj.stats).toMatchObject({ flushErrors: 0, spareErrors: 0, otherErrors: 0 });
    expect((await ctl(d.sock, 'status', 'fm')).stdout).toMatch(/^health: +degraded \(/m);

    // An unreadable block: EIO to the client, pending, a read error counted.
    const e = execFileSync('nbdsh', ['-u', uri, '-c',
      `import errno\ntry:\n    h.pread(${BS}, ${300 * BS})\n    print("read ok")\nexcept nbd.Error as e:\n    print(errno.errorcode.get(e.errnum, e.errnum))`],
    { encoding: 'utf8', timeout: 30_000, env: SYS_ENV }).trim();
    expect(e).toBe('EIO');
    m = await scrape(url);
    expect(sampleValue(m, 'dm_remapd_device_pending_blocks', { device: 'fm' })).toBe(1);
    expect(sampleValue(m, 'dm_remapd_device_errors_total', { device: 'fm', kind: 'read' })).toBeGreaterThanOrEqual(1);
    expect(sampleValue(m, `${H}_count`, { device: 'fm' })).toBeGreaterThan(commits1);

    // Fill the spare with manual remaps: spare-exhausted, logged once at error.
    const blocks = Array.from({ length: 25 }, (_, i) => String(1000 + i));
    const rm = await ctl(d.sock, 'remap', 'fm', ...blocks);
    expect(rm.code, rm.stdout + rm.stderr).toBe(0);
    m = await scrape(url);
    expect(sampleValue(m, 'dm_remapd_device_spare_used_blocks', { device: 'fm' })).toBe(26);
    expect(sampleValue(m, 'dm_remapd_device_remaps_total', { device: 'fm', kind: 'manual' })).toBe(25);
    expect(sampleValue(m, 'dm_remapd_device_health', { device: 'fm', state: 'spare-exhausted' })).toBe(1);
    for (const s of ['ok', 'degraded', 'failing']) expect(sampleValue(m, 'dm_remapd_device_health', { device: 'fm', state: s })).toBe(0);
    const ex = await d.waitLog((l) => l.event === 'health-changed' && l.health === 'spare-exhausted');
    expect(ex).toMatchObject({ level: 50, device: 'fm', previous: 'degraded' });
    // The timer keeps judging; one line per change, no repeats.
    await new Promise((r) => setTimeout(r, 400));
    expect(d.logs.filter((l) => l.event === 'health-changed' && l.device === 'fm').map((l) => l.health)).toEqual(['degraded', 'spare-exhausted']);
    expect((await ctl(d.sock, 'status')).stdout).toMatch(/\nfm +running +spare-exhausted /);

    // curl: headers, the same strict parse, 404 elsewhere, 405 for POST.
    const c = curl('-i', url);
    expect(c.code, c.out).toBe(0);
    expect(c.out).toMatch(/^HTTP\/1\.1 200 OK\r?$/m);
    expect(c.out).toMatch(/^Content-Type: text\/plain; version=0\.0\.4; charset=utf-8\r?$/mi);
    const body = curl(url);
    expect(sampleValue(check(body.out), 'dm_remapd_device_health', { device: 'fm', state: 'spare-exhausted' })).toBe(1);
    expect(curl('-o', '/dev/null', '-w', '%{http_code}', url.replace('/metrics', '/nope')).out).toBe('404');
    expect(curl('-o', '/dev/null', '-w', '%{http_code}', '-X', 'POST', url).out).toBe('405');

    // Removal drops the device's series (its tracker's timer is stopped: tests/daemon/health.test.ts).
    const rem = await ctl(d.sock, 'remove', 'fm');
    expect(rem.code, rem.stderr).toBe(0);
    m = await scrape(url);
    expect(sampleValue(m, 'dm_remapd_devices')).toBe(0);
    expect(m.has('dm_remapd_device_health')).toBe(false);
    expect(await d.stop()).toBe(0);
  });

  it('serves a unix socket with the configured mode, and removes it at stop', async () => {
    const sockPath = join(dir, 'm', 'metrics.sock');
    const cfg = await writeConfig(dir, { metrics: { listen: sockPath, socketMode: '0660' } });
    const d = await startDaemon(dir, { args: ['--config', cfg], sock: join(dir, 'run2', 'control.sock'), stateDir: join(dir, 'state2') });
    daemons.push(d);
    expect(await endpointOf(d)).toBe(`unix:${sockPath}`);
    expect(statSync(sockPath).mode & 0o777).toBe(0o660);
    const c = curl('--unix-socket', sockPath, 'http://localhost/metrics');
    expect(c.code, c.out).toBe(0);
    const m = check(c.out);
    expect(sampleValue(m, 'dm_remapd_up')).toBe(1);
    expect(sampleValue(m, 'dm_remapd_devices')).toBe(0);
    expect(m.get('dm_remapd_build_info')?.samples[0].labels.version).toMatch(/^\d+\.\d+\.\d+/);

    // Fuzz the listener with malformed requests (random bytes, broken request
    // lines and headers, huge headers): it answers or drops each, and serves on.
    const seed = Number(process.env.DMR_FUZZ_SEED ?? Date.now() % 0x7fffffff);
    console.log(`[metrics fuzz] seed ${seed}`);
    const rng = new Rng(seed);
    const pieces = ['GET', 'POST', ' ', '/metrics', '/', 'HTTP/1.1', 'HTTP/9.9', '\r\n', '\n', 'Host: x', 'Content-Length: 5', 'Transfer-Encoding: chunked', ':', '\0', 'x'.repeat(20_000)];
    for (let i = 0; i < 60; i++) {
      const payload = rng.chance(0.5)
        ? Buffer.from(Array.from({ length: 1 + rng.int(300) }, () => rng.int(256)))
        : Buffer.from(Array.from({ length: 1 + rng.int(12) }, () => rng.pick(pieces)).join(''));
      await new Promise<void>((res) => {
        const s = connect(sockPath);
        const t = setTimeout(() => s.destroy(), 300);
        s.on('connect', () => s.end(payload));
        s.on('data', () => undefined);
        s.on('error', () => undefined);
        s.on('close', () => { clearTimeout(t); res(); });
      });
    }
    const after = curl('--unix-socket', sockPath, 'http://localhost/metrics');
    expect(after.code, after.out).toBe(0);
    expect(sampleValue(check(after.out), 'dm_remapd_up')).toBe(1);
    expect(d.proc.exitCode).toBeNull();
    expect(await d.stop()).toBe(0);
    expect(existsSync(sockPath)).toBe(false);
  });

  it('a bad metrics or health config exits 2 naming the key; a listener that cannot bind exits 1', async () => {
    for (const [raw, re] of [
      [{ metrics: { listen: 'example.com:80' } }, /"metrics\.listen" must be "HOST:PORT"/],
      [{ metrics: { listen: '127.0.0.1:9753', extra: true } }, /unknown key "metrics\.extra"/],
      [{ health: { failingErrors: 0 } }, /"health\.failingErrors" must be an integer/],
    ] as Array<[Record<string, unknown>, RegExp]>) {
      const cfg = await writeConfig(dir, raw);
      const r = await runNode(DAEMON, ['--config', cfg, '--state-dir', join(dir, 'state3'), '--control-socket', join(dir, 'run3', 'c.sock')]);
      expect(r.code, r.stderr).toBe(2);
      expect(r.stderr).toMatch(re);
      expect(r.stderr).toContain(cfg);
    }
    // A port someone else holds: start fails (exit 1), and the control socket is not left behind.
    const holder = createServer();
    await new Promise<void>((res) => holder.listen(0, '127.0.0.1', res));
    const port = (holder.address() as AddressInfo).port;
    try {
      const cfg = await writeConfig(dir, { metrics: { listen: `127.0.0.1:${port}` } });
      const ctlSock = join(dir, 'run4', 'c.sock');
      const r = await runNode(DAEMON, ['--config', cfg, '--state-dir', join(dir, 'state4'), '--control-socket', ctlSock]);
      expect(r.code).toBe(1);
      expect(r.stdout).toMatch(/cannot serve metrics: listen EADDRINUSE/);
      expect(existsSync(ctlSock)).toBe(false);
    } finally {
      holder.close();
    }
  });
});
