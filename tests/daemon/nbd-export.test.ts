/**
 * Devices served over NBD by the daemon: data written through NBD survives a
 * manual remap and a daemon restart; removal closes live connections and says so.
 */
import { execFileSync, spawn } from 'node:child_process';
import { truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cleanup, ctl, request, startDaemon, tempDir } from './helpers.js';

// nbdsh runs `python3` from PATH and needs the system's python3-nbd: put /usr/bin first.
const SYS_ENV = { ...process.env, PATH: `/usr/bin:/bin:${process.env.PATH ?? ''}` };

function nbdsh(uri: string, code: string): string {
  return execFileSync('nbdsh', ['-u', uri, '-c', code], { encoding: 'utf8', timeout: 20_000, env: SYS_ENV });
}

describe('NBD export through the daemon', () => {
  let dir: string;
  beforeAll(() => {
    dir = tempDir('dmr-nbd-');
  });
  afterAll(() => cleanup(dir));

  it('data survives a manual remap and a restart; remove closes a live connection', async () => {
    const main = join(dir, 'main.img');
    writeFileSync(main, '');
    truncateSync(main, 32 << 20);
    const nbd = join(dir, 'd.nbd');
    const uri = `nbd+unix:///d?socket=${nbd}`;
    const d1 = await startDaemon(dir);
    const add = await ctl(d1.sock, 'add', 'd', '--main', main, '--spare-tail', '4M', '--format', '--nbd-unix', nbd, '--nbd-tcp', '127.0.0.1:0');
    expect(add.code).toBe(0);
    nbdsh(uri, 'h.pwrite(b"\\xab" * 4096, 5 * 4096); h.flush()');
    expect((await ctl(d1.sock, 'remap', 'd', '5')).code).toBe(0);
    nbdsh(uri, 'h.pwrite(b"\\xcd" * 4096, 5 * 4096); h.flush()'); // lands on the spare block now
    expect(nbdsh(uri, 'print(h.pread(4096, 5 * 4096).hex()[:8])').trim()).toBe('cdcdcdcd');
    expect(await d1.stop()).toBe(0);

    const d2 = await startDaemon(dir);
    const s = JSON.parse((await ctl(d2.sock, '--json', 'status', 'd')).stdout) as { remappedBlocks: number; exports: string[] };
    expect(s.remappedBlocks).toBe(1);
    expect(s.exports.some((e) => e.startsWith('nbd://127.0.0.1:'))).toBe(true);
    expect(nbdsh(uri, 'print(h.pread(4096, 5 * 4096).hex()[:8])').trim()).toBe('cdcdcdcd');
    // The main itself still holds the old data at block 5: the read came from the spare.
    const onMain = execFileSync('dd', [`if=${main}`, 'bs=4096', 'skip=5', 'count=1', 'status=none']).subarray(0, 4).toString('hex');
    expect(onMain).toBe('abababab');

    const holder = spawn('nbdsh', ['-u', uri, '-c', 'import time; time.sleep(15)'], { stdio: 'ignore', env: SYS_ENV });
    const exited = new Promise((res) => holder.on('exit', res));
    for (let i = 0; i < 100; i++) {
      const st = (await request(d2.sock, 'status', { name: 'd' })).result as { connections: number };
      if (st.connections > 0) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    const rm = await request(d2.sock, 'remove', { name: 'd', timeoutMs: 2000 });
    expect(rm.ok).toBe(true);
    const rep = rm.result as { connectionsClosed: number; cancelled: string[]; elapsedMs: number };
    expect(rep.connectionsClosed).toBe(1);
    expect(rep.cancelled).toContain('1 NBD connection(s) closed');
    expect(rep.elapsedMs).toBeLessThanOrEqual(3000);
    holder.kill();
    await exited;
    expect(await d2.stop()).toBe(0);
  });
});
