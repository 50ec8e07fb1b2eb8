/**
 * Scan and scrub against device removal, in process (the real DeviceManager,
 * engine and ScanService on plain files), where the timers can be counted:
 * a rate-limited scan waiting in its token bucket and a scrub paused behind
 * it are both cancelled by the removal, which is not delayed, and no timer
 * of theirs is left (process.getActiveResourcesInfo()).
 */
import { createHook } from 'node:async_hooks';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import pino from 'pino';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { DEFAULTS, type DaemonConfig } from '../../src/daemon/config.js';
import { DeviceManager } from '../../src/daemon/devices.js';
import { ScanService } from '../../src/daemon/handlers-scan.js';
import type { ScanSnapshot } from '../../src/daemon/scan.js';
import { openEngine } from '../../src/engine/open.js';
import { sparseFile, tempDir } from '../engine/fixtures.js';

/** Every Timeout created by src/ code while the hook is on and not yet fired or cleared, with where it was created. */
function trackTimeouts(): { live: Map<number, string>; refd: () => string[]; stop: () => void } {
  const live = new Map<number, string>();
  const timers = new Map<number, NodeJS.Timeout>();
  const hook = createHook({
    init(id, type, _trigger, resource) {
      if (type !== 'Timeout') return;
      const stack = new Error('created here').stack ?? '';
      if (!stack.includes('/src/')) return; // the test's own polling timers
      live.set(id, stack);
      timers.set(id, resource as NodeJS.Timeout);
    },
    destroy(id) {
      live.delete(id);
      timers.delete(id);
    },
  });
  hook.enable();
  return { live, refd: () => [...timers].filter(([, t]) => t.hasRef()).map(([id]) => live.get(id) ?? ''), stop: () => hook.disable() };
}

async function until(pred: () => boolean, what: string, timeoutMs = 10_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

describe('scan and scrub against removal (in process)', () => {
  let dir: string;
  let cleanup: () => void;
  beforeEach(() => {
    ({ dir, cleanup } = tempDir('scan-lc'));
  });
  afterEach(() => cleanup());

  it('a removal cancels a waiting scan and a paused scrub at once, and leaves no timer', async () => {
    const main = join(dir, 'main.img');
    const spare = join(dir, 'spare.img');
    sparseFile(main, 16 << 20);
    sparseFile(spare, 4 << 20);
    const stateDir = join(dir, 'state');
    mkdirSync(stateDir);
    const lines: Array<Record<string, unknown>> = [];
    const logger = pino({ level: 'info' }, { write: (s: string) => { lines.push(JSON.parse(s) as Record<string, unknown>); } });
    const mgr = new DeviceManager({ stateDir, logger, openEngine, startExport: async () => null, defaultMetadataTimeoutMs: 2000 });
    // A scrub pass every 0.1 s; 1 MiB/s, so both runs spend their time waiting on timers.
    const cfg: DaemonConfig = { ...DEFAULTS, stateDir, scrub: { intervalHours: 0.1 / 3600, rateMBps: 1, idleMs: 0 } };
    const svc = new ScanService(mgr, cfg);
    const tracked = trackTimeouts();
    await mgr.add({ name: 'lc', main, spare }, { format: true });
    expect(tracked.live.size).toBeGreaterThan(0); // the scrub's (and the health tracker's) timers ...
    expect(tracked.refd()).toEqual([]); // ... unref'd: they never keep the daemon alive

    const job = svc.start({ name: 'lc', rateBytesPerSec: 1 << 20 });
    const snap = (): ScanSnapshot => (svc.status({ jobId: job.jobId }) as { job: ScanSnapshot }).job;
    const scrubState = (): string | undefined => (svc.status({ name: 'lc' }) as { scrub: { state: string } | null }).scrub?.state;
    await until(() => snap().blocksDone > 0 && scrubState() === 'paused', 'a scan under way and the scrub paused behind it');
    expect((svc.status({ name: 'lc' }) as { scrub: { pauseReason: string } }).scrub.pauseReason).toBe('a manual scan of the device is running');
    expect(tracked.live.size).toBeGreaterThan(0);
    expect(tracked.refd()).toEqual([]); // the waits of both are unref'd

    const t0 = Date.now();
    const rep = await mgr.remove('lc', 2000);
    console.log(`[scan lifecycle] removal: ${Date.now() - t0} ms, ${JSON.stringify(rep.cancelled)}`);
    expect(rep.timedOut).toBe(false);
    expect(rep.requestsAbandoned).toBe(0);
    await until(() => snap().state !== 'running' && snap().state !== 'paused', 'the scan to end');
    expect(snap()).toMatchObject({ state: 'cancelled', cancelReason: 'device is being removed' });
    await until(() => lines.some((l) => l.event === 'scrub-finished' && l.state === 'cancelled'), 'the scrub pass to end');
    // Nothing of the scan, the scrub (or the device) is left on the timer list.
    await new Promise((r) => setImmediate(r));
    tracked.stop();
    expect([...tracked.live.values()]).toEqual([]);
    expect(() => svc.status({ name: 'lc' })).toThrow(/no device named "lc"/);
    expect(svc.status({ jobId: job.jobId })).toMatchObject({ job: { state: 'cancelled' } });
    await mgr.shutdown(1000);
  });
});
