/**
 * Real NBD clients against the export: nbdinfo, nbdcopy, qemu-io, qemu-img
 * and fio, each a separate process.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { have, run, startFixture, type Fixture } from './nbd-fixtures.js';

describe('NBD export with real clients', () => {
  let f: Fixture | null = null;
  afterEach(async () => {
    await f?.close();
    f = null;
  });

  it.skipIf(!have('nbdinfo'))('nbdinfo --json shows size, block sizes and the derived flags', async () => {
    f = await startFixture({ sizeMiB: 16, description: 'test disk' });
    const r = await run('nbdinfo', ['--json', f.uri]);
    expect(r.code, r.stderr).toBe(0);
    const ex = (JSON.parse(r.stdout) as { protocol: string; exports: Array<Record<string, unknown>> });
    expect(ex.protocol).toBe('newstyle-fixed');
    expect(ex.exports[0]).toMatchObject({
      'export-name': 'disk0', description: 'test disk', 'export-size': 16 * 1024 * 1024,
      block_size_minimum: 4096, block_size_preferred: 4096, block_size_maximum: 32 * 1024 * 1024,
      can_flush: true, can_fua: true, can_trim: true, can_zero: true, can_fast_zero: true, can_df: true,
      can_multi_conn: true, can_cache: true, is_read_only: false,
    });
  });

  it.skipIf(!have('nbdinfo'))('nbdinfo --json on a read-only export over TCP', async () => {
    f = await startFixture({ sizeMiB: 16, readOnly: true, tcp: true });
    const r = await run('nbdinfo', ['--json', f.nbd.endpoints[1]]);
    expect(r.code, r.stderr).toBe(0);
    const ex = (JSON.parse(r.stdout) as { exports: Array<Record<string, unknown>> }).exports[0];
    expect(ex).toMatchObject({ is_read_only: true, can_trim: false, can_zero: false, can_fua: false, can_flush: true, can_df: true, can_cache: true });
  });

  it.skipIf(!have('nbdcopy'))('nbdcopy round trip of a random 32 MiB image', async () => {
    f = await startFixture({ sizeMiB: 32 });
    const src = join(f.dir, 'src.img');
    const back = join(f.dir, 'back.img');
    const data = randomBytes(32 * 1024 * 1024);
    writeFileSync(src, data);
    const up = await run('nbdcopy', [src, f.uri]);
    expect(up.code, up.stderr).toBe(0);
    const down = await run('nbdcopy', [f.uri, back]);
    expect(down.code, down.stderr).toBe(0);
    expect(readFileSync(back).equals(data)).toBe(true);
    expect(f.nbd.stats()).toMatchObject({ errors: 0, bytesWritten: 32 * 1024 * 1024, bytesRead: 32 * 1024 * 1024 });
  });

  it.skipIf(!have('qemu-io'))('qemu-io: write/read with patterns, FUA, flush, discard, write_zeroes', async () => {
    f = await startFixture({ sizeMiB: 16 });
    const cmds = [
      'write -P 0xab 0 64k', 'read -P 0xab 0 64k',
      'write -f -P 0xcd 64k 64k', 'read -P 0xcd 64k 64k',
      'flush',
      'write -z 0 16k', 'read -P 0 0 16k', 'read -P 0xab 16k 48k',
      'write -z -u 16k 16k', 'read -P 0 16k 16k',
      'discard 128k 64k',
      'aio_write -P 0x11 1M 128k', 'aio_write -P 0x22 2M 128k', 'aio_flush',
      'read -P 0x11 1M 128k', 'read -P 0x22 2M 128k',
    ];
    const r = await run('qemu-io', ['-f', 'raw', f.uri, ...cmds.flatMap((c) => ['-c', c])]);
    expect(r.code, r.stderr + r.stdout).toBe(0);
    expect(r.stdout + r.stderr).not.toMatch(/fail|error|mismatch/i);
    expect(r.stdout.match(/^read /gm)?.length).toBe(7);
  });

  it.skipIf(!have('qemu-img'))('qemu-img convert into the export and compare', async () => {
    f = await startFixture({ sizeMiB: 16 });
    const src = join(f.dir, 'src.img');
    const data = randomBytes(16 * 1024 * 1024);
    data.fill(0, 4 * 1024 * 1024, 8 * 1024 * 1024); // a zero stretch: qemu-img uses write-zeroes for it
    writeFileSync(src, data);
    const c = await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, f.uri]);
    expect(c.code, c.stderr).toBe(0);
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, f.uri]);
    expect(cmp.code, cmp.stderr + cmp.stdout).toBe(0);
    expect(cmp.stdout).toMatch(/identical/i);
  });

  it.skipIf(!have('fio'))('fio --ioengine=nbd randrw with crc32c verification', async () => {
    f = await startFixture({ sizeMiB: 32 });
    const out = join(f.dir, 'fio.json');
    const r = await run('fio', [
      '--name=nbd', '--ioengine=nbd', `--uri=${f.uri}`, '--rw=randrw', '--bs=4k', '--iodepth=16', '--size=16m',
      '--verify=crc32c', '--do_verify=1', '--verify_state_save=0', '--numjobs=1', '--time_based=0', `--output=${out}`, '--output-format=json',
    ], { timeoutMs: 40_000 });
    expect(r.code, r.stderr + r.stdout).toBe(0);
    const j = JSON.parse(readFileSync(out, 'utf8')) as { jobs: Array<{ error: number; read: { io_bytes: number }; write: { io_bytes: number } }> };
    expect(j.jobs[0].error).toBe(0);
    expect(j.jobs[0].write.io_bytes).toBeGreaterThan(0);
    expect(j.jobs[0].read.io_bytes).toBeGreaterThan(0);
    expect(f.nbd.stats().errors).toBe(0);
  });
});
