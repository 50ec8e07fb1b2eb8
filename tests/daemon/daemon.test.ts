import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { chmodSync, existsSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DAEMON, REMAPCTL, ROOT, cleanup, ctl, raw, request, runNode, startDaemon, tempDir, type Daemon } from './helpers.js';

function img(path: string, size: number): string {
  writeFileSync(path, '');
  truncateSync(path, size);
  return path;
}

describe('control socket', () => {
  let dir: string;
  let d: Daemon;
  beforeAll(async () => {
    dir = tempDir('dmr-ctl-');
    d = await startDaemon(dir, { sock: join(dir, 'new', 'sub', 'control.sock') });
  });
  afterAll(async () => {
    if (d !== undefined) expect(await d.stop()).toBe(0);
    cleanup(dir);
  });

  it('is created mode 0600 in a 0755 folder it creates', () => {
    expect(statSync(d.sock).mode & 0o777).toBe(0o600);
    expect(statSync(join(dir, 'new', 'sub')).mode & 0o777).toBe(0o755);
  });

  it('answers malformed JSON, wrong types and unknown commands, and stays alive', async () => {
    const answers = await raw(d.sock, [
      '{not json',
      '[1,2,3]',
      JSON.stringify({ id: 1, cmd: 42 }),
      JSON.stringify({ id: 2, cmd: 'frobnicate' }),
      JSON.stringify({ id: 3, cmd: 'add', args: { name: 5, main: '/x', spare: '/y' } }),
      JSON.stringify({ id: 4, cmd: 'add', args: { name: 'a', main: '/x', spareTailBytes: 'big' } }),
      JSON.stringify({ id: 5, cmd: 'add', args: { name: 'a', main: '/x', spare: '/y', blockSize: 1024 } }),
      JSON.stringify({ id: 6, cmd: 'remap', args: { name: 'a', blocks: [-1] } }),
      JSON.stringify({ id: 7, cmd: 'status', args: 'x' }),
      JSON.stringify({ id: { x: 1 }, cmd: 'ping' }),
      JSON.stringify({ id: 8, cmd: 'remove', args: { name: 'a', timeoutMs: 1.5 } }),
      JSON.stringify({ id: 9, cmd: 'add', args: { name: '../evil', main: '/x', spareTailBytes: 4096 } }),
      JSON.stringify({ id: 10, cmd: 'add', args: { name: 'rel', main: 'relative.img', spareTailBytes: 4096 } }),
      JSON.stringify({ id: 11, cmd: '__proto__' }),
    ].join('\n') + '\n', 14);
    const byId = new Map(answers.map((a) => [a.id, a]));
    const codes = answers.map((a) => (a.error as { code: string } | undefined)?.code);
    expect(answers).toHaveLength(14);
    expect(answers.every((a) => a.ok === false)).toBe(true);
    expect(codes.filter((c) => c === 'BAD_REQUEST').length).toBe(12);
    expect((byId.get(2)?.error as { code: string; message: string })).toMatchObject({ code: 'UNKNOWN_COMMAND', message: expect.stringMatching(/unknown command "frobnicate"/) });
    expect((byId.get(11)?.error as { code: string }).code).toBe('UNKNOWN_COMMAND');
    expect((byId.get(3)?.error as { message: string }).message).toMatch(/add: argument "name" must be a non-empty string, got 5/);
    expect((byId.get(4)?.error as { message: string }).message).toMatch(/"spareTailBytes" must be an integer/);
    expect((byId.get(5)?.error as { message: string }).message).toMatch(/"blockSize" must be 4096 or 512/);
    expect((byId.get(6)?.error as { message: string }).message).toMatch(/"blocks" must be a non-empty array/);
    expect((byId.get(9)?.error as { message: string }).message).toMatch(/device name "\.\.\/evil" is invalid/);
    expect((byId.get(10)?.error as { message: string }).message).toMatch(/"main" must be an absolute path/);
    expect((await request(d.sock, 'ping')).ok).toBe(true);
  });

  it('answers a line over 1 MiB with BAD_REQUEST and keeps the connection usable', async () => {
    const huge = `{"id":1,"cmd":"ping","args":{"pad":"${'x'.repeat(2 * 1024 * 1024)}"}}\n`;
    const answers = await raw(d.sock, huge + JSON.stringify({ id: 2, cmd: 'ping' }) + '\n', 2);
    expect(answers[0]).toMatchObject({ id: null, ok: false, error: { code: 'BAD_REQUEST', message: expect.stringMatching(/exceeds the limit of 1048576 bytes/) } });
    expect(answers[1]).toMatchObject({ id: 2, ok: true });
    // A huge line without any newline: answered once, daemon alive.
    const a2 = await raw(d.sock, 'y'.repeat(3 * 1024 * 1024), 1);
    expect(a2[0]).toMatchObject({ ok: false, error: { code: 'BAD_REQUEST' } });
    expect((await request(d.sock, 'ping')).ok).toBe(true);
    expect(d.proc.exitCode).toBeNull();
  });

  it('refuses to start a second daemon on the same socket', async () => {
    const r = await runNode(DAEMON, ['--state-dir', join(dir, 'state2'), '--control-socket', d.sock]);
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/another dm-remapd already listens on/);
    expect((await request(d.sock, 'ping')).ok).toBe(true);
  });
});

describe('daemon lifecycle', () => {
  let dir: string;
  beforeAll(() => {
    dir = tempDir('dmr-life-');
  });
  afterAll(() => cleanup(dir));

  it('reassembles devices after a restart (remaps persist); a missing one is logged and the others served', async () => {
    const mainA = img(join(dir, 'a.img'), 32 << 20);
    const spareA = img(join(dir, 'a.spare'), 4 << 20);
    const mainB = img(join(dir, 'b.img'), 32 << 20);
    const d1 = await startDaemon(dir);
    expect((await ctl(d1.sock, 'add', 'a', '--main', mainA, '--spare', spareA, '--format', '--metadata-timeout', '3000')).code).toBe(0);
    expect((await ctl(d1.sock, 'add', 'b', '--main', mainB, '--spare-tail', '4M', '--format')).code).toBe(0);
    expect((await ctl(d1.sock, 'remap', 'a', '1', '2', '3')).code).toBe(0);
    const state = JSON.parse(readFileSync(join(d1.stateDir, 'devices.json'), 'utf8')) as { version: number; devices: Array<Record<string, unknown>> };
    expect(state.version).toBe(1);
    expect(state.devices.map((x) => x.name)).toEqual(['a', 'b']);
    expect(state.devices[0]).toMatchObject({ main: mainA, spare: spareA, metadataTimeoutMs: 3000 });
    expect(state.devices[1]).toMatchObject({ main: mainB, spareTailBytes: 4 << 20 });
    expect(await d1.stop('SIGTERM')).toBe(0);
    expect(d1.logs.filter((l) => l.event === 'removed').map((l) => l.device).sort()).toEqual(['a', 'b']);
    expect(existsSync(d1.sock)).toBe(false);

    const d2 = await startDaemon(dir);
    const s = JSON.parse((await ctl(d2.sock, '--json', 'status', 'a')).stdout) as Record<string, unknown>;
    expect(s).toMatchObject({ state: 'running', remappedBlocks: 3 });
    expect(await d2.stop('SIGINT')).toBe(0);

    rmSync(mainB);
    const d3 = await startDaemon(dir);
    const failed = await d3.waitLog((l) => l.event === 'reassemble-failed');
    expect(failed.device).toBe('b');
    expect(failed.msg).toMatch(/device b could not be reassembled: main .*b\.img does not exist/);
    const list = JSON.parse((await ctl(d3.sock, '--json', 'list')).stdout) as Array<Record<string, unknown>>;
    expect(list.map((x) => [x.name, x.state])).toEqual([['a', 'running'], ['b', 'failed']]);
    expect((await ctl(d3.sock, 'remap', 'b', '1')).code).toBe(1);
    expect((await ctl(d3.sock, 'remove', 'b')).code).toBe(0);
    expect(JSON.parse(readFileSync(join(d3.stateDir, 'devices.json'), 'utf8')).devices.map((x: { name: string }) => x.name)).toEqual(['a']);
    expect(await d3.stop()).toBe(0);
  });

  it('validates the config file and flags, naming the key (exit 2)', async () => {
    const cfg = join(dir, 'bad.json');
    writeFileSync(cfg, JSON.stringify({ stateDir: 'relative/path' }));
    const r = await runNode(DAEMON, ['--config', cfg]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/bad\.json: "stateDir" must be an absolute path/);
    writeFileSync(cfg, JSON.stringify({ stateDirr: '/x' }));
    const r2 = await runNode(DAEMON, ['--config', cfg]);
    expect(r2.code).toBe(2);
    expect(r2.stderr).toMatch(/unknown key "stateDirr"/);
    writeFileSync(cfg, '{');
    expect((await runNode(DAEMON, ['--config', cfg])).stderr).toMatch(/is not valid JSON/);
    const r3 = await runNode(DAEMON, ['--log-level', 'loud', '--control-socket', join(dir, 'x.sock')]);
    expect(r3.code).toBe(2);
    expect(r3.stderr).toMatch(/"logLevel" must be one of/);
    expect((await runNode(DAEMON, ['--bogus'])).code).toBe(2);
  });

  it('takes the socket from DM_REMAPD_SOCKET and the settings from --config', async () => {
    const sock = join(dir, 'env', 'c.sock');
    const cfg = join(dir, 'good.json');
    writeFileSync(cfg, JSON.stringify({ stateDir: join(dir, 'cfgstate'), logLevel: 'debug', metadataTimeoutMs: 2500 }));
    const stateDir = join(dir, 'cfgstate');
    const d = await startDaemon(dir, { env: { DM_REMAPD_SOCKET: sock }, sock, stateDir, args: ['--config', cfg] });
    const r = await runNode(REMAPCTL, ['list'], { env: { DM_REMAPD_SOCKET: sock } });
    expect(r.code).toBe(0);
    expect(r.stdout.trim()).toBe('no devices');
    const m = img(join(dir, 'cfg.img'), 16 << 20);
    expect((await runNode(REMAPCTL, ['add', 'c', '--main', m, '--spare-tail', '2M', '--format'], { env: { DM_REMAPD_SOCKET: sock } })).code).toBe(0);
    // The config's metadata timeout is the device's default (and its removal deadline).
    expect(JSON.parse(readFileSync(join(stateDir, 'devices.json'), 'utf8')).devices[0].metadataTimeoutMs).toBe(2500);
    expect(JSON.parse((await runNode(REMAPCTL, ['--json', 'remove', 'c'], { env: { DM_REMAPD_SOCKET: sock } })).stdout).deadlineMs).toBe(2500);
    expect(await d.stop()).toBe(0);
  });
});

describe('systemd', () => {
  let dir: string;
  beforeAll(() => {
    dir = tempDir('dmr-sd-');
  });
  afterAll(() => cleanup(dir));

  it('the unit passes systemd-analyze verify (ExecStart pointed at a temp copy of the binary)', () => {
    const unit = readFileSync(join(ROOT, 'systemd', 'dm-remapd.service'), 'utf8');
    expect(unit).toMatch(/^Type=notify$/m);
    expect(unit).toMatch(/^ExecStart=\/usr\/local\/bin\/dm-remapd$/m);
    for (const opt of ['ProtectSystem', 'ProtectHome', 'PrivateTmp', 'PrivateDevices', 'PrivateMounts']) expect(unit).not.toMatch(new RegExp(`^${opt}=`, 'm'));
    const bin = join(dir, 'dm-remapd');
    writeFileSync(bin, `#!/bin/sh\nexec ${process.execPath} ${DAEMON} "$@"\n`);
    chmodSync(bin, 0o755);
    const copy = join(dir, 'dm-remapd.service');
    writeFileSync(copy, unit.replace(/^ExecStart=.*$/m, `ExecStart=${bin}`));
    const r = spawnSync('systemd-analyze', ['verify', copy], { encoding: 'utf8' });
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
  });

  for (const abstract of [false, true]) {
    it(`sends READY=1 and STOPPING=1 to NOTIFY_SOCKET (${abstract ? 'abstract' : 'path'}), and exits 0 on SIGTERM`, async () => {
      const notify = abstract ? `@dmr-test-notify-${process.pid}` : join(dir, 'notify.sock');
      const rx = spawn('/usr/bin/python3', [join(ROOT, 'tests', 'daemon', 'notify_receiver.py'), notify, '20'], { stdio: ['ignore', 'pipe', 'inherit'] });
      let got = '';
      rx.stdout.setEncoding('utf8').on('data', (c: string) => { got += c; });
      const rxDone = new Promise<void>((res) => rx.on('close', () => res()));
      await new Promise<void>((res) => { const t = setInterval(() => { if (got.includes('LISTENING')) { clearInterval(t); res(); } }, 20); });
      const m = img(join(dir, `m${abstract ? 1 : 0}.img`), 16 << 20);
      const stateDir = join(dir, `state${abstract ? 1 : 0}`);
      const d = await startDaemon(dir, { env: { NOTIFY_SOCKET: notify }, stateDir, sock: join(dir, `c${abstract ? 1 : 0}.sock`) });
      expect((await ctl(d.sock, 'add', 'n', '--main', m, '--spare-tail', '2M', '--format')).code).toBe(0);
      await new Promise((r) => setTimeout(r, 100));
      expect(got).toMatch(/READY=1\nSTATUS=serving 0 device\(s\)\nSTATUS=serving 1 device\(s\)/);
      expect(got).not.toMatch(/STOPPING=1/);
      expect(await d.stop('SIGTERM')).toBe(0);
      await rxDone;
      const lines = got.trim().split('\n');
      expect(lines.indexOf('READY=1')).toBeGreaterThan(0);
      expect(lines.indexOf('STOPPING=1')).toBeGreaterThan(lines.indexOf('READY=1'));
      expect(got).toMatch(/STATUS=stopping: removing 1 device\(s\)/);
      expect(d.logs.find((l) => l.event === 'removed')?.device).toBe('n');
    });
  }
});

describe('peer credentials', () => {
  let dir: string;
  let uid: number;
  let gid: number;
  let ctlGid: number;
  beforeAll(() => {
    dir = tempDir('dmr-cred-');
    chmodSync(dir, 0o755);
    if (spawnSync('id', ['dmrtest']).status !== 0) execFileSync('useradd', ['-M', '-N', '-s', '/usr/sbin/nologin', 'dmrtest']);
    if (spawnSync('getent', ['group', 'dmrctl']).status !== 0) execFileSync('groupadd', ['dmrctl']);
    uid = Number(execFileSync('id', ['-u', 'dmrtest'], { encoding: 'utf8' }));
    gid = Number(execFileSync('id', ['-g', 'dmrtest'], { encoding: 'utf8' }));
    ctlGid = Number(execFileSync('getent', ['group', 'dmrctl'], { encoding: 'utf8' }).split(':')[2]);
  });
  afterAll(() => cleanup(dir));

  const asUser = (sock: string, groups: string, ...args: string[]) => runNode(REMAPCTL, ['--socket', sock, ...args], {
    wrap: ['setpriv', `--reuid=${uid}`, `--regid=${gid}`, ...(groups === '' ? ['--clear-groups'] : [`--groups=${groups}`])],
  });

  it('a non-root user cannot reach a 0600 socket (exit 6)', async () => {
    const d = await startDaemon(dir, { sock: join(dir, 'a', 'c.sock'), stateDir: join(dir, 's1') });
    const r = await asUser(d.sock, '', 'list');
    expect(r.code).toBe(6);
    expect(r.stderr).toMatch(/permission denied on the control socket/);
    expect(await d.stop()).toBe(0);
  });

  it('the daemon refuses a non-root peer outside the control group (PERMISSION_DENIED, disconnected) and accepts a member', async () => {
    const cfg = join(dir, 'cfg.json');
    // A world-writable socket on purpose: only SO_PEERCRED stands between the user and the daemon.
    writeFileSync(cfg, JSON.stringify({ controlGroup: 'dmrctl', controlSocketMode: '0666' }));
    const d = await startDaemon(dir, { sock: join(dir, 'b', 'c.sock'), stateDir: join(dir, 's2'), args: ['--config', cfg] });
    const r = await asUser(d.sock, '', 'list');
    expect(r.code).toBe(6);
    expect(r.stderr).toMatch(new RegExp(`uid ${uid} \\(gid ${gid}\\) may not control dm-remapd`));
    await d.waitLog((l) => l.event === 'control-refused' && l.uid === uid);
    const ok = await asUser(d.sock, String(ctlGid), 'list');
    expect(ok.stderr).toBe('');
    expect(ok.code).toBe(0);
    expect((await request(d.sock, 'ping')).ok).toBe(true);
    expect(await d.stop()).toBe(0);
  });
});
