/**
 * remapctl argument fuzz (issue 5, "Bad input"): random argv drawn from the
 * real commands and options mixed with garbage values (negative and huge
 * numbers, empty strings, unicode, missing values, unknown flags, bad size
 * suffixes, paths that do not exist), run against a daemon with one device,
 * in parallel batches of 8.
 *
 * Every run exits with a documented code (0-8), never prints a Node stack
 * trace, and the daemon keeps its device. `remove d0`, `--nbd-device` and
 * `--ublk` are never generated: the first would legitimately remove the
 * device, the others attach real kernel devices.
 *
 * DMR_FUZZ_SEED=N reproduces a run; DMR_CLI_FUZZ_RUNS=N (default 160).
 */
import { truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cleanup, ctl, startDaemon, tempDir, type CtlResult, type Daemon } from '../daemon/helpers.js';
import { Rng } from './rng.js';


const GARBAGE = ['', ' ', '-1', '0', '1', '-0', '4096', '512', '1000', '12Q', '1M', '1.5G', '99999999999999999999', '9007199254740993', '1e9', 'NaN', 'Infinity',
  '0x10', '--', '-', 'ünï©ødé', '🙂🙂', '\u202e', 'a'.repeat(5000), '../evil', 'localhost', 'localhost:99999', '[::1]:0', ':0', '/nonexistent/x.img',
  'relative/nope.img', '/', '/proc/self/nope', '%s%n', '$(echo x)', 'd0', 'd1', '--json', '-h'];
const OPTS = ['--main', '--spare', '--spare-tail', '--format', '--block-size', '--nbd-unix', '--nbd-tcp', '--metadata-timeout', '--allow-identity-change',
  '--timeout', '--json', '--socket', '--bogus', '-x', '--help', '--version', '--main=', '--spare-tail=12Q'];

function argv(r: Rng, sock: string, main: string): string[] {
  const cmd = r.pick(['add', 'remove', 'list', 'status', 'remap', 'inspect', 'frobnicate', '', 'ADD', '--json']);
  const a: string[] = [];
  if (r.chance(0.9)) a.push('--socket', r.chance(0.9) ? sock : r.pick(['/nonexistent/sock', '', 'rel.sock', main]));
  if (r.chance(0.3)) a.push('--json');
  a.push(cmd);
  const pos = (): string => r.chance(0.5) ? r.pick(['d0', 'd1', 'x', '']) : r.pick(GARBAGE);
  if (r.chance(0.8)) a.push(pos());
  if (cmd === 'remap') for (let i = r.int(4); i > 0; i--) a.push(r.pick(['0', '1', '-1', '18446744073709551616', 'twelve', '3.5', '1e3', String(r.int(4000))]));
  if (cmd === 'inspect' && r.chance(0.5)) a.push(r.pick([main, '/nonexistent/spare.img', '/']));
  for (let i = r.int(5); i > 0; i--) {
    const o = r.pick(OPTS);
    a.push(o);
    if (r.chance(0.85)) {
      if (o === '--main' && r.chance(0.3)) a.push(main); // busy: d0's main
      else a.push(r.pick(GARBAGE));
    }
  }
  // Never remove the device the test keeps.
  if (a.includes('remove') && a.includes('d0')) return a.map((x) => (x === 'd0' ? 'd9' : x));
  return a;
}

describe('remapctl argument fuzz', () => {
  let dir: string;
  let d: Daemon;
  let main: string;
  const seed = process.env.DMR_FUZZ_SEED !== undefined ? Number(process.env.DMR_FUZZ_SEED) >>> 0 : (Date.now() ^ (process.pid << 16)) >>> 0;
  const runs = Number(process.env.DMR_CLI_FUZZ_RUNS ?? 160);

  beforeAll(async () => {
    console.log(`cli fuzz seed=${seed} (DMR_FUZZ_SEED=${seed} to reproduce)`);
    dir = tempDir('dmr-fuzz-cli-');
    main = join(dir, 'main.img');
    writeFileSync(main, '');
    truncateSync(main, 16 << 20);
    d = await startDaemon(dir);
    const add = await ctl(d.sock, 'add', 'd0', '--main', main, '--spare-tail', '2M', '--format', '--nbd-unix', join(dir, 'd0.nbd'));
    expect(add.code, add.stderr).toBe(0);
  });
  afterAll(async () => {
    if (d !== undefined) expect(await d.stop()).toBe(0);
    if (dir !== undefined) cleanup(dir);
  });

  it('exits 0-8 without a stack trace, and the daemon keeps d0', async () => {
    const r = new Rng(seed);
    const t0 = Date.now();
    const byCode = new Map<number, number>();
    const bad: string[] = [];
    for (let done = 0; done < runs; done += 8) {
      const batch = Array.from({ length: Math.min(8, runs - done) }, () => argv(r, d.sock, main));
      const results: CtlResult[] = await Promise.all(batch.map((a) => ctl(null, ...a)));
      results.forEach((res, i) => {
        const code = res.code ?? -1;
        byCode.set(code, (byCode.get(code) ?? 0) + 1);
        const shown = JSON.stringify(batch[i]).slice(0, 300);
        if (code < 0 || code > 8) bad.push(`exit ${code}: ${shown}\n${res.stderr.slice(0, 500)}`);
        if (/^\s+at |TypeError|RangeError|ReferenceError|internal error/m.test(res.stderr)) bad.push(`stack trace: ${shown}\n${res.stderr.slice(0, 1000)}`);
      });
    }
    expect(bad, bad.join('\n---\n')).toEqual([]);
    expect(d.proc.exitCode).toBeNull();
    const list = await ctl(d.sock, '--json', 'list');
    expect(list.code, list.stderr).toBe(0);
    const devs = JSON.parse(list.stdout) as Array<{ name: string; state: string }>;
    expect(devs.filter((x) => x.name === 'd0').map((x) => x.state)).toEqual(['running']);
    expect(d.logs.filter((l) => l.level >= 60)).toEqual([]);
    const codes = [...byCode.entries()].sort((a, b) => a[0] - b[0]).map(([c, n]) => `${c}:${n}`).join(' ');
    console.log(`cli fuzz seed=${seed}: ${runs} runs, exit codes ${codes}; devices after: ${devs.map((x) => x.name).join(',')}; elapsed ${Date.now() - t0} ms`);
  });
});
