import { describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { promisify } from 'node:util';

const run = promisify(execFile);

// Keeps the README's demo command honest: the compiled demo must remap a
// real bad block and read everything back, before and after a reopen.
describe('engine demo (README)', () => {
  it('remaps bad blocks on file-backed images and keeps them across a reopen', async () => {
    const demo = new URL('../dist/demo/engine-demo.js', import.meta.url).pathname;
    expect(existsSync(demo), 'run `npm run build` first').toBe(true);
    const dir = mkdtempSync('/var/tmp/dmr-demo-');
    try {
      const { stdout } = await run(process.execPath, [demo, dir], { timeout: 60_000 });
      expect(stdout).toMatch(/read answered: unreadable block 1003 .*EIO/);
      expect(stdout).toMatch(/read back matches; block 1003 -> spare \d+, block 1010 -> spare \d+, block 1014 -> spare \d+/);
      expect(stdout).toMatch(/"event":"remap","reason":"write-error","block":1014/);
      expect(stdout).toMatch(/read back after reopen matches/);
      expect(stdout).toMatch(/remapped blocks\s+4/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
