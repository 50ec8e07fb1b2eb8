/**
 * Fuzz of the spare pool's control commands (outside input from the control
 * socket), in process against the real DeviceManager and engine on plain
 * files: seeded random args for spareAdd and spareList. Each call answers or
 * throws with a stable protocol code (never a TypeError or RangeError);
 * only blank files given with format, and nothing else, become spares; the
 * label of another device, the main and the primary spare are never
 * written; devices.json lists exactly the added spares, and the device
 * reopens from it with the same pool. DMR_FUZZ_SEED=N reproduces a run.
 */
import { mkdirSync, readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import pino from 'pino';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { DeviceManager } from '../../src/daemon/devices.js';
import { spareHandlers } from '../../src/daemon/handlers-spare.js';
import { ERROR_CODES, errorBody } from '../../src/daemon/protocol.js';
import { StateFile } from '../../src/daemon/state.js';
import { openEngine } from '../../src/engine/open.js';
import { tempDir } from '../engine/fixtures.js';
import { Rng } from './rng.js';

const BS = 4096;

function img(path: string, size: number): string {
  writeFileSync(path, '');
  truncateSync(path, size);
  return path;
}

describe('fuzz: spare pool control arguments', () => {
  let dir: string;
  let cleanup: () => void;
  beforeEach(() => {
    ({ dir, cleanup } = tempDir('spare-fuzz'));
  });
  afterEach(() => cleanup());

  it('answers or refuses with a stable code; only blank files with format become spares; nothing else is written', async () => {
    const seed = Number(process.env.DMR_FUZZ_SEED ?? Date.now() % 0x7fffffff);
    console.log(`[fuzz spare-control] seed ${seed} (DMR_FUZZ_SEED=${seed} replays it)`);
    const r = new Rng(seed);
    const main = img(join(dir, 'main.img'), 4 << 20);
    const spare = img(join(dir, 'spare.img'), 1 << 20);
    // another device's extra spare
    const theirs = img(join(dir, 'theirs.img'), BS + 8 * BS);
    const other = await openEngine({ name: 'other', mainPath: img(join(dir, 'm2.img'), 1 << 20), sparePath: img(join(dir, 's2.img'), 1 << 20), format: true, poolReserveBytes: 1 << 20 });
    await other.addSpare(theirs, { format: true });
    await other.close();
    const blanks = Array.from({ length: 6 }, (_, i) => img(join(dir, `blank${i}.img`), BS + (4 + i) * BS));
    const tiny = img(join(dir, 'tiny.img'), 100);
    const stateDir = join(dir, 'state');
    mkdirSync(stateDir);
    const mgr = new DeviceManager({ stateDir, logger: pino({ level: 'silent' }), openEngine, startExport: async () => null });
    await mgr.add({ name: 'sp', main, spare, poolReserveBytes: 1 << 20 }, { format: true });
    const h = spareHandlers(mgr);
    const protect = new Map([main, spare, theirs, join(dir, 's2.img')].map((p) => [p, readFileSync(p).subarray(0, 2 * BS)]));
    const VALUES: unknown[] = [undefined, null, true, false, 0, 1, -1, 1.5, NaN, '', 'sp', 'nope', '../sp', [], {}, 'x.img', '/', dir,
      join(dir, 'missing.img'), main, spare, theirs, tiny, '/dev/null', ...blanks, ...blanks];
    const added: string[] = [];
    const codes = new Map<string, number>();
    for (let i = 0; i < 400; i++) {
      const args: Record<string, unknown> = {};
      if (r.chance(0.9)) args.name = r.chance(0.8) ? 'sp' : r.pick(VALUES);
      if (r.chance(0.9)) args.path = r.pick(VALUES);
      if (r.chance(0.6)) args.format = r.chance(0.8) ? true : r.pick(VALUES);
      if (r.chance(0.1)) args.extra = r.pick(VALUES);
      const cmd = r.chance(0.8) ? 'spareAdd' : 'spareList';
      try {
        const res = (await h[cmd](args, {} as never)) as { spares: Array<{ path: string }>; added?: { path: string } };
        if (cmd === 'spareAdd') {
          const p = args.path as string;
          expect(blanks).toContain(p);
          expect(args.format).toBe(true);
          expect(added).not.toContain(p);
          added.push(p);
          expect(res.added?.path).toBe(p);
        }
        expect(res.spares.map((s) => s.path).slice(1)).toEqual(added);
        codes.set('ok', (codes.get('ok') ?? 0) + 1);
      } catch (err) {
        const b = errorBody(err);
        expect(ERROR_CODES).toContain(b.code);
        expect(b.code, b.message).not.toBe('INTERNAL');
        codes.set(b.code, (codes.get(b.code) ?? 0) + 1);
        if (process.env.DMR_FUZZ_VERBOSE !== undefined && b.code === "IO_ERROR") console.log(b.message);
      }
    }
    console.log(`[fuzz spare-control] ${[...codes].map(([c, n]) => `${c} ${n}`).join(', ')}; ${added.length} spares added`);
    expect(added.length).toBeGreaterThan(0);
    for (const [p, before] of protect) expect(readFileSync(p).subarray(0, 2 * BS).equals(before), p).toBe(true);
    const specs = await new StateFile(stateDir).load();
    expect(specs[0].spares ?? []).toEqual(added);
    const info = mgr.runningEngine('sp', 'check').spareInfo();
    await mgr.shutdown();
    // the device reopens from devices.json with the same pool
    const again = new DeviceManager({ stateDir, logger: pino({ level: 'silent' }), openEngine, startExport: async () => null });
    expect(await again.reassemble()).toEqual({ started: 1, failed: 0 });
    expect(again.runningEngine('sp', 'check').spareInfo()).toEqual(info);
    await again.shutdown();
  });
});
