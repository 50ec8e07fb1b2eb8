import { execFileSync } from 'node:child_process';
import { copyFileSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FileMetaIO } from '../../src/metadata/io.js';
import { formatSpare } from '../../src/metadata/store.js';
import { cleanup, ctl, request, startDaemon, tempDir, type Daemon } from '../daemon/helpers.js';

function img(path: string, size: number): string {
  writeFileSync(path, '');
  truncateSync(path, size);
  return path;
}

describe('remapctl against a running daemon', () => {
  let dir: string;
  let d: Daemon;
  let main: string;
  let spare: string;
  beforeAll(async () => {
    dir = tempDir('dmr-cli-');
    main = img(join(dir, 'main.img'), 64 << 20);
    spare = img(join(dir, 'spare.img'), 8 << 20);
    d = await startDaemon(dir);
  });
  afterAll(async () => {
    if (d !== undefined) expect(await d.stop()).toBe(0);
    cleanup(dir);
  });

  it('--help documents the exit codes', async () => {
    const r = await ctl(null, '--help');
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/Exit codes:/);
    expect(r.stdout).toMatch(/3 +dm-remapd is not running/);
  });

  it('refuses a spare without metadata unless --format, then formats with it', async () => {
    const r = await ctl(d.sock, 'add', 'd0', '--main', main, '--spare', spare);
    expect(r.code).toBe(7);
    expect(r.stderr).toMatch(/spare .*spare\.img has no dm-remapd metadata; format it explicitly \(--format\).*device d0/);
    const ok = await ctl(d.sock, 'add', 'd0', '--main', main, '--spare', spare, '--format');
    expect(ok.stderr).toBe('');
    expect(ok.code).toBe(0);
    expect(ok.stdout).toMatch(/^added d0: 64\.0 MiB, block size 4096/);
  });

  it('refuses a name in use and a main used by another device', async () => {
    const r = await ctl(d.sock, 'add', 'd0', '--main', main, '--spare', spare);
    expect(r.code).toBe(5);
    expect(r.stderr).toMatch(/device "d0" already exists \(state running/);
    const other = img(join(dir, 'other-spare.img'), 8 << 20);
    const r2 = await ctl(d.sock, 'add', 'd1', '--main', main, '--spare', other, '--format');
    expect(r2.code).toBe(5);
    expect(r2.stderr).toMatch(/main\.img is already used by device "d0"/);
  });

  it('reports missing files with exit 8', async () => {
    const r = await ctl(d.sock, 'add', 'x', '--main', join(dir, 'nope.img'), '--spare-tail', '1M');
    expect(r.code).toBe(8);
    expect(r.stderr).toMatch(/main .*nope\.img does not exist \(device x, add\): ENOENT/);
    const r2 = await ctl(d.sock, 'add', 'x', '--main', img(join(dir, 'm2.img'), 16 << 20), '--spare', join(dir, 'nospare.img'));
    expect(r2.code).toBe(8);
    expect(r2.stderr).toMatch(/spare .*nospare\.img does not exist/);
  });

  it('rejects bad sizes and bad options as usage errors (exit 2)', async () => {
    for (const args of [
      ['add', 'x', '--main', main, '--spare-tail', '12Q'],
      ['add', 'x', '--main', main, '--spare-tail', '0'],
      ['add', 'x', '--main', main, '--spare-tail', '1M', '--block-size', '1024'],
      ['add', 'x', '--main', main, '--spare-tail', '1M', '--nbd-tcp', 'localhost'],
      ['add', 'x', '--main', main, '--spare-tail', '1M', '--metadata-timeout', 'soon'],
      ['add', 'x', '--main', main],
      ['add', 'x', '--main', main, '--spare', spare, '--spare-tail', '1M'],
      ['remove', 'd0', '--timeout', '-1'],
      ['remap', 'd0', 'twelve'],
      ['frobnicate'],
    ]) {
      const r = await ctl(d.sock, ...args);
      expect(r.code, args.join(' ')).toBe(2);
      expect(r.stderr.length, args.join(' ')).toBeGreaterThan(0);
    }
    const r = await ctl(d.sock, 'add', 'x', '--main', main, '--spare-tail', '12Q');
    expect(r.stderr).toMatch(/"12Q" is not a size/);
    const r2 = await ctl(d.sock, 'add', 'x', '--main', main);
    expect(r2.stderr).toMatch(/add x: give exactly one of --spare PATH or --spare-tail SIZE/);
    // A tail size the engine refuses (not a multiple of 4096): refused by the daemon, still exit 2.
    const m3 = img(join(dir, 'm3.img'), 16 << 20);
    const r3 = await ctl(d.sock, 'add', 'x', '--main', m3, '--spare-tail', '1000', '--format');
    expect(r3.code).toBe(2);
    expect(r3.stderr).toMatch(/spare tail of 1000 bytes must be a positive multiple of 4096.*device x/);
  });

  it('answers unknown devices with exit 4', async () => {
    for (const args of [['status', 'ghost'], ['remove', 'ghost'], ['remap', 'ghost', '1']]) {
      const r = await ctl(d.sock, ...args);
      expect(r.code, args.join(' ')).toBe(4);
      expect(r.stderr).toMatch(/no device named "ghost"/);
    }
  });

  it('remaps blocks by hand, naming each block; out-of-range blocks fail with exit 1', async () => {
    const r = await ctl(d.sock, 'remap', 'd0', '5', '6');
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/d0: block 5 remapped to spare block \d+/);
    expect(r.stdout).toMatch(/d0: block 6 remapped to spare block \d+/);
    const again = await ctl(d.sock, 'remap', 'd0', '5');
    expect(again.code).toBe(0);
    expect(again.stdout).toMatch(/d0: block 5 already remapped/);
    const bad = await ctl(d.sock, 'remap', 'd0', '7', '99999999');
    expect(bad.code).toBe(1);
    expect(bad.stdout).toMatch(/d0: block 99999999 failed: block 99999999 is outside the device \(0\.\.16383\)/);
    expect(bad.stdout).toMatch(/d0: block 7 remapped/);
  });

  it('status --json has the documented fields; list and status print tables', async () => {
    const r = await ctl(d.sock, '--json', 'status', 'd0');
    expect(r.code).toBe(0);
    const s = JSON.parse(r.stdout) as Record<string, unknown>;
    for (const k of ['name', 'sizeBytes', 'blockSize', 'remappedBlocks', 'pendingBlocks', 'spareBlocksTotal', 'spareBlocksUsed', 'readErrors',
      'writeErrors', 'metadataSeq', 'exports', 'state', 'openMode']) expect(s, k).toHaveProperty(k);
    expect(s).toMatchObject({ name: 'd0', sizeBytes: 64 << 20, blockSize: 4096, remappedBlocks: 3, state: 'running', openMode: 'direct' });
    const all = await ctl(d.sock, 'status', '--json');
    expect(JSON.parse(all.stdout)).toHaveLength(1);
    const t = await ctl(d.sock, 'status');
    expect(t.stdout).toMatch(/^NAME +STATE +HEALTH +MODE +SIZE/);
    expect(t.stdout).toMatch(/d0 +running +ok +direct +64\.0 MiB +4096 +3 /);
    const l = await ctl(d.sock, 'list');
    expect(l.code).toBe(0);
    expect(l.stdout).toMatch(/d0 +running +64\.0 MiB/);
    const one = await ctl(d.sock, 'status', 'd0');
    expect(one.stdout).toMatch(/remapped blocks: +3/);
  });

  it('refuses a spare that belongs to another main, naming both identities', async () => {
    const mainB = img(join(dir, 'mainB.img'), 64 << 20);
    const spareCopy = join(dir, 'spare-copy.img');
    copyFileSync(spare, spareCopy); // metadata of d0 (main.img), put next to another main
    const r = await ctl(d.sock, 'add', 'dB', '--main', mainB, '--spare', spareCopy);
    expect(r.code).toBe(7);
    const inoA = statSync(main).ino;
    const inoB = statSync(mainB).ino;
    expect(r.stderr).toMatch(new RegExp(`belongs to another main: recorded file dev \\d+ inode ${inoA}, \\d+ bytes, found file dev \\d+ inode ${inoB}`));
    const ok = await ctl(d.sock, 'add', 'dB', '--main', mainB, '--spare', spareCopy, '--allow-identity-change');
    expect(ok.code).toBe(0);
    expect((await ctl(d.sock, 'remove', 'dB')).code).toBe(0);
  });

  it('exports over NBD on a unix socket (nbdinfo sees the size)', async () => {
    const m = img(join(dir, 'nbd-main.img'), 32 << 20);
    const nbd = join(dir, 'nbd.sock');
    const r = await ctl(d.sock, 'add', 'n0', '--main', m, '--spare-tail', '4M', '--format', '--nbd-unix', nbd);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/exports: nbd\+unix:\/\/\/n0\?socket=/);
    const size = execFileSync('nbdinfo', ['--size', `nbd+unix:///n0?socket=${nbd}`], { encoding: 'utf8' }).trim();
    expect(Number(size)).toBe(28 << 20);
    const rm = await ctl(d.sock, 'remove', 'n0');
    expect(rm.code).toBe(0);
  });

  it('removes an idle device within 100 ms and says nothing was cancelled', async () => {
    const m = img(join(dir, 'idle.img'), 16 << 20);
    expect((await ctl(d.sock, 'add', 'idle', '--main', m, '--spare-tail', '2M', '--format')).code).toBe(0);
    const t0 = Date.now();
    const a = await request(d.sock, 'remove', { name: 'idle' });
    const wall = Date.now() - t0;
    expect(a.ok).toBe(true);
    const rep = a.result as { elapsedMs: number; cancelled: string[]; synced: boolean };
    expect(rep.elapsedMs).toBeLessThanOrEqual(100);
    expect(wall).toBeLessThanOrEqual(100);
    expect(rep.cancelled).toEqual([]);
    expect(rep.synced).toBe(true);
    expect((await ctl(d.sock, 'add', 'idle', '--main', m, '--spare-tail', '2M')).code).toBe(0);
    const rm = await ctl(d.sock, 'remove', 'idle', '--timeout', '2000');
    expect(rm.code).toBe(0);
    expect(rm.stdout).toMatch(/^removed idle in \d+ ms \(deadline 2000 ms\), final sync done; nothing was cancelled/);
  });

  it('--json errors carry the stable code', async () => {
    const r = await ctl(d.sock, '--json', 'status', 'ghost');
    expect(r.code).toBe(4);
    expect(JSON.parse(r.stdout)).toMatchObject({ ok: false, error: { code: 'UNKNOWN_DEVICE' } });
  });

  it('inspect decodes the metadata offline', async () => {
    const r = await ctl(null, 'inspect', spare);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/device: +d0 \(uuid [0-9a-f-]+\)/);
    expect(r.stdout).toMatch(/main: +file dev \d+ inode \d+, 67108864 bytes/);
    expect(r.stdout).toMatch(/remapped: +3/);
    expect(r.stdout).toMatch(/copy 0: +valid/);
    expect(r.stdout).not.toMatch(/problem:/);
    const j = await ctl(null, '--json', 'inspect', spare);
    expect(JSON.parse(j.stdout)).toMatchObject({ ok: true, counts: { remapped: 3, pending: 0 }, identity: { name: 'd0', blockSize: 4096 } });
  });
});

describe('remapctl without a daemon', () => {
  let dir: string;
  beforeAll(() => {
    dir = tempDir('dmr-cli-off-');
  });
  afterAll(() => cleanup(dir));

  it('exits 3 when the daemon is not running, naming the socket', async () => {
    const sock = join(dir, 'none.sock');
    const r = await ctl(sock, 'list');
    expect(r.code).toBe(3);
    expect(r.stderr).toMatch(new RegExp(`dm-remapd is not reachable on ${sock} \\(ENOENT\\); is the daemon running\\?`));
    writeFileSync(join(dir, 'stale.sock'), '');
    const r2 = await ctl(join(dir, 'stale.sock'), 'status');
    expect(r2.code).toBe(3);
  });

  it('inspect: no metadata exits 7, a missing file 8, a damaged copy is named', async () => {
    const blank = img(join(dir, 'blank.img'), 4 << 20);
    const r = await ctl(null, 'inspect', blank);
    expect(r.code).toBe(7);
    expect(r.stdout).toMatch(/NOT USABLE: no dm-remapd metadata/);
    const r2 = await ctl(null, 'inspect', join(dir, 'missing.img'));
    expect(r2.code).toBe(8);
    expect(r2.stderr).toMatch(/missing\.img.*ENOENT/);
    // A formatted spare whose copy-0 superblock is smashed: still readable (exit 0), the bad structure named.
    const sp = img(join(dir, 'damaged.img'), 4 << 20);
    const io = await FileMetaIO.open(sp);
    await formatSpare(io, { areaOffset: 0, areaBytes: 4 << 20, blockSize: 4096, journalBytes: 64 * 1024, identity: { main: { kind: 'file', sizeBytes: 1 << 30, dev: 1, ino: 2, stableId: '' }, name: 'dm' } });
    await io.write(0, new Uint8Array(4096).fill(0x5a));
    await io.close();
    const r3 = await ctl(null, 'inspect', sp);
    expect(r3.code).toBe(0);
    expect(r3.stdout).toMatch(/copy 0: +BAD/);
    expect(r3.stdout).toMatch(/problem: +copy 0: superblock at offset 0 is bad/);
    expect(r3.stdout).toMatch(/main: +file dev 1 inode 2, 1073741824 bytes/);
    // Both superblocks smashed while the magic of other structures remains: refused (exit 7), never shown as empty.
    const fh = await FileMetaIO.open(sp);
    await fh.write((4 << 20) - 4096, new Uint8Array(4096).fill(0x5a));
    await fh.close();
    const r4 = await ctl(null, 'inspect', sp);
    expect(r4.code, r4.stdout + r4.stderr).toBe(7);
    expect(r4.stdout).toMatch(/NOT USABLE/);
  });
});
