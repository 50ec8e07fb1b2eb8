import { readdirSync, realpathSync, statSync } from 'node:fs';
import type { BackingInfo } from '../native/backing.js';
import type { MainIdentity } from '../metadata/format.js';

/**
 * The stable name of a block device: the first /dev/disk/by-id entry that
 * resolves to it, preferring wwn- names (they survive controller changes).
 */
export function stableIdOf(rdev: number, byIdDir = '/dev/disk/by-id'): string {
  let names: string[];
  try {
    names = readdirSync(byIdDir).sort((a, b) => Number(b.startsWith('wwn-')) - Number(a.startsWith('wwn-')) || a.localeCompare(b));
  } catch {
    return '';
  }
  for (const n of names) {
    try {
      const st = statSync(realpathSync(`${byIdDir}/${n}`));
      if (st.isBlockDevice() && st.rdev === rdev) return n;
    } catch {
      // a dangling link: ignore
    }
  }
  return '';
}

export function identityOf(info: BackingInfo): MainIdentity {
  if (info.isBlockDevice) {
    return { kind: 'block', sizeBytes: info.sizeBytes, dev: info.rdev, ino: 0, stableId: stableIdOf(info.rdev) };
  }
  return { kind: 'file', sizeBytes: info.sizeBytes, dev: info.dev, ino: info.ino, stableId: '' };
}

export function describeIdentity(id: MainIdentity): string {
  if (id.kind === 'block') {
    return `block device ${id.stableId !== '' ? id.stableId : `rdev ${id.dev >>> 8}:${id.dev & 0xff}`}, ${id.sizeBytes} bytes`;
  }
  return `file dev ${id.dev} inode ${id.ino}, ${id.sizeBytes} bytes`;
}

/**
 * Whether the metadata's recorded main is this main. Files: device + inode +
 * size (two images of the same size swapped are caught by the inode). Block
 * devices: the by-id name when both have one, else the device number, + size.
 */
export function sameMain(recorded: MainIdentity, found: MainIdentity): boolean {
  if (recorded.kind !== found.kind || recorded.sizeBytes !== found.sizeBytes) return false;
  if (recorded.kind === 'file') return recorded.dev === found.dev && recorded.ino === found.ino;
  if (recorded.stableId !== '' && found.stableId !== '') return recorded.stableId === found.stableId;
  return recorded.dev === found.dev;
}
