/**
 * Config-file errors (issue 5, "Bad input"): the daemon started with broken
 * config files (invalid JSON, not an object, unknown key, a wrong type or
 * value for every key), a state folder that is a file, and control sockets
 * that cannot be created. Each exits within a few seconds with the
 * documented code (2 for a config error, 1 for other start failures), a
 * message naming the key or the path, no stack trace, and no socket left
 * behind.
 */
import { existsSync, mkdirSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DAEMON, cleanup, requireBuild, runNode, tempDir } from '../daemon/helpers.js';

interface Case {
  name: string;
  /** Config file text, or an object to serialize (stateDir/controlSocket default to temp paths). */
  config: string | Record<string, unknown>;
  code: number;
  message: RegExp;
  /** Where the socket would be (checked absent afterwards). */
  sock?: string;
}

describe('config-file errors', () => {
  let dir: string;
  beforeAll(() => {
    requireBuild();
    dir = tempDir('dmr-fuzz-cfg-');
  });
  afterAll(() => {
    if (dir !== undefined) cleanup(dir);
  });

  it('each broken config exits 2 (or 1) quickly, names the key or path, leaves no socket', async () => {
    const run = join(dir, 'run');
    const sock = join(run, 'control.sock');
    const state = join(dir, 'state');
    const aFile = join(dir, 'a-file');
    writeFileSync(aFile, 'not a folder\n');
    const base = { stateDir: state, controlSocket: sock };
    const wrong: Array<[string, unknown]> = [
      ['stateDir', 5], ['stateDir', ''], ['stateDir', 'relative/state'], ['stateDir', null], ['stateDir', ['/x']],
      ['controlSocket', false], ['controlSocket', 'control.sock'], ['controlSocket', {}],
      ['controlGroup', -1], ['controlGroup', ''], ['controlGroup', { name: 'x' }], ['controlGroup', 1.5],
      ['controlSocketMode', '0400'], ['controlSocketMode', 'rw'], ['controlSocketMode', 0o1600], ['controlSocketMode', true], ['controlSocketMode', '0o600'],
      ['logLevel', 'loud'], ['logLevel', 3], ['logLevel', ''],
      ['metadataTimeoutMs', 0], ['metadataTimeoutMs', '5000'], ['metadataTimeoutMs', 1.5], ['metadataTimeoutMs', 3_600_001], ['metadataTimeoutMs', null],
      ['shutdownTimeoutMs', -1], ['shutdownTimeoutMs', 1e308], ['shutdownTimeoutMs', false],
    ];
    const cases: Case[] = [
      { name: 'invalid JSON', config: '{"stateDir": "/x",', code: 2, message: /config file .*cfg-0\.json is not valid JSON/ },
      { name: 'empty file', config: '', code: 2, message: /is not valid JSON/ },
      { name: 'binary', config: '\u0000\u00ff\ufffd{', code: 2, message: /is not valid JSON/ },
      { name: 'array', config: '[{"stateDir": "/x"}]', code: 2, message: /must hold a JSON object/ },
      { name: 'number', config: '42', code: 2, message: /must hold a JSON object/ },
      { name: 'null', config: 'null', code: 2, message: /must hold a JSON object/ },
      { name: 'unknown key', config: { ...base, stateDirectory: '/x' }, code: 2, message: /unknown key "stateDirectory"/ },
      { name: 'unknown key __proto__', config: `{"stateDir": ${JSON.stringify(state)}, "__proto__": {"x": 1}}`, code: 2, message: /unknown key "__proto__"/ },
      ...wrong.map(([k, v]): Case => ({ name: `${k}=${JSON.stringify(v)}`, config: { ...base, [k]: v }, code: 2, message: new RegExp(`"${k}" must be`) })),
      { name: 'no such group', config: { ...base, controlGroup: 'dmr-no-such-group' }, code: 2, message: /no group named "dmr-no-such-group"/ },
      { name: 'state dir is a file', config: { ...base, stateDir: aFile }, code: 1, message: new RegExp(`cannot start: .*${aFile}`) },
      { name: 'state dir under a file', config: { ...base, stateDir: join(aFile, 'state') }, code: 1, message: new RegExp(`cannot start: .*${aFile}`) },
      // Node 20's recursive mkdir loops forever on ENOENT from an existing parent (/proc): the daemon hung, burning CPU, until src/daemon/mkdir.ts.
      { name: 'state dir in /proc', config: { ...base, stateDir: '/proc/dmr-fuzz-nope/state' }, code: 1, message: /cannot start: .*\/proc\/dmr-fuzz-nope/ },
      { name: 'socket folder under a file', config: { ...base, controlSocket: join(aFile, 'run', 'c.sock') }, code: 1, message: new RegExp(`cannot listen on ${aFile}/run/c\\.sock`), sock: join(aFile, 'run', 'c.sock') },
      { name: 'socket folder in /proc', config: { ...base, controlSocket: '/proc/dmr-fuzz-nope/c.sock' }, code: 1, message: /cannot listen on \/proc\/dmr-fuzz-nope\/c\.sock/, sock: '/proc/dmr-fuzz-nope/c.sock' },
      { name: 'socket path too long for sun_path', config: { ...base, controlSocket: join(run, 'x'.repeat(120) + '.sock') }, code: 1, message: /cannot listen on .*xxxx\.sock/, sock: join(run, 'x'.repeat(120) + '.sock') },
    ];
    const t0 = Date.now();
    const figures: string[] = [];
    // Run 8 at a time.
    for (let i = 0; i < cases.length; i += 8) {
      await Promise.all(cases.slice(i, i + 8).map(async (c, j) => {
        const file = join(dir, `cfg-${i + j}.json`);
        writeFileSync(file, typeof c.config === 'string' ? c.config : JSON.stringify(c.config));
        const env: Record<string, string> = { DM_REMAPD_SOCKET: '' };
        const r = await runNode(DAEMON, ['--config', file], { env });
        const out = (r.stdout + r.stderr).replace(/\\"/g, '"'); // pino escapes quotes in its JSON lines
        expect(r.code, `${c.name}: ${out}`).toBe(c.code);
        expect(out, c.name).toMatch(c.message);
        if (c.code === 2) expect(r.stderr, c.name).toMatch(/^dm-remapd: /);
        expect(out, c.name).not.toMatch(/^\s+at |TypeError|RangeError|dm-remapd: fatal/m);
        expect(r.ms, c.name).toBeLessThan(5000);
        expect(existsSync(c.sock ?? sock), `${c.name}: socket left behind`).toBe(false);
        figures.push(`${r.ms}`);
      }));
    }
    // Nothing listens and nothing was left in the socket folder by any case.
    expect(existsSync(run) ? readdirSync(run) : [], `left in ${run}`).toEqual([]);
    const ms = figures.map(Number).sort((a, b) => a - b);
    console.log(`config errors: ${cases.length} broken configs, each exited 1/2 with the key or path named, no socket left; `
      + `per start ${ms[0]}-${ms[ms.length - 1]} ms; elapsed ${Date.now() - t0} ms`);
  });

  it('a config that points the socket at an existing folder-free path still starts (control case)', async () => {
    const state = join(dir, 'ok-state');
    const run = join(dir, 'ok-run');
    mkdirSync(run);
    const file = join(dir, 'ok.json');
    writeFileSync(file, JSON.stringify({ stateDir: state, controlSocket: join(run, 'c.sock'), logLevel: 'warn', metadataTimeoutMs: 1000, shutdownTimeoutMs: 1000, controlSocketMode: '0600' }));
    // --version exits before anything starts; the config is only parsed when running, so check with a quick start/stop instead.
    const { startDaemon } = await import('../daemon/helpers.js');
    const d = await startDaemon(dir, { args: ['--config', file, '--log-level', 'info'], stateDir: state, sock: join(run, 'c.sock') });
    expect(existsSync(join(run, 'c.sock'))).toBe(true);
    expect(await d.stop()).toBe(0);
    expect(existsSync(join(run, 'c.sock'))).toBe(false);
  });

  it('a control socket path that names an existing regular file is refused, and the file is kept', async () => {
    const file = join(dir, 'precious.txt');
    writeFileSync(file, 'keep me');
    const r = await runNode(DAEMON, ['--state-dir', join(dir, 'precious-state'), '--control-socket', file]);
    expect(r.code).toBe(1);
    expect(r.stdout + r.stderr).toMatch(/exists and is not a socket; refusing to replace it/);
    const { readFileSync } = await import('node:fs');
    expect(readFileSync(file, 'utf8')).toBe('keep me');
  });
});
