// Shared helpers for the native tests: temp files on a real disk (/var/tmp, not tmpfs).
import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

export function makeTempDir(prefix = 'dmr-native-'): { dir: string; cleanup: () => void } {
  const dir = mkdtempSync(join('/var/tmp', prefix));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/** A file of `size` bytes filled with a recognisable pattern (byte = (offset / 512) & 0xff, never 0). */
export function makePatternFile(path: string, size: number): Buffer {
  const b = Buffer.alloc(size);
  for (let off = 0; off < size; off += 512) b.fill(((off / 512) % 255) + 1, off, Math.min(size, off + 512));
  writeFileSync(path, b);
  return b;
}

export function fdCount(): number {
  return readdirSync('/proc/self/fd').length;
}

/** Threads of this process, without io_uring's own kernel workers (iou-wrk-*, iou-sqp-*), which come and go. */
export function threadCount(): number {
  let n = 0;
  for (const t of readdirSync('/proc/self/task')) {
    try {
      if (!readFileSync(`/proc/self/task/${t}/comm`, 'utf8').startsWith('iou-')) n++;
    } catch {
      // thread exited meanwhile
    }
  }
  return n;
}

export function activeResources(): string[] {
  return process.getActiveResourcesInfo().filter((r) => r !== 'Timeout' && r !== 'Immediate').sort();
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

export function fill(buf: Uint8Array, seed: number): Uint8Array {
  for (let i = 0; i < buf.length; i++) buf[i] = (seed + i * 7) & 0xff;
  return buf;
}
