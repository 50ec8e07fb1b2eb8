/**
 * `mkdir -p` without Node's recursive mkdir: on Node 20 `mkdir(p, {recursive:
 * true})` loops forever, burning CPU, when a parent exists but refuses the
 * child with ENOENT (any path under /proc), which hung the daemon at start
 * with such a stateDir or controlSocket (tests/fuzz/config.test.ts). This
 * walks the components and fails on the first refusal.
 */
import { mkdirSync, statSync } from 'node:fs';
import { resolve, sep } from 'node:path';

export function mkdirTree(dir: string, mode: number): void {
  const abs = resolve(dir);
  let prefix = '';
  for (const part of abs.split(sep)) {
    prefix = prefix === sep || prefix === '' ? `${sep}${part}` : `${prefix}${sep}${part}`;
    if (part === '') { prefix = sep; continue; }
    try {
      mkdirSync(prefix, { mode });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    }
  }
  if (!statSync(abs).isDirectory()) {
    throw Object.assign(new Error(`ENOTDIR: not a directory, mkdir '${abs}'`), { code: 'ENOTDIR', path: abs });
  }
}
