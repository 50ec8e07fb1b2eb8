/**
 * Fuzz of the scan control commands' arguments (outside input from the
 * control socket), in process against the real ScanService, DeviceManager
 * and engine on plain files: seeded random args for scanStart, scanStatus
 * and scanCancel. Each call answers or throws a ControlError with a stable
 * code (never a TypeError or a RangeError); a job only starts with a range
 * inside the device and, for remapUnreadable, with the confirmation; no
 * remap ever happens without it. DMR_FUZZ_SEED=N reproduces a run.
 */
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import pino from 'pino';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { DEFAULTS } from '../../src/daemon/config.js';
import { DeviceManager } from '../../src/daemon/devices.js';
import { ScanService } from '../../src/daemon/handlers-scan.js';
import { ControlError, ERROR_CODES } from '../../src/daemon/protocol.js';
import type { ScanSnapshot } from '../../src/daemon/scan.js';
import { openEngine } from '../../src/engine/open.js';
import { sparseFile, tempDir } from '../engine/fixtures.js';
import { Rng } from './rng.js';

const VALUES: unknown[] = [undefined, null, true, false, 0, 1, -1, 7, 100, 4095, 4096, 4097, 1.5, -0, NaN, Infinity, 2 ** 53, Number.MAX_SAFE_INTEGER,
  '', '0', '10', 'zero', 'ZERO', 'zero ', 'sc', 'nope', '../sc', [], [1], {}, { a: 1 }, 'scan-1-1', '\u0000', '🙂'];

describe('fuzz: scan control arguments', () => {
  let dir: string;
  let cleanup: () => void;
  beforeEach(() => {
    ({ dir, cleanup } = tempDir('scan-fuzz'));
  });
  afterEach(() => cleanup());

  it('answers or refuses with a stable code; jobs start only with valid ranges and confirmed zeroing', async () => {
    const seed = Number(process.env.DMR_FUZZ_SEED ?? Date.now() % 0x7fffffff);
    console.log(`[fuzz scan-control] seed ${seed} (DMR_FUZZ_SEED=${seed} replays it)`);
    const r = new Rng(seed);
    const main = join(dir, 'main.img');
    const spare = join(dir, 'spare.img');
    sparseFile(main, 16 << 20);
    sparseFile(spare, 4 << 20);
    const stateDir = join(dir, 'state');
    mkdirSync(stateDir);
    const mgr = new DeviceManager({ stateDir, logger: pino({ level: 'silent' }), openEngine, startExport: async () => null });
    const svc = new ScanService(mgr, { ...DEFAULTS, stateDir });
    await mgr.add({ name: 'sc', main, spare }, { format: true });
    const blocks = 4096;
    const codes = new Map<string, number>();
    const started: ScanSnapshot[] = [];
    for (let i = 0; i < 3000; i++) {
      const args: Record<string, unknown> = {};
      for (const k of ['name', 'startBlock', 'endBlock', 'rateBytesPerSec', 'chunkBytes', 'remapUnreadable', 'confirmDestroyUnreadableData', 'jobId', 'extra']) {
        if (r.chance(k === 'name' ? 0.9 : 0.35)) args[k] = k === 'name' && r.chance(0.7) ? 'sc' : r.pick(VALUES);
      }
      if (typeof args.startBlock === 'number' && r.chance(0.5)) args.endBlock = (args.startBlock as number) + r.int(3) - 1;
      const cmd = r.pick(['start', 'start', 'status', 'cancel'] as const);
      try {
        const res = cmd === 'start' ? svc.start(args) : cmd === 'status' ? svc.status(args) : svc.cancel(args);
        codes.set('ok', (codes.get('ok') ?? 0) + 1);
        if (cmd === 'start') {
          const job = res as ScanSnapshot;
          started.push(job);
          expect(job.startBlock).toBeGreaterThanOrEqual(0);
          expect(job.startBlock).toBeLessThan(job.endBlock);
          expect(job.endBlock).toBeLessThanOrEqual(blocks);
          if (job.remapUnreadable !== null) expect(args.confirmDestroyUnreadableData, JSON.stringify(args)).toBe(true);
          svc.cancel({ name: 'sc' });
        }
      } catch (e) {
        if (!(e instanceof ControlError)) throw new Error(`${cmd} ${JSON.stringify(args)} threw ${String(e)}`);
        expect(ERROR_CODES).toContain(e.code);
        codes.set(e.code, (codes.get(e.code) ?? 0) + 1);
      }
      if (i % 100 === 0) await new Promise((res) => setImmediate(res)); // let cancelled jobs end
    }
    console.log(`[fuzz scan-control] 3000 calls: ${JSON.stringify(Object.fromEntries(codes))}, ${started.length} job(s) started`);
    expect(started.length).toBeGreaterThan(0);
    expect(codes.get('BAD_REQUEST') ?? 0).toBeGreaterThan(0);
    const engine = mgr.runningEngine('sc', 'check');
    expect(engine.status().remappedBlocks).toBe(0); // a plain-file device has nothing unreadable: nothing was zeroed
    await mgr.shutdown(2000);
  });
});
