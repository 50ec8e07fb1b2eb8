/**
 * bench/nbd-ceiling.c, the ceiling peer of `npm run bench:nbd`: compiled
 * here with the bench's own command line, then driven by real clients
 * (libnbd from python, qemu-io) on a 64 MiB file: random 4 KiB writes with
 * 32 in flight (some FUA), a 1 MiB and an 8 MiB write (bigger than its
 * receive buffer), two connections at once, read-back compared with a model
 * and with the file itself, flush, and errors (past the end, misaligned for
 * O_DIRECT) that come back as errors, not hangs. Skipped, saying why, when
 * gcc or the liburing headers are missing.
 */
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { execFile, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { tryConnect } from '../../bench/nbd-servers.js';

const SRC = join(fileURLToPath(new URL('.', import.meta.url)), '..', '..', 'bench', 'nbd-ceiling.c');
const PYTHON = '/usr/bin/python3';
const SIZE = 64 * 1024 * 1024;

function have(tool: string): boolean {
  return ['/usr/bin', '/usr/local/bin', '/bin'].some((d) => existsSync(join(d, tool)));
}
const pythonNbd = existsSync(PYTHON) && spawnSync(PYTHON, ['-c', 'import nbd'], { stdio: 'ignore' }).status === 0;
const missing = [
  ...(have('gcc') ? [] : ['gcc (build-essential)']),
  ...(existsSync('/usr/include/liburing.h') ? [] : ['liburing headers (liburing-dev)']),
  ...(pythonNbd ? [] : ['python3 libnbd bindings (python3-libnbd)']),
  ...(have('qemu-io') ? [] : ['qemu-io (qemu-utils)']),
];
if (missing.length > 0) console.warn(`nbd-ceiling tests skipped: missing ${missing.join(', ')}`);

function run(cmd: string, args: string[], timeoutMs = 20_000): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(cmd, args, { timeout: timeoutMs, maxBuffer: 16 * 1024 * 1024, encoding: 'utf8' }, (err, stdout, stderr) => {
      const code = err === null ? 0 : typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : 1;
      resolve({ code, stdout, stderr });
    });
  });
}

function exited(c: ChildProcess): boolean {
  return c.exitCode !== null || c.signalCode !== null;
}

function childrenOf(pid: number): number[] {
  try {
    return readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter((x) => x !== '').map(Number);
  } catch {
    return [];
  }
}

/** Running (a zombie waiting for its new parent to reap it counts as gone). */
function alive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

async function until(what: string, cond: () => boolean | Promise<boolean>, ms = 5000): Promise<void> {
  const t0 = Date.now();
  while (!(await cond())) {
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** libnbd from python: random writes, big writes, two connections, read-back, flush, errors. Prints one JSON line. */
const CLIENT_PY = String.raw`
import nbd, json, random, errno, sys
URI, FILE, MODEL, SEED = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
B = 4096
MiB = 1 << 20
r = {}
h = nbd.NBD()
h.connect_uri(URI)
size = h.get_size()
r.update(size=size, can_flush=h.can_flush(), can_fua=h.can_fua(), can_trim=h.can_trim(), can_zero=h.can_zero(),
         structured=h.get_structured_replies_negotiated(), protocol=h.get_protocol(),
         block_min=h.get_block_size(nbd.SIZE_MINIMUM), block_max=h.get_block_size(nbd.SIZE_MAXIMUM))
with open(FILE, 'rb') as f:
    model = bytearray(f.read())
rng = random.Random(SEED)

def wait_below(n):
    while h.aio_in_flight() > n:
        h.poll(-1)

# 1500 random 4 KiB writes to distinct blocks, up to 32 in flight, every 7th with FUA.
cookies = []
for i, blk in enumerate(rng.sample(range(size // B), 1500)):
    data = rng.randbytes(B)
    model[blk * B:(blk + 1) * B] = data
    buf = nbd.Buffer.from_bytearray(bytearray(data))
    cookies.append((h.aio_pwrite(buf, blk * B, flags=nbd.CMD_FLAG_FUA if i % 7 == 0 else 0), buf))
    wait_below(31)
wait_below(0)
r['writes_ok'] = all(h.aio_command_completed(c) for c, _ in cookies)

# One 1 MiB write and one 8 MiB write (more than the server's 4 MiB receive buffer).
for off, n in ((5 * MiB + 3 * B, MiB), (20 * MiB, 8 * MiB)):
    data = rng.randbytes(n)
    model[off:off + n] = data
    h.pwrite(data, off)

# A second connection at the same time: it writes, the first reads it back after its flush.
h2 = nbd.NBD()
h2.connect_uri(URI)
data = rng.randbytes(64 * 1024)
model[40 * MiB:40 * MiB + len(data)] = data
h2.pwrite(data, 40 * MiB, nbd.CMD_FLAG_FUA)
h2.flush()
r['second_conn_seen'] = h.pread(len(data), 40 * MiB) == data
h2.shutdown()

# Random 4 KiB reads, 32 in flight, compared with the model.
reads = []
for blk in [rng.randrange(size // B) for _ in range(1000)]:
    buf = nbd.Buffer(B)
    reads.append((h.aio_pread(buf, blk * B), buf, blk))
    wait_below(31)
wait_below(0)
r['random_reads_match'] = all(h.aio_command_completed(c) and buf.to_bytearray() == model[blk * B:(blk + 1) * B] for c, buf, blk in reads)

# The whole image in 1 MiB reads, 8 in flight.
big = []
for off in range(0, size, MiB):
    buf = nbd.Buffer(MiB)
    big.append((h.aio_pread(buf, off), buf, off))
    wait_below(7)
wait_below(0)
r['full_read_match'] = all(h.aio_command_completed(c) and buf.to_bytearray() == model[off:off + MiB] for c, buf, off in big)
r['mismatched_mib'] = [off // MiB for c, buf, off in big if buf.to_bytearray() != model[off:off + MiB]]

h.flush()
r['flushed'] = True

def err_of(fn, *a):
    try:
        fn(*a)
        return None
    except nbd.Error as e:
        return errno.errorcode.get(e.errnum, str(e.errnum))

h.set_strict_mode(0)
r['read_beyond_size'] = err_of(h.pread, B, size)
r['read_across_end'] = err_of(h.pread, 2 * B, size - B)
r['write_beyond_size'] = err_of(h.pwrite, bytes(B), size)
r['write_across_end'] = err_of(h.pwrite, bytes(2 * B), size - B)
r['read_misaligned'] = err_of(h.pread, B, 100)
r['still_serving'] = h.pread(B, 0) == model[0:B]
h.shutdown()
with open(MODEL, 'wb') as f:
    f.write(model)
print(json.dumps(r))
`;

describe.skipIf(missing.length > 0)('bench/nbd-ceiling.c (the ceiling peer of bench:nbd)', () => {
  const dir = mkdtempSync('/var/tmp/nbd-ceiling-test-'); // a real disk: O_DIRECT fails on tmpfs
  const bin = join(dir, 'nbd-ceiling');
  const file = join(dir, 'disk.img');
  let server: ChildProcess | null = null;
  let serverLog = '';

  async function start(spin: boolean): Promise<{ c: ChildProcess; uri: string; sock: string }> {
    const sock = join(dir, spin ? 'spin.sock' : 'sleep.sock');
    serverLog = '';
    const c = spawn(bin, [sock, file, ...(spin ? ['--spin'] : [])], { stdio: ['ignore', 'pipe', 'pipe'] });
    c.stdout?.on('data', (d: Buffer) => (serverLog += d.toString()));
    c.stderr?.on('data', (d: Buffer) => (serverLog += d.toString()));
    server = c;
    await until('the server to listen', async () => {
      if (exited(c)) throw new Error(`nbd-ceiling exited: ${serverLog}`);
      return existsSync(sock) && tryConnect(sock);
    });
    return { c, sock, uri: `nbd+unix:///?socket=${sock}` };
  }

  async function stop(c: ChildProcess): Promise<void> {
    if (exited(c)) return;
    c.kill('SIGTERM');
    await until('the server to exit', () => exited(c), 3000).catch(() => c.kill('SIGKILL'));
  }

  afterEach(async () => {
    if (server !== null) await stop(server);
    server = null;
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('compiles with the bench command line, without warnings', () => {
    const r = spawnSync('gcc', ['-O2', '-Wall', '-o', bin, SRC, '-luring'], { encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stderr.trim()).toBe('');
    writeFileSync(file, randomBytes(SIZE));
  });

  it('libnbd: random 4k writes at QD32, 1 MiB and 8 MiB writes, two connections, read-back, flush, errors past the end', async () => {
    const { uri } = await start(false);
    const model = join(dir, 'model.img');
    const r = await run(PYTHON, ['-c', CLIENT_PY, uri, file, model, '12345'], 25_000);
    expect(r.code, `${r.stderr}\n${r.stdout}\nserver: ${serverLog}`).toBe(0);
    const out = JSON.parse(r.stdout.trim().split('\n').pop() as string) as Record<string, unknown>;
    expect(out).toEqual({
      size: SIZE, can_flush: true, can_fua: true, can_trim: false, can_zero: false, structured: false, protocol: 'newstyle-fixed',
      block_min: 4096, block_max: 32 * 1024 * 1024,
      writes_ok: true, second_conn_seen: true, random_reads_match: true, full_read_match: true, mismatched_mib: [], flushed: true,
      read_beyond_size: 'EINVAL', read_across_end: 'EINVAL', write_beyond_size: 'ENOSPC', write_across_end: 'ENOSPC',
      read_misaligned: 'EINVAL', still_serving: true,
    });
    // What the clients saw is what is in the file.
    expect(readFileSync(file).equals(readFileSync(model))).toBe(true);
  });

  it('qemu-io in busy-poll mode: patterns, FUA, flush, a 1 MiB and a 6 MiB write; SIGTERM ends the connection children too', async () => {
    const { c, uri } = await start(true);
    const cmds = [
      'write -P 0x5a 1M 1M', 'read -P 0x5a 1M 1M',
      'write -f -P 0xa5 8M 6M', 'read -P 0xa5 8M 6M',
      'aio_write -P 0x11 16M 128k', 'aio_write -P 0x22 17M 4k', 'aio_flush',
      'read -P 0x11 16M 128k', 'read -P 0x22 17M 4k', 'flush',
      'read -P 0x5a 1M 1M',
    ];
    const r = await run('qemu-io', ['-f', 'raw', uri, ...cmds.flatMap((x) => ['-c', x])]);
    expect(r.code, r.stderr + r.stdout).toBe(0);
    expect(r.stdout + r.stderr).not.toMatch(/fail|error|mismatch/i);
    expect(r.stdout.match(/^read /gm)?.length).toBe(5);

    // A client that stays connected: its child must go when the server gets SIGTERM.
    const holder = spawn(PYTHON, ['-c', 'import nbd, sys, time\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\nprint("up", flush=True)\ntime.sleep(30)', uri], { stdio: ['ignore', 'pipe', 'ignore'] });
    try {
      await new Promise<void>((res, rej) => {
        holder.stdout?.once('data', () => res());
        holder.once('exit', () => rej(new Error('holder exited')));
      });
      const kids = childrenOf(c.pid as number);
      expect(kids.length).toBe(1);
      c.kill('SIGTERM');
      await until('the listener to exit', () => exited(c), 3000);
      expect(c.signalCode ?? c.exitCode).toBe(0);
      await until('the connection child to exit', () => kids.every((k) => !alive(k)), 3000);
    } finally {
      holder.kill('SIGKILL');
    }
  });
});
