/** Shared by the ddrescue tests: a block-numbered image, NBD block reads through nbdsh, a non-blocking runner. */
import { execFileSync, spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';

export const BS = 4096;
export const SIZE = 32 << 20;
export const BLOCKS = SIZE / BS;
// nbdsh runs `python3` from PATH and needs the system's python3-nbd: put /usr/bin first.
export const SYS_ENV = { ...process.env, PATH: `/usr/bin:/bin:${process.env.PATH ?? ''}` };
export const HAVE_DDRESCUE = ((): boolean => {
  try {
    execFileSync('ddrescuelog', ['--version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
})();

/** An image whose every block starts with its block number (u32 LE, repeated). */
export function patternImage(path: string): void {
  const b = Buffer.alloc(SIZE);
  for (let i = 0; i < BLOCKS; i++) b.fill(Buffer.from(new Uint32Array([i]).buffer), i * BS, (i + 1) * BS);
  writeFileSync(path, b);
}

/**
 * Runs a command without blocking the event loop: the fault disk's nbdkit and
 * the daemon write their logs to pipes this process must keep draining.
 */
export function run(cmd: string, args: string[], timeoutMs = 60_000): Promise<string> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { env: SYS_ENV, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    p.stdout.setEncoding('utf8').on('data', (c: string) => { out += c; });
    p.stderr.setEncoding('utf8').on('data', (c: string) => { err += c; });
    const timer = setTimeout(() => p.kill('SIGKILL'), timeoutMs);
    p.on('error', reject);
    p.on('close', (code, signal) => {
      clearTimeout(timer);
      if (code === 0) resolve(out);
      else reject(new Error(`${cmd} ${args.join(' ')}: exit ${code ?? signal}: ${err}`));
    });
  });
}

/** Reads each block through NBD: its first u32, or the errno name of the failure. */
export async function nbdBlocks(uriOrRun: { uri: string } | { nbdkitArgs: string[] }, blocks: number[]): Promise<Record<number, number | string>> {
  const py = `
import json
out = {}
for b in ${JSON.stringify(blocks)}:
    try:
        out[b] = int.from_bytes(h.pread(${BS}, b * ${BS})[:4], "little")
    except nbd.Error as e:
        out[b] = e.errno
print(json.dumps(out))
`;
  const text = 'uri' in uriOrRun
    ? await run('nbdsh', ['-u', uriOrRun.uri, '-c', py])
    : await run('nbdkit', ['-U', '-', ...uriOrRun.nbdkitArgs, '--run', `nbdsh -u "$uri" -c '${py}'`]);
  return JSON.parse(text.trim().split('\n').pop() as string) as Record<number, number | string>;
}

