import { readFileSync } from 'node:fs';

/** gid of a group from /etc/group (no NSS: enough for local system groups). */
export function getgrnam(name: string, file = '/etc/group'): number | undefined {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch {
    return undefined;
  }
  for (const line of text.split('\n')) {
    const f = line.split(':');
    if (f.length >= 3 && f[0] === name && /^\d+$/.test(f[2])) return Number(f[2]);
  }
  return undefined;
}
