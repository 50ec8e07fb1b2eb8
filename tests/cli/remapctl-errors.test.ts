/**
 * remapctl error paths not covered by remapctl.test.ts: the message and exit
 * code of every usage error (--block-size 1000 among them), a spare or an
 * NBD socket already in use, an NBD socket in a missing folder, --json
 * shapes of list and remove, inspect of a tail spare, and every daemon
 * command with the daemon not running.
 */
import { execFileSync } from 'node:child_process';
import { truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cleanup, ctl, startDaemon, tempDir, type Daemon } from '../daemon/helpers.js';

function img(path: string, size: number): string {
  writeFileSync(path, '');
  truncateSync(path, size);
  return path;
}

const USAGE_HINT = /\(run remapctl --help for usage\)/;

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

  it('usage errors name the option, the value and the rule (exit 2)', async () => {
    const cases: Array<[string[], RegExp]> = [
      [['add', 'x', '--main', main, '--spare-tail', '1M', '--block-size', '1000'], /option '--block-size <bytes>' argument '1000' is invalid\. block size must be 4096 or 512, got "1000"/],
      [['add', 'x', '--main', main, '--spare-tail', '12Q'], /option '--spare-tail <size>' argument '12Q' is invalid\. "12Q" is not a size \(a number of bytes, optionally with a K, M, G or T suffix\)/],
      [['add', 'x', '--main', main, '--spare-tail', '0'], /argument '0' is invalid\. size "0" must be a positive number of bytes/],
      [['add', 'x', '--main', main, '--spare-tail', '1M', '--metadata-timeout', 'soon'], /metadata timeout must be an integer in 1\.\.3600000, got "soon"/],
      [['add', 'x', '--main', main, '--spare-tail', '1M', '--nbd-tcp', 'localhost'], /expected HOST:PORT \(port 0\.\.65535\), got "localhost"/],
      [['add', 'x', '--spare-tail', '1M'], /required option '--main <path>' not specified/],
      [['remove', 'd0', '--timeout', '-1'], /timeout must be an integer in 0\.\.3600000, got "-1"/],
      [['remap', 'd0'], /missing required argument 'block'/],
      [['remap', 'd0', 'twelve'], /remap d0: "twelve" is not a block number \(a non-negative integer\)/],
      [['frobnicate'], /unknown command 'frobnicate'/],
    ];
    for (const [args, msg] of cases) {
      const r = await ctl(d.sock, ...args);
      expect(r.code, args.join(' ')).toBe(2);
      expect(r.stderr, args.join(' ')).toMatch(msg);
      expect(r.stdout, args.join(' ')).toBe('');
    }
    // commander's own errors point at --help.
    expect((await ctl(d.sock, 'add', 'x', '--main', main, '--spare-tail', '1M', '--block-size', '1000')).stderr).toMatch(USAGE_HINT);
  });

  it('a spare already used by a device, or another device\'s main as spare, is "in use" (exit 5)', async () => {
    const m2 = img(join(dir, 'main2.img'), 64 << 20);
    const r = await ctl(d.sock, 'add', 'd2', '--main', m2, '--spare', spare, '--format');
    expect(r.code).toBe(5);
    expect(r.stderr).toMatch(/spare\.img is already used by device "d0"/);
    const r2 = await ctl(d.sock, '--json', 'add', 'd2', '--main', m2, '--spare', main, '--format');
    expect(r2.code).toBe(5);
    expect(JSON.parse(r2.stdout)).toMatchObject({ ok: false, error: { code: 'BUSY' } });
    expect(r2.stderr).toMatch(/main\.img is already used by device "d0"/);
  });

  it('an NBD socket another device listens on is refused, naming the device and the cause (exit 5, in use); the first export keeps working', async () => {
    const m3 = img(join(dir, 'main3.img'), 64 << 20);
    const r = await ctl(d.sock, 'add', 'd3', '--main', m3, '--spare-tail', '1M', '--format', '--nbd-unix', nbd);
    expect(r.code).toBe(5);
    expect(r.stderr).toMatch(new RegExp(`another server is listening on ${nbd} \\(device d3\\): EADDRINUSE`));
    expect((await ctl(d.sock, 'status', 'd3')).code).toBe(4); // not half-added
    const size = execFileSync('nbdinfo', ['--size', `nbd+unix:///d0?socket=${nbd}`], { encoding: 'utf8' }).trim();
    expect(Number(size)).toBe(64 << 20);
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

  it('list --json and remove --json give the documented fields', async () => {
    const l = await ctl(d.sock, '--json', 'list');
    expect(l.code).toBe(0);
    const all = JSON.parse(l.stdout) as Array<Record<string, unknown>>;
    expect(all.map((x) => x.name)).toEqual(['d0']);
    expect(all[0]).toMatchObject({ name: 'd0', state: 'running', main, spare, sizeBytes: 64 << 20, exports: [`nbd+unix:///d0?socket=${nbd}`] });
    const m5 = img(join(dir, 'main5.img'), 16 << 20);
    expect((await ctl(d.sock, 'add', 'd5', '--main', m5, '--spare-tail', '1M', '--format')).code).toBe(0);
    const rm = await ctl(d.sock, '--json', 'remove', 'd5', '--timeout', '500');
    expect(rm.code).toBe(0);
    const rep = JSON.parse(rm.stdout) as Record<string, unknown>;
    for (const k of ['name', 'deadlineMs', 'elapsedMs', 'timedOut', 'connectionsClosed', 'requestsAbandoned', 'ioCancelled', 'ioAbandoned', 'metadataAborted', 'synced', 'cancelled']) {
      expect(rep, k).toHaveProperty(k);
    }
    expect(rep).toMatchObject({ name: 'd5', deadlineMs: 500, timedOut: false, synced: true, cancelled: [] });
  });

  it('inspect --spare-tail decodes the spare at the end of a main; a bad tail size is a usage error', async () => {
    const m6 = img(join(dir, 'tail.img'), 64 << 20);
    expect((await ctl(d.sock, 'add', 't0', '--main', m6, '--spare-tail', '4M', '--format')).code).toBe(0);
    expect((await ctl(d.sock, 'remap', 't0', '3', '9')).code).toBe(0);
    expect((await ctl(d.sock, 'remove', 't0')).code).toBe(0);
    const r = await ctl(null, 'inspect', m6, '--spare-tail', '4M');
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/tail area at offset 62914560, 4194304 bytes/);
    expect(r.stdout).toMatch(/device: +t0 /);
    expect(r.stdout).toMatch(/remapped: +2/);
    const bad = await ctl(null, 'inspect', m6, '--spare-tail', '12Q');
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/"12Q" is not a size/);
    const missing = await ctl(null, '--json', 'inspect', join(dir, 'nothere.img'));
    expect(missing.code).toBe(8);
    expect(JSON.parse(missing.stdout)).toMatchObject({ ok: false, error: { code: 'NOT_FOUND', errno: 2 } });
  });
});

describe('remapctl with no daemon running', () => {
  let dir: string;
  beforeAll(() => {
    dir = tempDir('dmr-cli-none-');
  });
  afterAll(() => cleanup(dir));

  it('every command that needs the daemon exits 3 naming the socket; --json says UNREACHABLE', async () => {
    const sock = join(dir, 'none.sock');
    const m = img(join(dir, 'm.img'), 16 << 20);
    for (const args of [['add', 'z', '--main', m, '--spare-tail', '1M', '--format'], ['remove', 'z'], ['remap', 'z', '1'], ['status'], ['status', 'z'], ['list']]) {
      const r = await ctl(sock, ...args);
      expect(r.code, args.join(' ')).toBe(3);
      expect(r.stderr, args.join(' ')).toMatch(new RegExp(`^remapctl: dm-remapd is not reachable on ${sock} \\(ENOENT\\); is the daemon running\\?`));
    }
    const j = await ctl(sock, '--json', 'list');
    expect(j.code).toBe(3);
    expect(JSON.parse(j.stdout)).toMatchObject({ ok: false, error: { code: 'UNREACHABLE' } });
    // DM_REMAPD_SOCKET is honoured when --socket is absent.
    const { runNode, REMAPCTL } = await import('../daemon/helpers.js');
    const e = await runNode(REMAPCTL, ['list'], { env: { DM_REMAPD_SOCKET: sock } });
    expect(e.code).toBe(3);
    expect(e.stderr).toMatch(new RegExp(`not reachable on ${sock}`));
  });
});
