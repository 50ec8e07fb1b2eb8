import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { startFaultDisk, requireTools, type FaultDisk } from '../helpers/faultdisk.js';
import { BS, captureLogger, open, pattern, readBack, sparseFile, tempDir } from './fixtures.js';

requireTools('nbdkit', 'nbdkit-python', 'nbdfuse', '/dev/fuse', 'mount', 'umount');

describe('failures that must not remap', () => {
  let dir: string;
  let cleanup: () => void;
  beforeAll(() => ({ dir, cleanup } = tempDir('nonmedia')));
  afterAll(() => cleanup());

  it('a vanished main fails the request and the device, with no remap storm', async () => {
    const disk: FaultDisk = await startFaultDisk({ dir, name: 'gone', sizeBytes: 16 * 1024 * 1024 });
    try {
      const { logger, lines } = captureLogger();
      const sparePath = sparseFile(join(dir, 'spare-gone.img'), 16 * 1024 * 1024);
      const e = await open({ mainPath: disk.path, sparePath, format: true, logger });
      await e.submit({ op: 'write', offset: 0, length: 4 * BS, buffer: pattern(4, 1) });
      await disk.kill();
      const errs: unknown[] = [];
      for (let i = 0; i < 8; i++) {
        errs.push(await e.submit({ op: 'write', offset: i * 16 * BS, length: 16 * BS, buffer: pattern(16, i) }).catch((x: unknown) => x));
      }
      expect(errs.every((x) => x instanceof Error)).toBe(true);
      const codes = new Set(errs.map((x) => (x as { code: string }).code));
      const st = e.status();
      expect(st.state).toBe('failed');
      expect(st.remappedBlocks).toBe(0);
      expect(st.spareBlocksUsed).toBe(0);
      expect(st.failReason).toMatch(/unreachable/);
      const failed = lines.find((l) => l.event === 'device-failed');
      expect(failed, 'a device-failed log line').toBeDefined();
      expect(String(failed?.msg)).toMatch(/device test failed: main .* is unreachable \(E[A-Z]+\)/);
      // the first error names the errno of the vanished disk, not EIO from a remap attempt
      expect([...codes].some((c) => c !== 'EIO')).toBe(true);
      await e.close(1000);
    } finally {
      await disk.stop();
    }
  });

  it('a full host filesystem under a file-backed main fails with ENOSPC and does not remap', async () => {
    const mnt = join(dir, 'small');
    mkdirSync(mnt);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', mnt]);
    try {
      const mainPath = sparseFile(join(mnt, 'main.img'), 64 * 1024 * 1024);
      const sparePath = sparseFile(join(dir, 'spare-full.img'), 16 * 1024 * 1024);
      const e = await open({ mainPath, sparePath, format: true });
      let err: unknown;
      for (let i = 0; i < 16 && err === undefined; i++) {
        err = await e.submit({ op: 'write', offset: i * 256 * BS, length: 256 * BS, buffer: pattern(256, i) }).then(() => undefined, (x: unknown) => x);
      }
      expect(err).toMatchObject({ code: 'ENOSPC' });
      const st = e.status();
      expect(st.remappedBlocks).toBe(0);
      expect(st.state).toBe('failed');
      expect(st.failReason).toMatch(/full/);
      // what was written before still reads back
      expect((await readBack(e, 0, 256 * BS)).equals(pattern(256, 0))).toBe(true);
      await e.close();
    } finally {
      execFileSync('umount', ['-l', mnt]);
    }
  });
});
