/**
 * Boot: a daemon started during boot waits, bounded, for the backing disks
 * its devices.json names (src/daemon/boot-wait.ts). In process for the
 * helpers; the real daemon for the whole path (a main that appears while it
 * waits is reassembled, not failed).
 */
import { spawn, spawnSync } from 'node:child_process';
import { mkdirSync, renameSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import pino from 'pino';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { backingPaths, reassembleWaitMs, uptimeMs, waitForPaths } from '../../src/daemon/boot-wait.js';
import { tempDir } from '../engine/fixtures.js';
import { DAEMON, ctl, startDaemon } from './helpers.js';

type Line = Record<string, unknown>;

describe('reassembleWaitMs', () => {
  it('counts DM_REMAPD_REASSEMBLE_WAIT_MS from boot: only a start during boot waits', () => {
    expect(reassembleWaitMs({}, 1000)).toBe(0);
    expect(reassembleWaitMs({ DM_REMAPD_REASSEMBLE_WAIT_MS: '60000' }, 5_000)).toBe(55_000);
    expect(reassembleWaitMs({ DM_REMAPD_REASSEMBLE_WAIT_MS: '60000' }, 3_600_000)).toBe(0);
    expect(reassembleWaitMs({ DM_REMAPD_REASSEMBLE_WAIT_MS: '60000' }, null)).toBe(0);
    expect(reassembleWaitMs({ DM_REMAPD_REASSEMBLE_WAIT_MS: '9999999' }, 0)).toBe(0); // malformed: over 6 digits
    expect(reassembleWaitMs({ DM_REMAPD_REASSEMBLE_WAIT_MS: '900000' }, 0)).toBe(600_000); // capped at 10 minutes
    expect(uptimeMs()).toBeGreaterThan(0);
  });

  it('is never negative nor above 10 minutes, for any value (property)', () => {
    fc.assert(fc.property(fc.string(), fc.option(fc.nat(1e9), { nil: null }), (v, up) => {
      const w = reassembleWaitMs({ DM_REMAPD_REASSEMBLE_WAIT_MS: v }, up);
      expect(w).toBeGreaterThanOrEqual(0);
      expect(w).toBeLessThanOrEqual(600_000);
      if (up === null || !/^\d{1,6}$/.test(v)) expect(w).toBe(0);
    }));
  });
});

describe('waitForPaths', () => {
  let dir: string;
  let cleanup: () => void;
  beforeEach(() => {
    ({ dir, cleanup } = tempDir('bootwait'));
  });
  afterEach(() => cleanup());

  it('lists every main and spare once', () => {
    expect(backingPaths([
      { name: 'a', main: '/m1', spare: '/s1', spares: ['/x1', '/x2'] },
      { name: 'b', main: '/m2', spareTailBytes: 1 << 20 },
      { name: 'c', main: '/m1', spare: '/s3' },
    ])).toEqual(['/m1', '/s1', '/x1', '/x2', '/m2', '/s3']);
  });

  it('returns at once when everything exists, waits for a path that appears, and gives up on one that does not', async () => {
    const lines: Line[] = [];
    const log = pino({ level: 'info' }, { write: (s: string) => { lines.push(JSON.parse(s) as Line); } });
    const here = join(dir, 'here');
    writeFileSync(here, '');
    expect(await waitForPaths([here], 5000, log)).toEqual([]);
    expect(lines).toEqual([]);
    const late = join(dir, 'late');
    setTimeout(() => writeFileSync(late, ''), 300);
    const t0 = Date.now();
    expect(await waitForPaths([here, late], 10_000, log, 50)).toEqual([]);
    expect(Date.now() - t0).toBeLessThan(5000);
    expect(lines.map((l) => l.event)).toEqual(['waiting-for-disks', 'disks-appeared']);
    expect(lines[0].missing).toEqual([late]);
    const never = join(dir, 'never');
    const t1 = Date.now();
    expect(await waitForPaths([never], 400, log, 50)).toEqual([never]);
    expect(Date.now() - t1).toBeGreaterThanOrEqual(390);
    expect(lines.at(-1)).toMatchObject({ event: 'disks-missing', missing: [never], level: 40 });
    expect(await waitForPaths([never], 0, log)).toEqual([never]); // no wait asked
  });
});

/** Starts the daemon in a time namespace whose boot was `upS` seconds ago (so /proc/uptime says so); resolves at `ready`. */
function daemonBootedAgo(dir: string, upS: number, env: Record<string, string>): Promise<{ lines: Line[]; sock: string; stop: () => Promise<void> }> {
  const sock = join(dir, 'run', 'b.sock');
  const now = Math.floor(uptimeMs() ?? 0) / 1000;
  const p = spawn('unshare', ['-T', '-f', `--boottime=-${Math.floor(now - upS)}`, '--kill-child=SIGTERM', process.execPath, DAEMON,
    '--state-dir', join(dir, 'state'), '--control-socket', sock], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  const lines: Line[] = [];
  let buf = '';
  let stderr = '';
  p.stderr.setEncoding('utf8').on('data', (c: string) => { stderr += c; });
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`not ready in 30 s: ${JSON.stringify(lines)} ${stderr}`)), 30_000);
    p.stdout.setEncoding('utf8').on('data', (c: string) => {
      buf += c;
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        const l = JSON.parse(buf.slice(0, nl)) as Line;
        buf = buf.slice(nl + 1);
        lines.push(l);
        if (l.event === 'ready') {
          clearTimeout(t);
          resolve({
            lines, sock,
            stop: async () => {
              // unshare --fork ignores SIGTERM while it waits: signal the daemon itself (same PID namespace).
              const exited = new Promise<void>((r) => p.once('close', () => r()));
              process.kill(Number(l.pid), 'SIGTERM');
              await exited;
            },
          });
        }
      }
    });
    p.once('close', (code) => { clearTimeout(t); reject(new Error(`exited ${code} before ready: ${stderr} ${JSON.stringify(lines)}`)); });
  });
}

const TIMENS = spawnSync('unshare', ['-T', '-f', '--boottime=-1', 'true']).status === 0;

describe.skipIf(!TIMENS)('the daemon at boot (in a time namespace whose boot was 5 s ago)', () => {
  let dir: string;
  let cleanup: () => void;
  beforeEach(() => {
    ({ dir, cleanup } = tempDir('bootwait-d'));
  });
  afterEach(() => cleanup());

  it('reassembles a device whose main appears while it waits; the same start later than the window fails it at once', async () => {
    const main = join(dir, 'main.img');
    writeFileSync(main, '');
    truncateSync(main, 16 << 20);
    mkdirSync(join(dir, 'run'));
    const d0 = await startDaemon(dir, { stateDir: join(dir, 'state'), sock: join(dir, 'run', 'a.sock') });
    expect((await ctl(d0.sock, 'add', 'late', '--main', main, '--spare-tail', '2M', '--format')).code).toBe(0);
    expect(await d0.stop()).toBe(0);
    // The disk is not there at the next start; it appears 1.5 s later.
    const hidden = join(dir, 'main.hidden');
    renameSync(main, hidden);
    const timer = setTimeout(() => renameSync(hidden, main), 1500);
    const d1 = await daemonBootedAgo(dir, 5, { DM_REMAPD_REASSEMBLE_WAIT_MS: '60000' });
    try {
      const st = JSON.parse((await ctl(d1.sock, '--json', 'status', 'late')).stdout) as { state: string };
      expect(st.state).toBe('running');
      expect(d1.lines.map((l) => l.event)).toEqual(expect.arrayContaining(['waiting-for-disks', 'disks-appeared']));
      expect(d1.lines.find((l) => l.event === 'waiting-for-disks')?.missing).toEqual([main]);
    } finally {
      clearTimeout(timer);
      await d1.stop();
    }
    // Booted 120 s ago: past the 60 s window, no wait: the device is failed.
    renameSync(main, hidden);
    const d2 = await daemonBootedAgo(dir, 120, { DM_REMAPD_REASSEMBLE_WAIT_MS: '60000' });
    try {
      const st = JSON.parse((await ctl(d2.sock, '--json', 'status', 'late')).stdout) as { state: string; failReason: string };
      expect(st.state).toBe('failed');
      expect(st.failReason).toMatch(/does not exist/);
      expect(d2.lines.some((l) => l.event === 'waiting-for-disks')).toBe(false);
    } finally {
      await d2.stop();
    }
  });
});
