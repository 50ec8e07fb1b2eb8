/**
 * ublk queue count and depth (issue 4, docs/UBLK.md "Queues") on the host,
 * with the real CLI and real daemons: `remapctl add --ublk-queues/--ublk-depth`
 * are checked before anything is sent (exit 2 naming the flag and the range;
 * without --ublk too), the daemon refuses them on its own in a raw request,
 * and a devices.json spec's ublkQueues/ublkDepth reach the ublk export at
 * reassembly and stay in devices.json when the daemon rewrites it.
 *
 * The host kernel has no ublk_drv: a valid request fails at the driver
 * (/dev/ublk-control), which shows it got past every check. Where the host
 * has the driver, that case expects the device instead. The guest test
 * (tests/vm/guest-ublk.sh, "queues") runs 2 x 64 on the real driver.
 */
import { existsSync, readFileSync, truncateSync, writeFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cleanup, ctl, request, startDaemon, tempDir, type Daemon } from './helpers.js';

const HAS_UBLK = existsSync('/dev/ublk-control');

function image(path: string, bytes: number): string {
  writeFileSync(path, '');
  truncateSync(path, bytes);
  return path;
}

describe('ublk queues and depth from the command line', () => {
  let dir: string;
  let d: Daemon;
  let main: string;
  let spare: string;

  beforeAll(async () => {
    dir = tempDir('dmr-ublk-queues-');
    main = image(join(dir, 'main.img'), 64 << 20);
    spare = image(join(dir, 'spare.img'), 16 << 20);
    d = await startDaemon(dir);
  });

  afterAll(async () => {
    await d?.stop();
    cleanup(dir);
  });

  const add = (...extra: string[]) => ctl(d.sock, 'add', 'q0', '--main', main, '--spare', spare, '--format', ...extra);

  it('--ublk-queues and --ublk-depth without --ublk are usage errors naming the flag', async () => {
    for (const [flag, v] of [['--ublk-queues', '2'], ['--ublk-depth', '64']]) {
      const r = await add(flag, v);
      expect(r.code, r.stderr).toBe(2);
      expect(r.stderr).toContain(`add q0: ${flag} needs --ublk`);
    }
    // Refused before any request: no device was added.
    const l = await ctl(d.sock, '--json', 'list');
    expect(l.code).toBe(0);
    expect(JSON.parse(l.stdout)).toEqual([]);
  });

  it('out-of-range values exit 2 naming the flag and the valid range', async () => {
    const cases: Array<[string, string, string]> = [
      ['--ublk-queues', '0', '1..16'], ['--ublk-queues', '17', '1..16'], ['--ublk-queues', '-1', '1..16'], ['--ublk-queues', 'two', '1..16'],
      ['--ublk-queues', '1.5', '1..16'], ['--ublk-depth', '0', '1..4096'], ['--ublk-depth', '4097', '1..4096'], ['--ublk-depth', '', '1..4096'],
    ];
    for (const [flag, v, range] of cases) {
      const r = await add('--ublk', flag, v);
      expect(r.code, `${flag} ${v}: ${r.stderr}`).toBe(2);
      expect(r.stderr).toContain(flag);
      expect(r.stderr).toContain(`must be an integer in ${range}, got "${v}"`);
    }
  });

  it('the daemon checks them too (raw add request)', async () => {
    const base = { name: 'q1', main, spare, format: true };
    const cases: Array<[Record<string, unknown>, string]> = [
      [{ ublk: true, ublkQueues: 17 }, 'argument "ublkQueues" must be an integer in 1..16, got 17'],
      [{ ublk: true, ublkQueues: 0 }, 'argument "ublkQueues" must be an integer in 1..16, got 0'],
      [{ ublk: true, ublkDepth: 4097 }, 'argument "ublkDepth" must be an integer in 1..4096, got 4097'],
      [{ ublk: true, ublkDepth: '64' }, 'argument "ublkDepth" must be an integer in 1..4096, got "64"'],
      [{ ublkQueues: 2 }, 'argument "ublkQueues" needs "ublk": true for device "q1"'],
      [{ ublk: false, ublkDepth: 64 }, 'argument "ublkDepth" needs "ublk": true for device "q1"'],
    ];
    for (const [extra, msg] of cases) {
      const a = await request(d.sock, 'add', { ...base, ...extra });
      const err = a.error as { code: string; message: string } | undefined;
      expect(err?.code, JSON.stringify(a)).toBe('BAD_REQUEST');
      expect(err?.message).toContain(msg);
    }
    expect(await request(d.sock, 'list')).toMatchObject({ ok: true, result: [] });
  });

  it('valid values pass every check and reach the ublk driver', async () => {
    for (const extra of [['--ublk-queues', '16', '--ublk-depth', '128'], ['--ublk-depth', '2048'], ['--ublk-queues', '2', '--ublk-depth', '64'], ['--ublk-depth', '1']]) {
      const r = await add('--ublk', ...extra);
      if (HAS_UBLK) {
        expect(r.code, r.stderr).toBe(0);
        const s = JSON.parse((await ctl(d.sock, '--json', 'status', 'q0')).stdout) as { ublk: { queues: number; depth: number } };
        expect(s.ublk.depth).toBe(Number(extra[extra.indexOf('--ublk-depth') + 1]));
        expect((await ctl(d.sock, 'remove', 'q0')).code).toBe(0);
      } else {
        expect(r.code, r.stderr).toBe(8);
        expect(r.stderr).toContain('/dev/ublk-control');
      }
    }
  });

  it('queues x depth over 2048 tags (1 GiB of per-tag buffers) is refused with EINVAL naming both, before the driver is touched', async () => {
    for (const [q, dp] of [['16', '4096'], ['2', '2048'], ['1', '4096']]) {
      const r = await add('--ublk', '--ublk-queues', q, '--ublk-depth', dp);
      expect(r.code, r.stderr).toBe(2);
      expect(r.stderr).toContain(`got ${q} x ${dp} = ${Number(q) * Number(dp)} tags`);
      expect(r.stderr).toContain('q0');
    }
    expect((await request(d.sock, 'list')).result).toEqual([]);
  });

  it('devices.json: ublkQueues/ublkDepth reach the ublk export at reassembly and are kept when the daemon rewrites the file', async () => {
    const dir2 = join(dir, 'restart');
    const state = join(dir2, 'state');
    mkdirSync(state, { recursive: true });
    const m2 = image(join(dir2, 'm2.img'), 64 << 20);
    const s2 = image(join(dir2, 's2.img'), 16 << 20);
    const m3 = image(join(dir2, 'm3.img'), 64 << 20);
    const s3 = image(join(dir2, 's3.img'), 16 << 20);
    // Format the spares (a plain add and remove), so that reassembly gets as far as the export.
    for (const [n, m, s] of [['good', m2, s2], ['bad', m3, s3]]) {
      expect((await ctl(d.sock, 'add', n, '--main', m, '--spare', s, '--format')).code).toBe(0);
      expect((await ctl(d.sock, 'remove', n)).code).toBe(0);
    }
    const good = { name: 'good', main: m2, spare: s2, metadataTimeoutMs: 5000, ublk: true, ublkQueues: 2, ublkDepth: 64 };
    const bad = { name: 'bad', main: m3, spare: s3, metadataTimeoutMs: 5000, ublk: true, ublkQueues: 2, ublkDepth: 5000 };
    writeFileSync(join(state, 'devices.json'), `${JSON.stringify({ version: 1, devices: [good, bad] }, null, 2)}\n`);
    const d2 = await startDaemon(dir2, { stateDir: state });
    try {
      const st = JSON.parse((await ctl(d2.sock, '--json', 'list')).stdout) as Array<{ name: string; state: string; failReason: string | null; ublk: unknown }>;
      const byName = new Map(st.map((x) => [x.name, x]));
      // The hand-edited depth is refused by the export, naming the field and the range.
      expect(byName.get('bad')?.state).toBe('failed');
      expect(byName.get('bad')?.failReason).toContain('device spec "ublkDepth" must be an integer in 1..4096, got 5000');
      if (HAS_UBLK) {
        expect(byName.get('good')).toMatchObject({ state: 'running', ublk: { queues: expect.any(Number), depth: 64 } });
      } else {
        // 2 x 64 passed the export's checks and failed at the driver.
        expect(byName.get('good')?.state).toBe('failed');
        expect(byName.get('good')?.failReason).toContain('/dev/ublk-control');
        expect(byName.get('good')?.ublk).toBeNull();
      }
      // An add rewrites devices.json: both specs keep their queues and depth.
      const m4 = image(join(dir2, 'm4.img'), 64 << 20);
      const s4 = image(join(dir2, 's4.img'), 16 << 20);
      const r = await ctl(d2.sock, 'add', 'plain', '--main', m4, '--spare', s4, '--format');
      expect(r.code, r.stderr).toBe(0);
      const saved = JSON.parse(readFileSync(join(state, 'devices.json'), 'utf8')) as { devices: Array<Record<string, unknown>> };
      expect(saved.devices.map((x) => x.name).sort()).toEqual(['bad', 'good', 'plain']);
      expect(saved.devices.find((x) => x.name === 'good')).toMatchObject({ ublk: true, ublkQueues: 2, ublkDepth: 64 });
      expect(saved.devices.find((x) => x.name === 'bad')).toMatchObject({ ublkQueues: 2, ublkDepth: 5000 });
      const plain = saved.devices.find((x) => x.name === 'plain');
      expect(plain).not.toHaveProperty('ublkQueues');
      expect(plain).not.toHaveProperty('ublkDepth');
      const ps = JSON.parse((await ctl(d2.sock, '--json', 'status', 'plain')).stdout) as { ublk: unknown };
      expect(ps.ublk).toBeNull();
    } finally {
      await d2.stop();
    }
  });
});
