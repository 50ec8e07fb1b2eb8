import { describe, expect, it } from 'vitest';
import { execFile, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { promisify } from 'node:util';
import { exitAfterOutput } from './daemon/helpers.js';

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

// The README's main command: the daemon on an embedded default, reachable
// over NBD at once, torn down cleanly by Ctrl-C.
describe('embedded default (README main command)', () => {
  it('serves the default device over unix and TCP NBD and stops cleanly on SIGINT', async () => {
    const dir = mkdtempSync('/var/tmp/dmr-default-');
    const port = 20000 + Math.floor(Math.random() * 20000);
    const script = new URL('../scripts/demo.sh', import.meta.url).pathname;
    const child = spawn('bash', [script, dir], { env: { ...process.env, DM_REMAPD_SKIP_INSTALL: '1', DM_REMAPD_PORT: String(port) }, stdio: ['ignore', 'pipe', 'pipe'] });
    let err = '';
    child.stderr.on('data', (d: Buffer) => { err += d.toString(); });
    child.stdout.resume();
    const exited = exitAfterOutput(child, child.stderr);
    try {
      for (let i = 0; i < 300 && !err.includes('Ctrl-C stops it cleanly'); i++) await new Promise((r) => setTimeout(r, 100));
      expect(err).toContain('Ctrl-C stops it cleanly');
      const info = await run('nbdinfo', ['--json', `nbd+unix:///default?socket=${dir}/default.nbd`]);
      expect(JSON.parse(info.stdout).exports[0]['export-size']).toBe(1024 * 1024 * 1024);
      const io = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 4096 64k', '-c', 'read -P 0x5a 4096 64k', `nbd://127.0.0.1:${port}/default`]);
      expect(io.stdout).toMatch(/read 65536\/65536 bytes/);
      child.kill('SIGINT');
      expect(await exited).toBe(0);
      expect(err).toMatch(/stopped; images and remaps stay in/);
    } finally {
      child.kill('SIGKILL');
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
