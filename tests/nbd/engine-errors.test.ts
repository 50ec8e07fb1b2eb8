/**
 * Engine errors as an NBD client sees them, through the real daemon and
 * nbdsh (libnbd), with a fault disk (nbdkit + nbdfuse) as main:
 * - the spare runs out while bad blocks are written: the write that needed
 *   a remap fails with ENOSPC on the wire, status says spareExhausted, and
 *   the device keeps serving everything that needs no new spare block;
 * - `remapctl remove` while the main hangs with a client's READ in flight:
 *   that READ, and a new one sent on its connection during the removal, end
 *   with ESHUTDOWN; an idle connection is closed at once (libnbd: ENOTCONN);
 *   the removal takes at most --timeout + 1 s (elapsedMs) and says what was
 *   cancelled.
 */
import { spawn } from 'node:child_process';
import { existsSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cleanupAll, makeTempDir, requireTools, startFaultDisk, type FaultDisk } from '../helpers/faultdisk.js';
import { ctl, request, startDaemon, type Daemon } from '../daemon/helpers.js';

requireTools('nbdkit', 'nbdkit-python', 'nbdfuse', 'fusermount3', '/dev/fuse', 'nbdsh');

// nbdsh runs `python3` from PATH and needs the system's python3-nbd: put /usr/bin first.
const SYS_ENV = { ...process.env, PATH: `/usr/bin:/bin:${process.env.PATH ?? ''}` };
const BS = 4096;

interface Client { out: Promise<string>; code: Promise<number | null> }

/** nbdsh -u URI -c SCRIPT in the background; `out` is its stdout, trimmed. */
function nbdsh(uri: string, script: string, timeoutMs = 30_000): Client {
  const p = spawn('nbdsh', ['-u', uri, '-c', `import errno, os, time\n${script}`], { env: SYS_ENV, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  p.stdout.setEncoding('utf8').on('data', (c: string) => { out += c; });
  p.stderr.setEncoding('utf8').on('data', (c: string) => { err += c; });
  const t = setTimeout(() => p.kill('SIGKILL'), timeoutMs);
  const code = new Promise<number | null>((res) => p.on('close', (c) => { clearTimeout(t); res(c); }));
  return { out: code.then((c) => { if (c !== 0) throw new Error(`nbdsh exited ${c}: ${err}\n${out}`); return out.trim(); }), code };
}

/** Python: run one call and print "ok" or the errno name the server's reply carried. */
const tryCall = (call: string): string => [
  'try:',
  `    ${call}`,
  '    print("ok")',
  'except nbd.Error as e:',
  '    print(errno.errorcode.get(e.errnum, "errnum=%s: %s" % (e.errnum, e.string)))',
].join('\n');

function img(path: string, size: number): string {
  writeFileSync(path, '');
  truncateSync(path, size);
  return path;
}

describe('engine errors over the wire', () => {
  let dir: string;
  let disk: FaultDisk;
  let d: Daemon | undefined;
  beforeAll(async () => {
    dir = await makeTempDir('dmr-enginerr-');
    disk = await startFaultDisk({ dir, name: 'main', sizeBytes: 32 << 20 });
    d = await startDaemon(dir);
  });
  afterAll(async () => {
    await disk?.setHang(false).catch(() => undefined);
    if (d !== undefined) await d.stop();
    await cleanupAll();
  });

  it('an exhausted spare reaches the client as ENOSPC; other I/O goes on', async () => {
    const dm = d as Daemon;
    const nbd = join(dir, 'ns.nbd');
    const uri = `nbd+unix:///ns?socket=${nbd}`;
    const add = await ctl(dm.sock, '--json', 'add', 'ns', '--main', disk.path, '--spare', img(join(dir, 'ns-spare.img'), 1 << 20), '--format', '--nbd-unix', nbd);
    expect(add.code, add.stderr).toBe(0);
    const total = (JSON.parse(add.stdout) as { spareBlocksTotal: number }).spareBlocksTotal;
    expect(total).toBeGreaterThan(8);
    // More bad blocks than the spare has: blocks 1000 .. 1000+total+7.
    const first = 1000;
    const bad = total + 8;
    await disk.setBad({ write: [[first * BS, bad * BS]] });
    // Fill the spare one bad block at a time (each write succeeds through a remap) ...
    const fill = await nbdsh(uri, [
      `for i in range(${total}):`,
      `    h.pwrite(bytes([i % 251]) * ${BS}, (${first} + i) * ${BS})`,
      tryCall(`h.pwrite(b"\\xee" * ${BS}, ${first + total} * ${BS})`),
      tryCall(`h.pwrite(b"\\xee" * ${8 * BS}, ${first + total} * ${BS})`),
      // A good block still takes writes, remapped data still reads back, a FLUSH still works.
      tryCall(`h.pwrite(b"\\x5a" * ${BS}, 10 * ${BS})`),
      `print("ok" if h.pread(${BS}, 10 * ${BS}) == b"\\x5a" * ${BS} and h.pread(${BS}, ${first + 3} * ${BS}) == bytes([3]) * ${BS} else "bad data")`,
      tryCall('h.flush()'),
    ].join('\n')).out;
    expect(fill.split('\n')).toEqual(['ENOSPC', 'ENOSPC', 'ok', 'ok', 'ok']);
    const s = (await request(dm.sock, 'status', { name: 'ns' })).result as Record<string, unknown>;
    console.log(`[engine errors] spare of ${total} blocks exhausted: ${JSON.stringify({ state: s.state, remapped: s.remappedBlocks, used: s.spareBlocksUsed, spareExhausted: s.spareExhausted, writeErrors: s.writeErrors })}`);
    expect(s).toMatchObject({ state: 'running', spareExhausted: true, remappedBlocks: total, spareBlocksUsed: total });
    await dm.waitLog((l) => l.device === 'ns' && l.level >= 50 && /spare/i.test(l.msg));
    await disk.setBad({});
    const rm = await ctl(dm.sock, 'remove', 'ns');
    expect(rm.code, rm.stderr).toBe(0);
  });

  it('removal during held I/O: the held READ and a new one on its connection get ESHUTDOWN, an idle connection is closed; remapctl returns within --timeout + 1 s', async () => {
    const dm = d as Daemon;
    const nbd = join(dir, 'sd.nbd');
    const uri = `nbd+unix:///sd?socket=${nbd}`;
    const add = await ctl(dm.sock, 'add', 'sd', '--main', disk.path, '--spare', img(join(dir, 'sd-spare.img'), 4 << 20), '--format', '--nbd-unix', nbd);
    expect(add.code, add.stderr).toBe(0);
    const trigger = JSON.stringify(join(dir, 'send-now'));
    const waitTrigger = `while not os.path.exists(${trigger}):\n    time.sleep(0.01)\nt0 = time.monotonic()`;
    const elapsed = 'print(round((time.monotonic() - t0) * 1000))';
    // B: connected, idle, sends a READ only once the removal has begun.
    const idle = nbdsh(uri, [waitTrigger, tryCall(`h.pread(${BS}, 64 * ${BS})`), elapsed].join('\n'));
    for (let i = 0; i < 200; i++) {
      const st = (await request(dm.sock, 'status', { name: 'sd' })).result as { connections: number };
      if (st.connections === 1) break;
      await new Promise((r) => setTimeout(r, 25));
    }
    await disk.setHang(true);
    // A: a READ that hangs in main, then (during the removal) a second READ on the same connection.
    const busy = nbdsh(uri, [
      `c = h.aio_pread(nbd.Buffer(${BS}), 8 * ${BS})`,
      waitTrigger,
      tryCall(`h.pread(${BS}, 64 * ${BS})`),
      elapsed,
      'def held():',
      '    while True:',
      '        try:',
      '            if h.aio_command_completed(c):',
      '                return "ok"',
      '        except nbd.Error as e:',
      '            return errno.errorcode.get(e.errnum, "errnum=%s: %s" % (e.errnum, e.string))',
      '        h.poll(-1)',
      'print(held())',
    ].join('\n'));
    await disk.waitBlocked(1);
    const removing = ctl(dm.sock, '--json', 'remove', 'sd', '--timeout', '1000');
    // The new READs go out once the removal has begun (remapctl's own start-up
    // can take longer than any fixed wait on a loaded machine).
    for (let i = 0; i < 400; i++) {
      const st = (await request(dm.sock, 'status', { name: 'sd' })).result as { state?: string } | undefined;
      if (st?.state === 'stopping') break;
      await new Promise((r) => setTimeout(r, 10));
    }
    writeFileSync(JSON.parse(trigger) as string, '');
    const rm = await removing;
    const a = (await busy.out).split('\n');
    const b = (await idle.out).split('\n');
    const rep = JSON.parse(rm.stdout) as { elapsedMs: number; timedOut: boolean; synced: boolean; cancelled: string[] };
    console.log(`[engine errors] remove with a hung main: exit ${rm.code}, ${rep.elapsedMs} ms in the daemon, ${rm.ms} ms for remapctl; cancelled: ${rep.cancelled.join('; ')}; `
      + `busy connection: new READ ${a[0]} after ${a[1]} ms, held READ ${a[2]}; idle connection: READ ${b[0]} after ${b[1]} ms`);
    // Within --timeout + 1 s in the daemon; remapctl's own start-up (a node process) comes on top of its wall time.
    expect(rep.elapsedMs).toBeLessThanOrEqual(2000);
    expect(rm.ms).toBeLessThanOrEqual(3000);
    expect(rm.code, rm.stderr).toBe(0);
    expect(rep).toMatchObject({ timedOut: false, synced: false });
    expect(rep.cancelled).toEqual(expect.arrayContaining(['2 NBD connection(s) closed', '1 request(s) abandoned (answered ESHUTDOWN)']));
    // The READ sent during the removal is refused at once, the held one at the deadline.
    expect(a[0]).toBe('ESHUTDOWN');
    expect(Number(a[1])).toBeLessThan(500);
    expect(a[2]).toBe('ESHUTDOWN');
    // The idle connection was closed when the removal began: a clean disconnect, no reply to wait for.
    expect(b[0]).toBe('ENOTCONN');
    expect(Number(b[1])).toBeLessThan(500);
    expect((await request(dm.sock, 'list')).result).toEqual([]);
    expect(existsSync(nbd)).toBe(false);
    await disk.setHang(false);
    expect(await dm.stop()).toBe(0);
    d = undefined;
  });
});
