/**
 * remapctl unremap through the daemon (issue 6): kill -9 of the daemon in
 * the middle of `unremap --all` over many blocks (main slowed down so that
 * the kill lands between groups), then the restarted daemon serves
 * identical data everywhere, and a rerun finishes the rest; usage errors
 * and exit codes.
 */
import { createHash } from 'node:crypto';
import { readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cleanupAll, makeTempDir, requireTools, startFaultDisk, type FaultDisk } from '../helpers/faultdisk.js';
import { ctl, runTool as run, startDaemon, type Daemon } from '../daemon/helpers.js';

requireTools('nbdkit', 'nbdkit-python', 'nbdfuse', 'fusermount3', '/dev/fuse', 'nbdsh');

const BS = 4096;
const SIZE = 16 << 20;
const BLOCKS = SIZE / BS;
const REMAPPED = Array.from({ length: 1500 }, (_, i) => i * 2 + 1);

/** SHA-256 of the whole device read through NBD. */
async function deviceSha(uri: string): Promise<string> {
  const py = `
import hashlib
s = hashlib.sha256()
for off in range(0, ${SIZE}, 1 << 20):
    s.update(h.pread(1 << 20, off))
print(s.hexdigest())
`;
  return (await run('nbdsh', ['-u', uri, '-c', py])).trim();
}

/** Every block filled with one u32 (LE), repeated. */
function fill(buf: Buffer, block: number, v: number): void {
  buf.fill(Buffer.from(new Uint32Array([v]).buffer), block * BS, (block + 1) * BS);
}

describe('remapctl unremap', () => {
  let dir: string;
  let disk: FaultDisk;
  let d: Daemon | undefined;
  const expected = Buffer.alloc(SIZE);
  beforeAll(async () => {
    dir = await makeTempDir('dmr-unremap');
    for (let b = 0; b < BLOCKS; b++) fill(expected, b, b);
    writeFileSync(join(dir, 'main.img'), expected);
    disk = await startFaultDisk({ dir, name: 'main', sizeBytes: SIZE, backingFile: join(dir, 'main.img') });
    writeFileSync(join(dir, 'spare.img'), '');
    truncateSync(join(dir, 'spare.img'), 16 << 20);
  });
  afterAll(async () => {
    if (d !== undefined) await d.stop();
    await cleanupAll();
  });

  it('kill -9 mid-unremap: identical data everywhere after restart, and a rerun completes', async () => {
    d = await startDaemon(dir);
    const nbd = join(dir, 'd.nbd');
    const uri = `nbd+unix:///d?socket=${nbd}`;
    expect((await ctl(d.sock, 'add', 'd', '--main', disk.path, '--spare', join(dir, 'spare.img'), '--format', '--nbd-unix', nbd)).code).toBe(0);
    const rm = await ctl(d.sock, '--json', 'remap', 'd', ...REMAPPED.map(String));
    expect(rm.code).toBe(0);
    // New data for every remapped block (it lands on the spare; main keeps the old pattern).
    for (const b of REMAPPED) fill(expected, b, 0x5a000000 + b);
    await run('nbdsh', ['-u', uri, '-c', `
for b in ${JSON.stringify(REMAPPED)}:
    h.pwrite((0x5a000000 + b).to_bytes(4, "little") * ${BS / 4}, b * ${BS})
h.flush()
`]);
    const want = createHash('sha256').update(expected).digest('hex');
    expect(await deviceSha(uri)).toBe(want);

    // Slow main writes down so that the retirement takes several seconds, in groups of 128 blocks.
    await disk.setDelay({ write: 4 });
    const running = ctl(d.sock, 'unremap', 'd', '--all');
    await d.waitLog((l) => l.event === 'unremap', 30_000);
    d.proc.kill('SIGKILL');
    await d.exited;
    const interrupted = await running;
    expect(interrupted.code).toBe(1);
    expect(interrupted.stderr).toContain('dm-remapd closed the control connection without answering unremap');
    await disk.setDelay({});

    d = await startDaemon(dir);
    const st = JSON.parse((await ctl(d.sock, '--json', 'status', 'd')).stdout) as { state: string; remappedBlocks: number };
    expect(st.state).toBe('running');
    expect(st.remappedBlocks).toBeGreaterThan(0);
    expect(st.remappedBlocks).toBeLessThan(REMAPPED.length);
    expect(await deviceSha(uri)).toBe(want);

    const r = await ctl(d.sock, '--json', 'unremap', 'd', '--all');
    expect(r.code).toBe(0);
    const j = JSON.parse(r.stdout) as { unremapped: number; failed: number; remainingRemapped: number; results?: unknown };
    expect(j).toMatchObject({ unremapped: st.remappedBlocks, failed: 0, remainingRemapped: 0 });
    expect(j.results).toBeUndefined();
    expect(await deviceSha(uri)).toBe(want);
    // Main itself holds the data now.
    expect(createHash('sha256').update(readFileSync(join(dir, 'main.img'))).digest('hex')).toBe(want);
    const again = await ctl(d.sock, 'unremap', 'd', '--all');
    expect(again.stdout).toContain('d: 0 unremapped, 0 failed; 0 block(s) still remapped');
  }, 120_000);

  it('usage errors and exit codes', async () => {
    if (d === undefined) d = await startDaemon(dir);
    const both = await ctl(d.sock, 'unremap', 'd', '--all', '5');
    expect(both.code).toBe(2);
    expect(both.stderr).toContain('unremap d: give either --all or block numbers');
    expect((await ctl(d.sock, 'unremap', 'd')).code).toBe(2);
    expect((await ctl(d.sock, 'unremap', 'd', 'x1')).stderr).toContain('unremap d: "x1" is not a block number');
    expect((await ctl(d.sock, 'unremap', 'nodev', '--all')).code).toBe(4);
    const one = await ctl(d.sock, 'unremap', 'd', '7', String(BLOCKS + 1));
    expect(one.code).toBe(1);
    expect(one.stdout).toContain('d: block 7 is not remapped');
    expect(one.stdout).toContain(`d: block ${BLOCKS + 1} failed: block ${BLOCKS + 1} is outside the device (0..${BLOCKS - 1})`);
  }, 60_000);

  it('a main that still fails writes: that block stays remapped, exit 1, the output names the block and the errno', async () => {
    if (d === undefined) d = await startDaemon(dir);
    expect((await ctl(d.sock, 'remap', 'd', '10', '11')).code).toBe(0);
    await disk.setBad({ write: [[11 * BS, BS]] });
    const r = await ctl(d.sock, 'unremap', 'd', '10', '11');
    expect(r.code).toBe(1);
    expect(r.stdout).toContain('d: block 10 copied back to main');
    expect(r.stdout).toContain(`d: block 11 failed: block 11: writing it back to main ${disk.path} failed (EIO); it stays remapped`);
    expect(r.stdout).toContain('d: 1 unremapped, 1 failed; 1 block(s) still remapped');
    const j = JSON.parse((await ctl(d.sock, '--json', 'unremap', 'd', '--all')).stdout) as { failed: number; failures: Array<{ block: number; errno: number }> };
    expect(j.failed).toBe(1);
    expect(j.failures.map((f) => [f.block, f.errno])).toEqual([[11, 5]]);
    await disk.setBad({});
    expect((await ctl(d.sock, 'unremap', 'd', '--all')).code).toBe(0);
  }, 60_000);
});
