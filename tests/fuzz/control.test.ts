/**
 * Control-socket fuzz (issue 5, "Bad input"): thousands of malformed request
 * lines from a seeded xorshift stream against one running daemon with one
 * device: invalid JSON, JSON of wrong types, unknown commands, missing /
 * extra / wrong-typed arguments of every real command, binary garbage, lines
 * split into random chunks, lines over and exactly at the 1 MiB limit,
 * unterminated lines followed by a close, and many concurrent connections.
 *
 * Every complete non-blank line gets exactly one answer, carrying its id when
 * it gave a valid one (else id null); every error has a stable code; the
 * daemon stays alive, keeps its device, answers `remapctl list` and logs no
 * fatal and no stack trace.
 *
 * DMR_FUZZ_SEED=N reproduces a run; DMR_FUZZ_LINES=N (default 6000) sets the
 * number of fuzzed lines.
 */
import { truncateSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cleanup, ctl, request, startDaemon, tempDir, type Daemon } from '../daemon/helpers.js';
import { Rng } from './rng.js';

const MAX = 1024 * 1024;
const CODES = new Set(['BAD_REQUEST', 'UNKNOWN_COMMAND', 'UNKNOWN_DEVICE', 'DEVICE_EXISTS', 'BUSY', 'NOT_FOUND', 'INVALID_ARGUMENT', 'NO_METADATA',
  'IDENTITY_MISMATCH', 'CORRUPT_METADATA', 'IO_ERROR', 'PERMISSION_DENIED', 'TIMEOUT', 'SHUTTING_DOWN', 'UNSUPPORTED', 'INTERNAL']);
/** Commands whose success on fuzzed arguments is harmless (read-only, or a remap of d0). */
const MAY_SUCCEED = new Set(['ping', 'list', 'status', 'remap']);


interface Line { bytes: Buffer; id: string | number | null; cmd: string | null }

const REAL_CMDS = ['ping', 'add', 'remove', 'list', 'status', 'remap'] as const;
const ARG_KEYS: Record<string, string[]> = {
  ping: ['x'],
  add: ['name', 'main', 'spare', 'spareTailBytes', 'format', 'blockSize', 'metadataTimeoutMs', 'allowIdentityChange', 'readOnly', 'nbdUnix', 'nbdTcp', 'description', 'ublk', 'nbdDevice'],
  remove: ['name', 'timeoutMs'],
  list: ['name', 'all'],
  status: ['name'],
  remap: ['name', 'blocks'],
};

function junkValue(r: Rng, depth = 0): unknown {
  switch (r.int(depth > 2 ? 14 : 17)) {
    case 0: return null;
    case 1: return true;
    case 2: return false;
    case 3: return r.pick([0, -1, 1, 1.5, -0.0, 4096, 512, 1000, 2 ** 53, -(2 ** 53), 1e308, -1e308, 3_600_001, Number.MAX_SAFE_INTEGER]);
    case 4: return r.int(1 << 30) - (1 << 29);
    case 5: return '';
    case 6: return r.pick(['d0', 'x', 'nope', '../evil', 'a/b', '.', '..', ' ', '\u0000', 'ünï©ødé', '🙂', 'd'.repeat(300)]);
    case 7: return r.pick(['/', '/nonexistent/main.img', '/proc/self/nope', 'relative.img', '/var/tmp/dmr-fuzz-nope/x', '//', '/\u00e9']);
    case 8: return r.pick(['localhost', 'localhost:99999', ':', '[::1]:0', 'host:-1', '127.0.0.1:abc']);
    case 9: return r.pick(['1M', '12Q', '-5', 'NaN', 'Infinity', '0x10', '1e3']);
    case 10: return String.fromCharCode(...Array.from({ length: r.int(12) }, () => r.int(0xd7ff) + 1));
    case 11: return r.pick(['__proto__', 'constructor', 'toString', 'hasOwnProperty']);
    case 12: return r.int(100);
    case 13: return [r.int(10), -1];
    case 14: return Array.from({ length: r.int(4) }, () => junkValue(r, depth + 1));
    case 15: {
      const o: Record<string, unknown> = {};
      for (let i = r.int(4); i > 0; i--) o[r.pick(['a', 'name', '__proto__', 'blocks', 'x'])] = junkValue(r, depth + 1);
      return o;
    }
    default: return { nested: [junkValue(r, depth + 1), { deeper: junkValue(r, depth + 1) }] };
  }
}

function garbage(r: Rng, n: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) {
    let c = r.int(256);
    if (c === 0x0a) c = 0x0b;
    b[i] = c;
  }
  return b;
}

/** One fuzzed line (without its newline) and the id its answer must carry. */
function fuzzLine(r: Rng, seq: number): Line {
  const withId = r.chance(0.85);
  const id: string | number = r.chance(0.5) ? seq : `s${seq}`;
  const kind = r.int(100);
  if (kind < 10) {
    // Invalid JSON: truncated, garbage, binary.
    const good = JSON.stringify({ id, cmd: r.pick(REAL_CMDS), args: { name: 'd0' } });
    const variants = [good.slice(0, 1 + r.int(good.length - 1)), `{not json ${seq}`, '{"id":1,,}', 'undefined', "{'id':1}", `${good}}`, `{"id":${seq},"cmd":"ping"`];
    return { bytes: r.chance(0.3) ? garbage(r, 1 + r.int(200)) : Buffer.from(r.pick(variants)), id: null, cmd: null };
  }
  if (kind < 18) {
    // Valid JSON that is not an object.
    const v = r.pick([[1, 2, 3], 42, '"str"', null, true, [{ id, cmd: 'ping' }]]);
    return { bytes: Buffer.from(typeof v === 'string' ? v : JSON.stringify(v)), id: null, cmd: null };
  }
  if (kind < 24) {
    // A mistyped id: answered with id null.
    const badId = r.pick<unknown>([{ x: 1 }, [1], true, false, { id }]);
    return { bytes: Buffer.from(JSON.stringify({ id: badId, cmd: r.pick(REAL_CMDS) })), id: null, cmd: null };
  }
  const req: Record<string, unknown> = {};
  if (withId) req.id = id;
  let cmd: string | null = null;
  if (kind < 32) {
    req.cmd = junkValue(r); // wrong-typed or unknown cmd
    cmd = typeof req.cmd === 'string' ? req.cmd : null;
  } else if (kind < 36) {
    cmd = r.pick(['frobnicate', 'PING', 'add ', '', 'inspect', 'shutdown', '__proto__', 'constructor']);
    req.cmd = cmd;
  } else if (kind < 44) {
    // Well-typed requests that must fail deeper down (missing paths, unknown devices, out-of-range blocks).
    const v = r.int(5);
    if (v === 0) { cmd = 'add'; req.args = { name: `f${seq}`, main: `/var/tmp/dmr-fuzz-nope/${seq}.img`, spareTailBytes: 1 << 20, format: true }; }
    else if (v === 1) { cmd = 'add'; req.args = { name: `f${seq}`, main: '/', spare: '/nonexistent', blockSize: 512 }; }
    else if (v === 2) { cmd = 'remove'; req.args = { name: `gone${seq}`, timeoutMs: r.int(1000) }; }
    else if (v === 3) { cmd = 'remap'; req.args = { name: 'd0', blocks: [Number.MAX_SAFE_INTEGER - r.int(10), 2 ** 40] }; }
    else { cmd = 'status'; req.args = { name: `gone${seq}` }; }
    req.cmd = cmd;
  } else {
    cmd = r.pick(REAL_CMDS);
    req.cmd = cmd;
    if (r.chance(0.1)) {
      req.args = r.pick<unknown>([[], 'x', 5, true, [{ name: 'd0' }]]); // args not an object
    } else if (!r.chance(0.05)) {
      const args: Record<string, unknown> = {};
      for (const k of ARG_KEYS[cmd]) if (r.chance(0.5)) args[k] = junkValue(r);
      if (r.chance(0.2)) args[r.pick(['extra', 'pad', 'zzz', '__proto__'])] = junkValue(r);
      // Never remove or re-add the device the test keeps.
      if ((cmd === 'remove' || cmd === 'add') && args.name === 'd0') args.name = 'not-d0';
      req.args = args;
    }
  }
  if (r.chance(0.05)) req.extraTop = junkValue(r);
  return { bytes: Buffer.from(JSON.stringify(req)), id: withId ? id : null, cmd };
}

interface Answer { id?: unknown; ok?: unknown; result?: unknown; error?: { code?: unknown; message?: unknown } }

/** Sends `lines` on one connection in random chunks; resolves with `expect` answers. */
function converse(sock: string, r: Rng, payload: Buffer, expectCount: number, timeoutMs = 15_000): Promise<Answer[]> {
  return new Promise((res, rej) => {
    const s = connect(sock);
    const out: Answer[] = [];
    let buf = '';
    const t = setTimeout(() => { s.destroy(); rej(new Error(`only ${out.length}/${expectCount} answers within ${timeoutMs} ms`)); }, timeoutMs);
    const done = (): void => { clearTimeout(t); s.destroy(); res(out); };
    s.setEncoding('utf8');
    s.on('connect', () => {
      // Random chunking exercises the line reassembly.
      let off = 0;
      while (off < payload.length) {
        const n = 1 + r.int(r.chance(0.5) ? 64 : 65536);
        s.write(payload.subarray(off, off + n));
        off += n;
      }
      if (expectCount === 0) s.end();
    });
    s.on('data', (c: string) => {
      buf += c;
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        out.push(JSON.parse(buf.slice(0, nl)) as Answer);
        buf = buf.slice(nl + 1);
      }
      if (out.length >= expectCount && expectCount > 0) done();
    });
    s.on('error', (e) => { clearTimeout(t); rej(e); });
    s.on('close', () => done());
  });
}

function isBlank(b: Buffer): boolean {
  return b.toString('utf8').trim() === '';
}

function check(lines: Line[], answers: Answer[], stats: { ok: number; codes: Map<string, number> }): void {
  const expected = lines.filter((l) => !isBlank(l.bytes));
  expect(answers.length, 'one answer per complete line').toBe(expected.length);
  const wantIds = new Map<string | number, Line>();
  for (const l of expected) if (l.id !== null) wantIds.set(l.id, l);
  const seen = new Set<string | number>();
  let nullIds = 0;
  let nullOkBudget = expected.filter((l) => l.id === null && MAY_SUCCEED.has(l.cmd ?? '')).length;
  for (const a of answers) {
    if (a.ok === true) {
      stats.ok++;
      if (a.id === null) {
        // A request without an id that was served: only a harmless command may be.
        nullOkBudget--;
        expect(nullOkBudget, `more id-less ok answers than id-less harmless requests: ${JSON.stringify(a).slice(0, 300)}`).toBeGreaterThanOrEqual(0);
      } else {
        const l = typeof a.id === 'string' || typeof a.id === 'number' ? wantIds.get(a.id) : undefined;
        expect(l, `ok answer to an unknown id: ${JSON.stringify(a).slice(0, 300)}`).toBeDefined();
        expect(MAY_SUCCEED.has(l?.cmd ?? ''), `ok:true for ${l?.bytes.toString().slice(0, 300)}`).toBe(true);
      }
    } else {
      expect(a.ok).toBe(false);
      const code = String(a.error?.code);
      expect(CODES.has(code), `unstable code ${code}: ${JSON.stringify(a).slice(0, 300)}`).toBe(true);
      expect(typeof a.error?.message).toBe('string');
      stats.codes.set(code, (stats.codes.get(code) ?? 0) + 1);
    }
    if (a.id === null) nullIds++;
    else {
      expect(typeof a.id === 'string' || typeof a.id === 'number').toBe(true);
      const k = a.id as string | number;
      expect(wantIds.has(k), `answer with an id nobody sent: ${String(k)}`).toBe(true);
      expect(seen.has(k), `two answers for id ${String(k)}`).toBe(false);
      seen.add(k);
    }
  }
  expect(seen.size).toBe(wantIds.size);
  expect(nullIds).toBe(expected.length - wantIds.size);
}

describe('control-socket fuzz', () => {
  let dir: string;
  let d: Daemon;
  const seed = process.env.DMR_FUZZ_SEED !== undefined ? Number(process.env.DMR_FUZZ_SEED) >>> 0 : (Date.now() ^ (process.pid << 16)) >>> 0;
  const total = Number(process.env.DMR_FUZZ_LINES ?? 6000);
  const r = new Rng(seed);
  const stats = { ok: 0, codes: new Map<string, number>() };
  let sent = 0;
  let bytes = 0;
  const t0 = Date.now();

  beforeAll(async () => {
    console.log(`control fuzz seed=${seed} (DMR_FUZZ_SEED=${seed} to reproduce)`);
    dir = tempDir('dmr-fuzz-ctl-');
    const main = join(dir, 'main.img');
    writeFileSync(main, '');
    truncateSync(main, 16 << 20);
    d = await startDaemon(dir);
    const add = await ctl(d.sock, 'add', 'd0', '--main', main, '--spare-tail', '2M', '--format');
    expect(add.code, add.stderr).toBe(0);
  });
  afterAll(async () => {
    if (d !== undefined) expect(await d.stop()).toBe(0);
    if (dir !== undefined) cleanup(dir);
  });

  it(`answers every malformed line once, with its id and a stable code (seed printed)`, async () => {
    const conns = 4;
    const per = Math.ceil(total / conns);
    let seq = 0;
    const jobs: Array<Promise<void>> = [];
    for (let c = 0; c < conns; c++) {
      const lines: Line[] = [];
      for (let i = 0; i < per; i++) lines.push(fuzzLine(r, seq++));
      const payload = Buffer.concat(lines.flatMap((l) => [l.bytes, Buffer.from('\n')]));
      sent += lines.length;
      bytes += payload.length;
      const expectCount = lines.filter((l) => !isBlank(l.bytes)).length;
      const cr = new Rng(r.u32());
      jobs.push(converse(d.sock, cr, payload, expectCount).then((answers) => check(lines, answers, stats)));
    }
    await Promise.all(jobs);
    expect(d.proc.exitCode).toBeNull();
  });

  it('lines over, at and just under the 1 MiB limit; huge junk; the connection stays usable', async () => {
    const ping = (id: number, len: number): Buffer => {
      const head = `{"id":${id},"cmd":"ping","args":{"pad":"`;
      const tail = '"}}';
      return Buffer.from(head + 'x'.repeat(len - head.length - tail.length) + tail);
    };
    const lines: Line[] = [
      { bytes: ping(1, MAX), id: 1, cmd: 'ping' }, // exactly the limit: served
      { bytes: ping(2, MAX - 1), id: 2, cmd: 'ping' },
      { bytes: ping(3, MAX + 1), id: null, cmd: null }, // one byte over: id null
      { bytes: ping(4, 3 * MAX), id: null, cmd: null },
      { bytes: garbage(r, MAX + 17), id: null, cmd: null },
      { bytes: Buffer.from(JSON.stringify({ id: 5, cmd: 'status', args: { name: 'd0' } })), id: 5, cmd: 'status' },
      { bytes: Buffer.from(`{"id":6,"cmd":"frobnicate","args":{"pad":"${'é'.repeat(MAX / 2 - 40)}"}}`), id: 6, cmd: 'frobnicate' }, // multi-byte, just under
    ];
    const payload = Buffer.concat(lines.flatMap((l) => [l.bytes, Buffer.from('\n')]));
    sent += lines.length;
    bytes += payload.length;
    const answers = await converse(d.sock, new Rng(r.u32()), payload, lines.length, 20_000);
    check(lines, answers, stats);
    const byId = new Map(answers.map((a) => [a.id, a]));
    expect(byId.get(1)?.ok).toBe(true);
    expect(byId.get(2)?.ok).toBe(true);
    expect(byId.get(5)?.ok).toBe(true);
    expect(byId.get(6)?.error?.code).toBe('UNKNOWN_COMMAND');
    expect(answers.filter((a) => a.id === null && /exceeds the limit of 1048576/.test(String(a.error?.message)))).toHaveLength(3);
  });

  it('unterminated lines then close, and many concurrent connections', async () => {
    // Lines without a newline, then the writer closes: nothing to answer, nothing breaks.
    const partial: Array<Promise<Answer[]>> = [];
    for (let i = 0; i < 40; i++) {
      const l = fuzzLine(r, 100_000 + i).bytes;
      const junk = i % 4 === 0 ? Buffer.concat([l, garbage(r, r.int(MAX + MAX / 2))]) : l;
      partial.push(converse(d.sock, new Rng(r.u32()), junk, 0));
      sent++;
      bytes += junk.length;
    }
    const partialAnswers = await Promise.all(partial);
    // An unterminated line over the limit is answered (once); shorter ones are not.
    for (const a of partialAnswers.flat()) expect(a).toMatchObject({ id: null, ok: false, error: { code: 'BAD_REQUEST' } });
    expect(partialAnswers.every((a) => a.length <= 1)).toBe(true);

    // 64 connections at once, 25 lines each.
    const jobs: Array<Promise<void>> = [];
    let seq = 200_000;
    for (let c = 0; c < 64; c++) {
      const lines: Line[] = [];
      for (let i = 0; i < 25; i++) lines.push(fuzzLine(r, seq++));
      lines.push({ bytes: Buffer.from(JSON.stringify({ id: `last${c}`, cmd: 'ping' })), id: `last${c}`, cmd: 'ping' });
      const payload = Buffer.concat(lines.flatMap((l) => [l.bytes, Buffer.from('\n')]));
      sent += lines.length;
      bytes += payload.length;
      const n = lines.filter((l) => !isBlank(l.bytes)).length;
      jobs.push(converse(d.sock, new Rng(r.u32()), payload, n).then((a) => check(lines, a, stats)));
    }
    await Promise.all(jobs);
  });

  it('the daemon is alive, keeps d0, answers remapctl list and logged no fatal', async () => {
    expect(d.proc.exitCode).toBeNull();
    expect(d.proc.signalCode).toBeNull();
    expect((await request(d.sock, 'ping')).ok).toBe(true);
    const list = await ctl(d.sock, '--json', 'list');
    expect(list.code, list.stderr).toBe(0);
    const devs = JSON.parse(list.stdout) as Array<{ name: string; state: string }>;
    expect(devs.map((x) => [x.name, x.state])).toEqual([['d0', 'running']]);
    const fatal = d.logs.filter((l) => l.level >= 60 || l.msg.startsWith('NON-JSON'));
    expect(fatal, JSON.stringify(fatal.slice(0, 5))).toEqual([]);
    expect(d.stderr).not.toMatch(/^\s+at |TypeError|RangeError|ReferenceError/m);
    const errors = d.logs.filter((l) => l.level >= 50).length;
    const codes = [...stats.codes.entries()].sort((a, b) => b[1] - a[1]).map(([c, n]) => `${c}=${n}`).join(' ');
    console.log(`control fuzz seed=${seed}: ${sent} lines (${(bytes / 1048576).toFixed(1)} MiB) sent, ${stats.ok} ok, errors by code: ${codes}; `
      + `daemon error-level log lines: ${errors}; elapsed ${Date.now() - t0} ms`);
  });
});
