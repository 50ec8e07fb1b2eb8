/**
 * End to end through openEngine: a first format of a spare file is
 * interrupted; `add` without --format (format: false) names the interrupted
 * format instead of "no metadata"; with --format it is redone (logged) and
 * the device serves I/O, also after a reopen.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { FileMetaIO } from '../../src/metadata/io.js';
import { formatSpare } from '../../src/metadata/store.js';
import { RemapError } from '../../src/errors.js';
import { CrashIO } from '../metadata/helpers.js';
import { BS, captureLogger, open, pattern, readBack, sparseFile, tempDir } from './fixtures.js';

const td = tempDir('fmt-int-open');
afterAll(() => td.cleanup());

describe('openEngine after an interrupted first format', () => {
  it('without format: names the interrupted format; with format: redoes it and serves I/O', async () => {
    const mainPath = sparseFile(join(td.dir, 'main.img'), 16 * 1024 * 1024);
    const sparePath = sparseFile(join(td.dir, 'spare.img'), 4 * 1024 * 1024);
    const uuid = '0d1e2f30-4152-4637-8899-aabbccddeeff';
    const io = await FileMetaIO.open(sparePath);
    await expect(formatSpare(new CrashIO(io, 3), {
      areaOffset: 0, areaBytes: 4 * 1024 * 1024, blockSize: BS, journalBytes: 256 * 1024,
      identity: { main: { kind: 'file', sizeBytes: 16 * 1024 * 1024, dev: 1, ino: 2, stableId: '' }, deviceUuid: uuid },
    })).rejects.toThrow(/crashed/);
    await io.close();

    const err = await open({ mainPath, sparePath }).then(() => undefined, (e: unknown) => e);
    expect(err).toBeInstanceOf(RemapError);
    expect((err as RemapError).code).toBe('ENODATA');
    const msg = (err as RemapError).message;
    expect(msg).toContain(`spare ${sparePath}: a format started at `);
    expect(msg).toContain(`(device uuid ${uuid}) never finished`);
    expect(msg).toContain('run `remapctl add ... --format` again to redo it');
    expect(msg).not.toMatch(/has no dm-remapd metadata; format it explicitly/);

    const { logger, lines } = captureLogger();
    const e = await open({ mainPath, sparePath, format: true, logger });
    const redone = lines.find((l) => l.event === 'format-redone');
    expect(redone?.interruptedUuid).toBe(uuid);
    expect(String(redone?.msg)).toMatch(/redoing an interrupted format/);
    const w = pattern(4, 7);
    await e.submit({ op: 'write', offset: 20 * BS, length: 4 * BS, buffer: w });
    expect((await readBack(e, 20 * BS, 4 * BS)).equals(w)).toBe(true);
    await e.close();

    const e2 = await open({ mainPath, sparePath });
    expect((await readBack(e2, 20 * BS, 4 * BS)).equals(w)).toBe(true);
    await e2.close();
  });

  it('a blank spare still says "no metadata" and is formatted only with format', async () => {
    const mainPath = sparseFile(join(td.dir, 'main2.img'), 16 * 1024 * 1024);
    const sparePath = sparseFile(join(td.dir, 'spare2.img'), 4 * 1024 * 1024);
    await expect(open({ mainPath, sparePath })).rejects.toThrow(/has no dm-remapd metadata; format it explicitly \(--format\)/);
    const { logger, lines } = captureLogger();
    const e = await open({ mainPath, sparePath, format: true, logger });
    expect(lines.some((l) => l.event === 'format-redone')).toBe(false);
    expect(lines.some((l) => l.event === 'formatted')).toBe(true);
    await e.close();
  });
});
