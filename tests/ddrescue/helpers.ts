/** Shared by the ddrescue tests: a block-numbered image, NBD block reads through nbdsh, a non-blocking runner. */
import { execFileSync } from 'node:child_process';
import { runTool as run } from '../daemon/helpers.js';
import { writeFileSync } from 'node:fs';

export const BS = 4096;
export const SIZE = 32 << 20;
export const BLOCKS = SIZE / BS;
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

export { runTool as run } from '../daemon/helpers.js';

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

