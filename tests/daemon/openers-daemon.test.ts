/**
 * The openers command and `remove --force` through the real daemon and
 * remapctl, on a device with no kernel block device (the host kernel has no
 * ublk/nbd: tests/vm/guest-matrix.sh covers /dev/ublkbN and /dev/nbdN):
 * nothing to report, exit 0; unknown device exit 4; malformed request
 * BAD_REQUEST naming the argument; `remove --force` removes.
 */
import { truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cleanup, ctl, request, startDaemon, tempDir, type Daemon } from './helpers.js';

describe('openers and remove --force through the daemon', () => {
  let dir = '';
  let d: Daemon;
  beforeAll(async () => {
    dir = tempDir('dmr-openers-');
    d = await startDaemon(dir);
    for (const [f, size] of [['main.img', 64 << 20], ['spare.img', 16 << 20]] as const) {
      writeFileSync(join(dir, f), '');
      truncateSync(join(dir, f), size);
    }
    const r = await ctl(d.sock, 'add', 'd0', '--main', join(dir, 'main.img'), '--spare', join(dir, 'spare.img'), '--format', '--nbd-unix', join(dir, 'd0.sock'));
    expect(r.code, r.stderr).toBe(0);
  });
  afterAll(async () => {
    await d?.stop();
    cleanup(dir);
  });

  it('a device without a kernel block device has no openers (exit 0, --json shape)', async () => {
    const human = await ctl(d.sock, 'openers', 'd0');
    expect(human.code, human.stderr).toBe(0);
    expect(human.stdout.trim()).toBe('d0: no kernel block device');
    const j = await ctl(d.sock, '--json', 'openers', 'd0');
    expect(j.code).toBe(0);
    expect(JSON.parse(j.stdout)).toEqual({ name: 'd0', devices: [], openers: [] });
  });

  it('unknown device: exit 4 naming it; a malformed request names the argument', async () => {
    const r = await ctl(d.sock, 'openers', 'ghost');
    expect(r.code).toBe(4);
    expect(r.stderr).toMatch(/no device named "ghost"/);
    for (const [cmd, args, what] of [['openers', { name: 7 }, /openers: argument "name"/], ['remove', { name: 'd0', force: 'yes' }, /remove: argument "force"/]] as const) {
      const a = await request(d.sock, cmd, args);
      expect(a.ok).toBe(false);
      expect((a.error as { code: string }).code).toBe('BAD_REQUEST');
      expect((a.error as { message: string }).message).toMatch(what);
    }
    expect((await ctl(d.sock, 'status', 'd0')).code).toBe(0);
  });

  it('remove --force removes a device (nothing holds it)', async () => {
    const r = await ctl(d.sock, 'remove', 'd0', '--force', '--timeout', '3000');
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^removed d0 in \d+ ms \(deadline 3000 ms\)/);
    expect((await ctl(d.sock, 'status', 'd0')).code).toBe(4);
  });
});
