import { spawn } from 'node:child_process';

/**
 * Runs `node script ...args`, waits for it to print READY, then SIGKILLs it
 * killAfterMs later: the crash tests' child, killed at a random moment of
 * its workload. Rejects if the child exits on its own (it never should).
 */
export function killAfterReady(script: string, args: string[], killAfterMs: number, what = 'crash child'): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [script, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    let timer: NodeJS.Timeout | undefined;
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      if (timer === undefined && out.includes('READY\n')) timer = setTimeout(() => child.kill('SIGKILL'), killAfterMs);
    });
    child.stderr.on('data', (d: Buffer) => { err += d.toString(); });
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      if (signal !== 'SIGKILL') reject(new Error(`${what} exited on its own (code ${code}): ${err}`));
      else resolve();
    });
  });
}
